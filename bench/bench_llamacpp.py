"""llama.cpp on the default model, side by side: the engine noise floor (torch float32 vs llama.cpp
F32 over the same tokens), then for each GGUF type its size, quality against the torch baseline,
decode speed through quantgate's engine and through a bare llama-cpp-python generation loop on
the same file, and the fraction of the memory-bandwidth roofline it reaches.

Run with `make bench-llamacpp` (needs llama-cpp-python: `pip install -e '.[llamacpp]'`).
Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from quantgate.economics import measure, memory_bandwidth, roofline_fraction
from quantgate.engines.llamacpp import LlamaCppEngine
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import default_suite
from quantgate.evals.tasks import kl_divergence, make_windows
from quantgate.methods.gguf_quant import quantize_gguf, tensor_types
from quantgate.models.gguf_export import write_gguf
from quantgate.models.load import load_baseline, locate_packaged

OUT = Path(__file__).resolve().parent / "out"
TYPES = ("F32", "Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K")


def bare_decode_tokens_per_s(path: Path, prompt: list[int], new_tokens: int) -> float:
    """llama-cpp-python alone: Llama.generate with greedy sampling, no quantgate code involved."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
    for _ in zip(range(8), llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
        pass  # warm-up: weights paged in, as they are for the harness after its quality pass
    gen = llm.generate(prompt, top_k=1, temp=0.0, reset=True)
    next(gen)  # prefill + first token
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        next(gen)
    return (new_tokens - 1) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--new-tokens", type=int, default=96)
    args = ap.parse_args()
    baseline = load_baseline("smollm2-135m-instruct")
    tok = baseline.tokenizer
    OUT.mkdir(exist_ok=True)
    f32 = write_gguf(baseline.model, baseline.arch, locate_packaged("smollm2-135m-instruct"), OUT / "F32.gguf")
    text = default_suite(limit=1, cloze_items=0, seed=0).perplexity_text
    windows = make_windows(tok, text, 256, 8)
    reference = list(TorchEngine(baseline.model).token_logprobs(windows))
    prompts = [w[:64] for w in windows[:4]]  # fixed requests: 64-token prompts
    bandwidth = memory_bandwidth()

    rows = []
    for gguf_type in TYPES:
        path = f32 if gguf_type == "F32" else quantize_gguf(f32, OUT / f"{gguf_type}.gguf", gguf_type)
        engine = LlamaCppEngine(path, n_ctx=512)
        lps = list(engine.token_logprobs(windows))
        kld = np.concatenate([kl_divergence(r, lp) for r, lp in zip(reference, lps)])
        top1 = np.concatenate([(r.argmax(-1) == lp.argmax(-1)).numpy() for r, lp in zip(reference, lps)])
        speed = measure(engine, prompts, args.new_tokens)
        bare = bare_decode_tokens_per_s(path, prompts[0], args.new_tokens)
        rows.append((gguf_type, path.stat().st_size, kld, top1.mean(), speed, bare))
        print(f"{gguf_type}: done", file=sys.stderr, flush=True)

    console = Console(width=170)
    _, _, floor_kld, floor_top1, _, _ = rows[0]
    console.print(f"engine noise floor (torch float32 vs llama.cpp F32, {len(floor_kld)} tokens): "
                  f"KLD mean {floor_kld.mean():.2e}, p99 {np.quantile(floor_kld, 0.99):.2e}, "
                  f"top-1 agreement {floor_top1:.4f}; memory bandwidth {bandwidth / 1e9:.1f} GB/s")
    table = Table(title=f"llama.cpp on the default model: quality vs torch float32, batch-1 speed "
                        f"({args.new_tokens} new tokens after 64-token prompts)")
    for col in ("type", "MB", "KLD mean", "KLD p99", "top-1", "prefill tok/s", "decode tok/s",
                "decode / F32", "bare loop tok/s", "harness / bare", "latency p50/p95/p99 s", "roofline"):
        table.add_column(col, justify="left" if col == "type" else "right")
    f32_decode = rows[0][4].decode_tokens_per_s
    for gguf_type, size, kld, top1, speed, bare in rows:
        lat = speed.latency_s
        table.add_row(
            gguf_type, f"{size / 1e6:.1f}", f"{kld.mean():.2e}", f"{np.quantile(kld, 0.99):.2e}", f"{top1:.1%}",
            f"{speed.prefill_tokens_per_s:.0f}", f"{speed.decode_tokens_per_s:.1f}",
            f"{speed.decode_tokens_per_s / f32_decode:.2f}x", f"{bare:.1f}",
            f"{speed.decode_tokens_per_s / bare:.2f}", f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f}",
            f"{roofline_fraction(speed.decode_tokens_per_s, size, bandwidth):.0%}",
        )
    console.print(table)
    for gguf_type, *_ in rows:
        counts = tensor_types(OUT / f"{gguf_type}.gguf")
        console.print(f"{gguf_type:7s} tensors by stored type: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
