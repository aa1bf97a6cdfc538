"""llama.cpp on the default model, side by side: the engine noise floor (torch float32 vs llama.cpp
F32 over the same tokens), then for each GGUF type its size, quality against the torch baseline,
and its speed measured the way `quantgate run` measures it (economics.interleaved: interleaved
rounds F32, Q8_0, ..., F32, Q8_0, ..., a fresh engine process in the serving configuration each
round; medians with bootstrap intervals; ratios to F32 paired by round and prompt). The words
follow the intervals: "faster" only when the ratio's whole interval is above 1, else "no
measurable difference at this noise". Q4_K_M + imatrix has the same tensor types as Q4_K_M, so
its ratio to Q4_K_M is the bench's own A/A-like check.

Optionally (--bare) a bare llama-cpp-python generation loop on the same files, in a fresh process
each, to see what quantgate's harness costs.

Run with `make bench-llamacpp` (needs llama-cpp-python). Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from quantgate import economics as ec
from quantgate.config import DEFAULT_ROUNDS, CalibrationConfig
from quantgate.engines.llamacpp import LlamaCppEngine
from quantgate.engines.process import EngineProcess
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import default_suite
from quantgate.evals.tasks import kl_divergence, make_windows
from quantgate.methods.calibrate import calibration_set
from quantgate.methods.gguf_quant import float_gguf, quantized_gguf, tensor_types
from quantgate.models.load import load_baseline
from quantgate.report.view import NO_DIFFERENCE

TYPES = ("F32", "Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")
IMATRIX = "Q4_K_M+imatrix"


def bare_decode(path: str, prompt: list[int], new_tokens: int) -> float:
    """llama-cpp-python alone (run in its own process): tokens/s after the first new token. Same
    thread count as the harness (every core this process may use); llama-cpp-python's own default
    is half the cores, which on this 2-core machine made the bare loop 1-thread and F32 29% slower."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=len(prompt) + new_tokens + 1, n_threads=len(os.sched_getaffinity(0)),
                verbose=False, seed=0)
    for _ in zip(range(8), llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
        pass  # warm-up: weights paged in, as they are for the harness
    gen = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
    next(gen)  # prefill + first token
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(gen)
    return (new_tokens - 1) / (time.perf_counter() - t0)


def bare_in_subprocess(path: Path, prompt: list[int], new_tokens: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--bare", str(path), json.dumps(prompt), str(new_tokens)],
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def quality(path: Path, windows: list[list[int]], reference: list) -> tuple[np.ndarray, float]:
    engine = LlamaCppEngine(path, n_ctx=512)
    lps = [engine.window_logprobs(w) for w in windows]
    import torch

    kld = np.concatenate([kl_divergence(r, torch.from_numpy(lp)) for r, lp in zip(reference, lps)])
    top1 = np.concatenate([(r.argmax(-1).numpy() == lp.argmax(-1)) for r, lp in zip(reference, lps)])
    return kld, float(top1.mean())


def opener(path: Path, n_ctx: int, log: Path) -> ec.Opener:
    """quantgate's serving path for a GGUF file: an engine process, only the last logits kept."""
    return lambda threads: EngineProcess("llamacpp", label=path.stem, log=log, path=str(path), n_ctx=n_ctx,
                                         logits_all=False, threads=threads)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--requests", type=int, default=4, help="64-token prompts per round")
    ap.add_argument("--types", nargs="+", default=list(TYPES), help="GGUF types besides F32 (the reference)")
    ap.add_argument("--no-imatrix", action="store_true", help=f"leave out {IMATRIX}")
    ap.add_argument("--samples", type=int, default=128, help="importance-matrix calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: the idle cores)")
    ap.add_argument("--bare", action="store_true", help="also time a bare llama-cpp-python loop per type")
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap replicates")
    args = ap.parse_args()
    baseline = load_baseline("smollm2-135m-instruct")
    suite = default_suite(limit=1, cloze_items=0, seed=0)
    windows = make_windows(baseline.tokenizer, suite.perplexity_text, 256, 8)
    reference = list(TorchEngine(baseline.model).token_logprobs(windows))
    prompts = [w[:64] for w in windows[: args.requests]]  # the fixed request mix: 64-token prompts
    types = ["F32", *(t for t in args.types if t != "F32")]
    paths = {t: float_gguf(baseline) if t == "F32" else quantized_gguf(baseline, t) for t in types}
    if not args.no_imatrix and "Q4_K_M" in paths:
        calib = calibration_set(baseline.tokenizer, CalibrationConfig(samples=args.samples, seq_len=args.seq_len),
                                suite.texts())
        paths[IMATRIX] = quantized_gguf(baseline, "Q4_K_M", calib)
    quality_rows = {t: quality(p, windows, reference) for t, p in paths.items()}
    del baseline, reference  # the speed runs happen in their own processes; free this one's memory
    bandwidth = ec.memory_bandwidth()
    logs = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    n_ctx = 64 + args.new_tokens + 1
    threads = ec.serving_threads(args.threads)
    rounds = ec.interleaved({t: opener(p, n_ctx, logs / f"{t}.log") for t, p in paths.items()}, rounds=args.rounds,
                            warm=False, prompts=prompts, new_tokens=args.new_tokens, sizes=[1], threads=threads,
                            on_round=lambda n: print(".", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    boot = ec.Bootstrap(0.95, args.boot, 0)
    summaries = ec.summarize(rounds.samples, "F32", boot)
    pair = ec.summarize({k: rounds.samples[k] for k in ("Q4_K_M", IMATRIX)}, "Q4_K_M", boot) \
        if IMATRIX in rounds.samples and "Q4_K_M" in rounds.samples else None
    bare = {t: float(np.median([bare_in_subprocess(p, prompts[0], args.new_tokens) for _ in range(args.rounds)]))
            for t, p in paths.items()} if args.bare else {}
    render(paths, quality_rows, summaries, pair, bare, rounds, bandwidth, args)
    return 0


def word(r: ec.Estimate, good: str, bad: str) -> str:
    how = r.compared()
    return good if how == "better" else bad if how == "worse" else NO_DIFFERENCE


def est(e: ec.Estimate, fmt: str = ".1f") -> str:
    return f"{e.value:{fmt}} [{e.ci[0]:{fmt}}, {e.ci[1]:{fmt}}]"


def render(paths: dict, quality_rows: dict, summaries: dict[str, ec.Summary], pair, bare: dict, rounds: ec.Rounds,
           bandwidth: float, args: argparse.Namespace) -> None:
    console = Console(width=220)
    floor_kld, floor_top1 = quality_rows["F32"]
    console.print(f"engine noise floor (torch float32 vs llama.cpp F32, {len(floor_kld)} tokens): "
                  f"KLD mean {floor_kld.mean():.2e}, p99 {np.quantile(floor_kld, 0.99):.2e}, "
                  f"top-1 agreement {floor_top1:.4f}; memory read bandwidth (all cores) {bandwidth / 1e9:.1f} GB/s")
    table = Table(title=f"llama.cpp on the default model: quality vs torch float32; batch 1, {args.requests} "
                        f"64-token prompts, {args.new_tokens} new tokens, {args.rounds} interleaved rounds of fresh "
                        "processes; medians [95% bootstrap intervals]; ratios paired by round and prompt")
    for col in ("type", "MB", "KLD mean", "KLD p99", "top-1", "prefill tok/s", "decode tok/s", "decode / F32",
                "in words", "latency p50 / p99 s", "peak RSS MB", "roofline", *(["bare loop tok/s"] if bare else [])):
        table.add_column(col, justify="left" if col in ("type", "in words") else "right")
    for t, path in paths.items():
        kld, top1 = quality_rows[t]
        s = summaries.get(t)
        if s is None:
            table.add_row(t, f"{path.stat().st_size / 1e6:.1f}", f"{kld.mean():.2e}", "", "", "engine failed: "
                          + rounds.failed.get(t, "?"))
            continue
        tp, r = s.throughput, s.vs_baseline
        lat = tp.latency_s
        vs = ("reference", "") if r is None else (f"×{est(r.decode, '.2f')}", word(r.decode, "faster", "slower"))
        table.add_row(
            t, f"{path.stat().st_size / 1e6:.1f}", f"{kld.mean():.2e}", f"{np.quantile(kld, 0.99):.2e}", f"{top1:.1%}",
            est(tp.prefill_tokens_per_s, ".0f"), est(tp.decode_tokens_per_s), *vs,
            f"{lat['p50'].value:.2f} / {lat['p99'].value:.2f}", f"{s.peak_rss_bytes.value / 1e6:.0f}",
            f"{ec.roofline_fraction(tp.decode_tokens_per_s.value, path.stat().st_size, bandwidth):.0%}",
            *([f"{bare[t]:.1f}"] if bare else []),
        )
    console.print(table)
    if pair is not None:
        r = pair[IMATRIX].vs_baseline.decode
        console.print(f"{IMATRIX} vs Q4_K_M (same tensor types, measured in the same rounds): decode ×{est(r, '.3f')}"
                      f" — {word(r, 'faster', 'slower')}")
    c = rounds.conditions
    console.print(f"measured on {c.cpu}, {c.threads} llama.cpp thread(s) of {c.cores} cores; load average before "
                  f"{', '.join(f'{x:.2f}' for x in c.load_before)}, after each round "
                  f"{', '.join(f'{x:.2f}' for x in c.load_during)}")
    if c.warning():
        console.print(f"warning: {c.warning()}")
    for t, path in paths.items():
        counts = tensor_types(path)
        console.print(f"{t:15s} tensors by stored type: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--bare":
        print(bare_decode(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])))
        sys.exit(0)
    sys.exit(main())
