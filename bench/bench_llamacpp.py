"""llama.cpp on the default model, side by side: the engine noise floor (torch float32 vs llama.cpp
F32 over the same tokens), then for each GGUF type its size, quality against the torch baseline,
and decode speed measured two ways on the same file, each in a fresh process:
  - harness: quantgate's own path (`quantgate run` uses it): an EngineProcess in the serving
    configuration running economics.measure over the fixed request mix;
  - bare: llama-cpp-python alone, Llama.generate with greedy sampling, no quantgate code.
Repeated `--rounds` times in alternating order; medians are shown. Also the fraction of the
memory-bandwidth roofline each type reaches.

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

from quantgate.economics import memory_bandwidth, roofline_fraction
from quantgate.engines.llamacpp import LlamaCppEngine
from quantgate.engines.process import EngineProcess
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import default_suite
from quantgate.evals.tasks import kl_divergence, make_windows
from quantgate.methods.gguf_quant import float_gguf, quantized_gguf, tensor_types
from quantgate.models.load import load_baseline

TYPES = ("F32", "Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")


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


def harness_decode(path: Path, prompts: list[list[int]], new_tokens: int, log: Path) -> dict:
    """quantgate's path: EngineProcess (serving configuration) + economics.measure."""
    n_ctx = max(map(len, prompts)) + new_tokens + 1
    with EngineProcess("llamacpp", label=path.stem, log=log, path=str(path), n_ctx=n_ctx, logits_all=False) as e:
        result, _ = e.measure(prompts, new_tokens)  # batch 1 only: no load levels
        result["peak_rss_bytes"] = e.close()["peak_rss_bytes"]
    return result


def quality(path: Path, windows: list[list[int]], reference: list) -> tuple[np.ndarray, float]:
    engine = LlamaCppEngine(path, n_ctx=512)
    lps = [engine.window_logprobs(w) for w in windows]
    import torch

    kld = np.concatenate([kl_divergence(r, torch.from_numpy(lp)) for r, lp in zip(reference, lps)])
    top1 = np.concatenate([(r.argmax(-1).numpy() == lp.argmax(-1)) for r, lp in zip(reference, lps)])
    return kld, float(top1.mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--types", nargs="+", default=list(TYPES), help="GGUF types besides F32 (the reference)")
    args = ap.parse_args()
    baseline = load_baseline("smollm2-135m-instruct")
    text = default_suite(limit=1, cloze_items=0, seed=0).perplexity_text
    windows = make_windows(baseline.tokenizer, text, 256, 8)
    reference = list(TorchEngine(baseline.model).token_logprobs(windows))
    prompts = [w[:64] for w in windows[:4]]  # the fixed request mix: four 64-token prompts
    types = ["F32", *(t for t in args.types if t != "F32")]
    paths = {t: float_gguf(baseline) if t == "F32" else quantized_gguf(baseline, t) for t in types}
    del baseline  # the speed runs below happen in their own processes; free this one's memory
    bandwidth = memory_bandwidth()
    rows = {}
    logs = Path(tempfile.mkdtemp(prefix="bench-llamacpp-"))
    for t, path in paths.items():
        kld, top1 = quality(path, windows, reference)
        harness, bare = [], []
        for r in range(args.rounds):  # alternate which goes first, so neither always runs warmer
            runs = [lambda: harness.append(harness_decode(path, prompts, args.new_tokens, logs / f"{t}.log")),
                    lambda: bare.append(bare_in_subprocess(path, prompts[0], args.new_tokens))]
            for run in runs if r % 2 == 0 else runs[::-1]:
                run()
        rows[t] = (path.stat().st_size, kld, top1, harness, float(np.median(bare)))
        print(f"{t}: done", file=sys.stderr, flush=True)
    render(rows, paths, bandwidth, args)
    return 0


def render(rows: dict, paths: dict, bandwidth: float, args: argparse.Namespace) -> None:
    console = Console(width=200)
    _, floor_kld, floor_top1, _, _ = rows["F32"]
    console.print(f"engine noise floor (torch float32 vs llama.cpp F32, {len(floor_kld)} tokens): "
                  f"KLD mean {floor_kld.mean():.2e}, p99 {np.quantile(floor_kld, 0.99):.2e}, "
                  f"top-1 agreement {floor_top1:.4f}; memory read bandwidth (all cores) {bandwidth / 1e9:.1f} GB/s")
    table = Table(title=f"llama.cpp on the default model: quality vs torch float32; batch-1 decode after 64-token "
                        f"prompts, {args.new_tokens} new tokens, median of {args.rounds} fresh processes each")
    for col in ("type", "MB", "KLD mean", "KLD p99", "top-1", "prefill tok/s", "decode tok/s", "decode / F32",
                "bare loop tok/s", "harness / bare", "latency p50/p95/p99 s", "peak RSS MB", "roofline"):
        table.add_column(col, justify="left" if col == "type" else "right")
    med = lambda runs, key: float(np.median([r[key] for r in runs]))  # noqa: E731
    f32_decode = med(rows["F32"][3], "decode_tokens_per_s")
    for t, (size, kld, top1, harness, bare) in rows.items():
        decode = med(harness, "decode_tokens_per_s")
        lat = harness[len(harness) // 2]["latency_s"]
        table.add_row(
            t, f"{size / 1e6:.1f}", f"{kld.mean():.2e}", f"{np.quantile(kld, 0.99):.2e}", f"{top1:.1%}",
            f"{med(harness, 'prefill_tokens_per_s'):.0f}", f"{decode:.1f}", f"{decode / f32_decode:.2f}x",
            f"{bare:.1f}", f"{decode / bare:.2f}", f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f}",
            f"{med(harness, 'peak_rss_bytes') / 1e6:.0f}", f"{roofline_fraction(decode, size, bandwidth):.0%}",
        )
    console.print(table)
    for t, path in paths.items():
        counts = tensor_types(path)
        console.print(f"{t:7s} tensors by stored type: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--bare":
        print(bare_decode(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])))
        sys.exit(0)
    sys.exit(main())
