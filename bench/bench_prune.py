"""Pruning on the default model, side by side.

1. Quality (torch, float32): magnitude vs Wanda vs SparseGPT at 50% unstructured sparsity and
   2:4, structured pruning (25% of MLP neurons; one of the three KV groups per layer), and Wanda
   50% followed by GPTQ int4. KLD against the baseline on the default suite's held-out prose
   windows, top-1 agreement, recovery on the default suite and on PIQA items from ../shared/data.
2. Speed (llama.cpp): the baseline and the structurally pruned models written to GGUF F32 with
   quantgate's writer; batch-1 decode tokens/s through quantgate's llama.cpp engine and
   economics.measure_round, the models measured in alternation for several rounds (the median is
   reported) so that load from other processes hits them alike. llama.cpp runs one thread by
   default: on a shared machine a descheduled worker stalls every token of a multi-thread decode.

Run with `make bench-prune`. Prints tables; asserts nothing.
Calibration: the default offline prose pool (disjoint from the eval text), 128 × 256 tokens.
Unstructured sparsity is stored densely here (no sparse kernels): it saves neither bytes nor time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import harness
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from quantgate.methods.registry import candidate
from quantgate.economics import measure_round
from quantgate.engines.llamacpp import LlamaCppEngine
from quantgate.engines.torch import TorchEngine
from quantgate.evals.tasks import kl_divergence, make_windows
from quantgate.methods.apply import make_candidate, weight_bytes
from quantgate.models.gguf_export import write_gguf
from quantgate.models.load import locate_packaged

OUT = Path(__file__).resolve().parent / "out"

CANDIDATES = (
    candidate(prune="magnitude", sparsity=0.5),
    candidate(prune="wanda", sparsity=0.5),
    candidate(prune="sparsegpt", sparsity=0.5),
    candidate(prune="magnitude", pattern="2:4"),
    candidate(prune="wanda", pattern="2:4"),
    candidate(prune="sparsegpt", pattern="2:4"),
    candidate(prune="magnitude", sparsity=0.25, structure="mlp"),
    candidate(prune="wanda", sparsity=0.25, structure="mlp"),
    candidate(prune="wanda", sparsity=0.34, structure="heads"),  # 1 of 3 KV groups
    candidate(steps=[{"prune": "wanda", "sparsity": 0.5}, {"quantize": "gptq", "bits": 4, "group_size": 64}]),
)
SPEED = ("wanda-mlp25", "wanda-heads34")  # structured: measured on llama.cpp against the baseline


def shape_of(model: torch.nn.Module) -> str:
    cfg = model.config
    return f"ffn {cfg.intermediate_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}"


def quality(args, bench: harness.Bench) -> list[tuple]:
    """(candidate, seconds to make it, shape summary, bytes, {suite: Comparison}, model) per candidate."""
    rows = []
    for cand in [c for c in CANDIDATES if not args.only or c.label in args.only]:
        t0 = time.perf_counter()
        made = make_candidate(bench.baseline.model, bench.baseline.arch, cand, bench.calib, seed=0)
        seconds = time.perf_counter() - t0
        result = harness.compare_model(bench, made.model)
        rows.append((cand, seconds, shape_of(made.model), made.weight_bytes, result,
                     made.model if cand.label in SPEED else None))
        print(f"{cand.label}: {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows


def speed(args, baseline, models: dict[str, torch.nn.Module], windows: list[list[int]]) -> list[tuple]:
    """(name, GGUF bytes, decode tok/s per round, prefill tok/s median, llama.cpp KLD vs torch baseline)."""
    OUT.mkdir(exist_ok=True)
    meta = locate_packaged(harness.MODEL)
    paths = {"baseline": write_gguf(baseline.model, baseline.arch, meta, OUT / "prune-baseline-F32.gguf")}
    for name, model in models.items():
        paths[name] = write_gguf(model, baseline.arch, meta, OUT / f"prune-{name}-F32.gguf")
    reference = list(TorchEngine(baseline.model).token_logprobs(windows))
    engines = {name: LlamaCppEngine(path, n_ctx=512, threads=args.threads) for name, path in paths.items()}
    kld = {name: np.concatenate([kl_divergence(r, lp) for r, lp in zip(reference, e.token_logprobs(windows))]).mean()
           for name, e in engines.items()}
    prompts = [w[:64] for w in windows[: args.prompts]]
    decode = {name: [] for name in engines}
    prefill = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, engine in engines.items():
            r = measure_round(engine, prompts, args.new_tokens, sizes=[1])
            decode[name].append(float(np.nanmedian(r.decode_rates())))
            prefill[name].append(float(np.nanmedian(r.prefill_rates())))
        print(f"speed round {len(decode['baseline'])}/{args.rounds}", file=sys.stderr, flush=True)
    return [(n, paths[n].stat().st_size, decode[n], statistics.median(prefill[n]), kld[n]) for n in engines]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    harness.add_arguments(ap)
    ap.add_argument("--rounds", type=int, default=7, help="alternating llama.cpp speed rounds")
    ap.add_argument("--prompts", type=int, default=2, help="64-token prompts per round")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    ap.add_argument("--only", nargs="*", help="candidate labels to run (default: all)")
    args = ap.parse_args()
    bench = harness.setup(args)
    if bench is None:
        return 2
    baseline, calib = bench.baseline, bench.calib
    rows = quality(args, bench)
    console = Console(width=170)
    table = Table(title=f"pruning the default model: quality vs the float32 baseline ({calib.windows.shape[0]} × "
                        f"{calib.windows.shape[1]} calibration tokens; KLD on {len(bench.prepared['default'].windows)} "
                        f"held-out prose windows of 256 tokens)")
    for col in ("candidate", "make s", "shape", "weights MB", "KLD mean", "KLD p99", "top-1", "recovery default",
                f"recovery piqa[{args.piqa}]", "flips default", "flips piqa"):
        table.add_column(col, justify="left" if col in ("candidate", "shape") else "right")
    table.add_row("baseline", "—", shape_of(baseline.model), f"{weight_bytes(baseline.model)[0] / 1e6:.1f}",
                  "—", "—", "—", "1.0000", "1.0000", "—", "—")
    for cand, seconds, shape, nbytes, result, _ in rows:
        d, q = result["default"], result["piqa"]
        table.add_row(cand.label, f"{seconds:.0f}", shape, f"{nbytes / 1e6:.1f}", f"{d.kld.mean:.4f}",
                      f"{d.kld.quantile:.3f}", f"{d.top1_agreement:.1%}", f"{d.recovery:.4f}", f"{q.recovery:.4f}",
                      f"{d.flips.rate:.1%}", f"{q.flips.rate:.1%}")
    console.print(table)

    models = {cand.label: model for cand, *_, model in rows if model is not None}
    if not models:
        return 0
    windows = make_windows(baseline.tokenizer, bench.suites["default"].perplexity_text, 256, 8)
    measured = speed(args, baseline, models, windows)
    base_decode = statistics.median(measured[0][2])
    table = Table(title=f"llama.cpp, GGUF F32, batch 1, {args.threads} thread(s): decode after {args.prompts} "
                        f"64-token prompts ({args.new_tokens} new tokens each), {args.rounds} alternating rounds "
                        f"(LlamaCppEngine + economics.measure_round)")
    for col in ("model", "GGUF MB", "decode tok/s (median)", "per round", "decode / baseline", "prefill tok/s",
                "KLD vs torch baseline"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, size, decode, prefill, kld in measured:
        med = statistics.median(decode)
        table.add_row(name, f"{size / 1e6:.1f}", f"{med:.1f}", " ".join(f"{x:.1f}" for x in decode),
                      f"{med / base_decode:.2f}x", f"{prefill:.0f}", f"{kld:.2e}")
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
