"""Every benchmark runs end to end (tiny arguments: this checks they work, not their numbers).
The benches are not run by `make test` otherwise, so an API change would break them silently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# the quality benches' inputs, shrunk: 8 PIQA items, 4 per task of the default suite, 2x32 calibration tokens
SMALL = ("--piqa", "8", "--default-items", "4", "--samples", "2", "--seq-len", "32")
BENCHES = {
    "bench_mc.py": (["--items", "6"], "multiple-choice scoring, 6 piqa items"),
    "bench_methods.py": (["--only", "rtn-w4-g64", *SMALL], "calibrated PTQ vs RTN"),
    "bench_qat.py": (["--bits", "4", "--only", "rtn", "qat", "--init", "rtn", "--steps", "1",
                     "--e2e-steps", "2", *SMALL], "quantization-aware recovery vs PTQ"),
    "bench_prune.py": (["--only", "wanda-mlp25", *SMALL, "--rounds", "1", "--prompts", "1", "--new-tokens", "4"],
                       "decode / baseline"),
    "bench_llamacpp.py": (["--types", "Q8_0", "Q4_K_M", "--rounds", "2", "--requests", "1", "--new-tokens", "4",
                           "--samples", "2", "--seq-len", "32", "--boot", "200"], "Q4_K_M+imatrix vs Q4_K_M"),
    "bench_threads.py": (["--rounds", "2", "--requests", "1", "--new-tokens", "4", "--max-threads", "2",
                          "--boot", "200"], "decode tokens/s by thread count"),
    "bench_onnx.py": (["--rounds", "1", "--new-tokens", "4", "--samples", "2", "--seq-len", "32", "--threads", "1"],
                      "/ ORT fp32, 1t"),
}

WITHOUT_DATA = ("bench_llamacpp.py", "bench_threads.py", "bench_onnx.py")  # benches that need no eval data


@pytest.mark.parametrize("script", BENCHES)
def test_bench_runs_and_prints_its_table(script):
    if not (DATA / "piqa.jsonl").is_file() and script not in WITHOUT_DATA:
        pytest.skip(f"{DATA} is absent")
    if script in ("bench_prune.py", "bench_llamacpp.py"):
        pytest.importorskip("llama_cpp")
    if script == "bench_onnx.py":
        pytest.importorskip("onnxruntime")
    args, title = BENCHES[script]
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert title in proc.stdout, proc.stdout[-3000:]
