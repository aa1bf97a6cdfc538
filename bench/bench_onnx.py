"""ONNX Runtime on the default model, side by side with torch float32 (and llama.cpp when
llama-cpp-python is installed): file size, KLD against the torch float32 baseline over the held-out
windows, and batch-1 decode / prefill speed and peak RSS, each measured in a fresh engine process
(quantgate's own path: EngineProcess + economics.measure_round over a fixed request mix). Models are
timed in interleaved rounds (order reversed every other round); medians are shown.

ORT candidates carry quantgate's codes: rtn-w8 (per channel) and gptq-w4-g32, each at MatMulNBits
accuracy_level 0 (fp32 compute) and 4 (int8 activations); and both with quantize_embeddings
(-emb: the tied lm_head a MatMulNBits node too, as onnxruntime-genai's own int4 builder writes
it) at accuracy_level 4. Without -emb, every decoded token still reads the 49152 x 576 float32
lm_head (113 MB of the 540 MB an fp32 token reads).

Every model is timed at each thread count of --threads (default: 1 and every core): the bench
process pins itself to that many cores and each engine process, which inherits the pinning,
uses all the cores it may run on. Ratios are to ORT fp32 at the same thread count.

Run with `make bench-onnx`. Prints a table; asserts nothing. The machine's load average is
printed beside the numbers: on a shared machine read the ratios, not the absolute tokens/s.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from quantgate.config import CalibrationConfig
from quantgate.engines import onnxruntime as qo
from quantgate.engines.process import EngineProcess
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import default_suite
from quantgate.evals.tasks import kl_divergence, make_windows
from quantgate.methods.apply import make_candidate
from quantgate.methods.calibrate import calibration_set
from quantgate.methods.registry import candidate
from quantgate.models.load import load_baseline

# (candidate, the MatMulNBits accuracy levels it is served at)
ORT_CANDIDATES = (({"method": "rtn", "bits": 8}, (0, 4)), ({"method": "gptq", "bits": 4, "group_size": 32}, (0, 4)),
                  ({"method": "rtn", "bits": 8, "quantize_embeddings": True}, (4,)),
                  ({"method": "gptq", "bits": 4, "group_size": 32, "quantize_embeddings": True}, (4,)))


@dataclass
class Row:
    name: str
    kind: str  # the engine process kind
    options: dict
    file_bytes: int
    kld: np.ndarray | None  # per token, vs torch float32 (None: the reference itself)


def ort_rows(baseline, calib, windows, reference, logs: Path) -> list[Row]:
    base = qo.float_graph(baseline, logs / "builder.log")
    rows = [Row("ORT fp32", "onnxruntime", {"path": str(base)}, qo.graph_bytes(base), _kld(base, windows, reference))]
    for fields, levels in ORT_CANDIDATES:
        cand = candidate(**fields)
        made = make_candidate(baseline.model, baseline.arch, cand, calib if cand.needs_calibration else None)
        weights = qo.candidate_weights(made.model, baseline.arch, cand)
        for level in levels:
            folder = qo.candidate_graph(base, weights, baseline.arch.blocks, level)
            rows.append(Row(f"ORT {cand.label} acc{level}", "onnxruntime", {"path": str(folder)},
                            qo.graph_bytes(folder), _kld(folder, windows, reference)))
        print(f"{cand.label}: made", file=sys.stderr, flush=True)
    return rows


def _kld(folder: Path, windows, reference) -> np.ndarray:
    engine = qo.OnnxRuntimeEngine(folder)
    return np.concatenate([kl_divergence(r, torch.from_numpy(engine.window_logprobs(w)))
                           for r, w in zip(reference, windows)])


def llamacpp_rows(baseline, windows, reference, n_ctx: int) -> list[Row]:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama-cpp-python not installed: no llama.cpp rows", file=sys.stderr)
        return []
    from quantgate.engines.llamacpp import LlamaCppEngine
    from quantgate.methods.gguf_quant import quantized_gguf

    rows = []
    for t in ("Q8_0", "Q4_0"):
        path = quantized_gguf(baseline, t)
        engine = LlamaCppEngine(path, n_ctx=512)
        kld = np.concatenate([kl_divergence(r, torch.from_numpy(engine.window_logprobs(w)))
                              for r, w in zip(reference, windows)])
        rows.append(Row(f"llama.cpp {t}", "llamacpp", {"path": str(path), "n_ctx": n_ctx, "logits_all": False},
                        path.stat().st_size, kld))
    return rows


def timed(row: Row, prompts, new_tokens: int, log: Path) -> dict:
    with EngineProcess(row.kind, label=row.name, log=log, **row.options) as e:
        r = e.measure_round(prompts, new_tokens)  # medians over the round's requests
        return {"decode_tokens_per_s": float(np.nanmedian(r.decode_rates())),
                "prefill_tokens_per_s": float(np.nanmedian(r.prefill_rates())),
                "peak_rss_bytes": e.close()["peak_rss_bytes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32, help="GPTQ calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", default="", help="comma-separated thread counts (default: 1 and every core)")
    args = ap.parse_args()
    load_before = os.getloadavg()
    baseline = load_baseline("smollm2-135m-instruct")
    suite = default_suite(limit=1, cloze_items=0, seed=0)
    windows = make_windows(baseline.tokenizer, suite.perplexity_text, 256, 8)
    reference = list(TorchEngine(baseline.model).token_logprobs(windows))
    prompts = [w[:64] for w in windows[:4]]  # the fixed request mix: four 64-token prompts
    calib = calibration_set(baseline.tokenizer, CalibrationConfig(samples=args.samples, seq_len=args.seq_len),
                            suite.texts())
    logs = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    weights = baseline.weights_dir
    rows = [Row("torch fp32", "torch", {"path": str(weights), "max_batch_size": 1, "onednn": False},
                sum(p.stat().st_size for p in weights.glob("*.safetensors")), None)]
    rows += ort_rows(baseline, calib, windows, reference, logs)
    rows += llamacpp_rows(baseline, windows, reference, n_ctx=64 + args.new_tokens + 1)
    del baseline, reference  # the speed runs happen in their own processes
    cores = sorted(os.sched_getaffinity(0))
    threads = sorted({min(int(t), len(cores)) for t in args.threads.split(",")} if args.threads else {1, len(cores)})
    runs: dict[tuple[str, int], list[dict]] = {(r.name, t): [] for r in rows for t in threads}
    for t in threads:
        os.sched_setaffinity(0, cores[:t])  # engine processes inherit it and use every core they may run on
        for i in range(args.rounds):
            for row in rows if i % 2 == 0 else rows[::-1]:
                log = logs / f"{row.name.replace(' ', '_')}-{t}.log"
                runs[row.name, t].append(timed(row, prompts, args.new_tokens, log))
            print(f"{t} thread(s), round {i + 1}: done", file=sys.stderr, flush=True)
    os.sched_setaffinity(0, cores)
    render(rows, runs, threads, args, load_before, os.getloadavg())
    return 0


def render(rows: list[Row], runs: dict[tuple[str, int], list[dict]], threads: list[int], args, load_before,
           load_after) -> None:
    med = lambda name, t, key: float(np.median([r[key] for r in runs[name, t]]))  # noqa: E731
    most = threads[-1]
    table = Table(title=f"ONNX Runtime vs torch on the default model: batch-1 decode after 64-token prompts, "
                        f"{args.new_tokens} new tokens, median of {args.rounds} interleaved rounds of fresh processes "
                        f"at each thread count")
    columns = ["model", "file MB", "KLD mean vs torch fp32", "KLD p99"]
    for t in threads:
        columns += [f"decode tok/s, {t}t", f"/ ORT fp32, {t}t"]
    columns += [f"prefill tok/s, {most}t", f"peak RSS MB, {most}t"]
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for row in rows:
        kld = "reference" if row.kld is None else f"{row.kld.mean():.2e}"
        p99 = "" if row.kld is None else f"{np.quantile(row.kld, 0.99):.2e}"
        cells = [row.name, f"{row.file_bytes / 1e6:.1f}", kld, p99]
        for t in threads:
            decode = med(row.name, t, "decode_tokens_per_s")
            cells += [f"{decode:.1f}", f"{decode / med('ORT fp32', t, 'decode_tokens_per_s'):.2f}x"]
        cells += [f"{med(row.name, most, 'prefill_tokens_per_s'):.0f}", f"{med(row.name, most, 'peak_rss_bytes') / 1e6:.0f}"]
        table.add_row(*cells)
    console = Console(width=220)
    console.print(table)
    console.print(f"load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
                  f"after: {', '.join(f'{x:.2f}' for x in load_after)}; {len(os.sched_getaffinity(0))} cores")


if __name__ == "__main__":
    sys.exit(main())
