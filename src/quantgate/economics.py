"""Model-on-engine economics measured through the engine interface: prefill and decode speed,
request latency percentiles, and how close decoding runs to the memory-bandwidth roofline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from quantgate.engines.base import Engine


@dataclass(frozen=True)
class Throughput:
    prefill_tokens_per_s: float  # prompt tokens per second (time to the first new token)
    decode_tokens_per_s: float  # new tokens per second after the first, batch 1
    latency_s: dict[str, float]  # p50 / p95 / p99 of whole-request latency over the prompts
    new_tokens: int  # tokens generated in total (generation may end early at end-of-sequence)


def measure(engine: Engine, prompts: Sequence[Sequence[int]], new_tokens: int) -> Throughput:
    """Generate greedily for each prompt twice — 1 token (prefill) and `new_tokens` (the request)
    — at batch 1. Decode speed = extra tokens / extra time, summed over the prompts."""
    prefill_time = decode_time = 0.0
    prompt_tokens = decoded = 0
    latencies = []
    for prompt in prompts:
        t0 = time.perf_counter()
        engine.generate([prompt], 1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = engine.generate([prompt], new_tokens)[0]
        whole = time.perf_counter() - t0
        prefill_time += first
        prompt_tokens += len(prompt)
        decode_time += max(whole - first, 1e-9)
        decoded += len(out) - 1
        latencies.append(whole)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return Throughput(
        prefill_tokens_per_s=prompt_tokens / prefill_time,
        decode_tokens_per_s=decoded / decode_time if decoded else float("nan"),
        latency_s={"p50": float(p50), "p95": float(p95), "p99": float(p99)},
        new_tokens=decoded + len(prompts),
    )


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Measured copy bandwidth of this machine in bytes/s (read + write of a large array, best of
    `repeats`). A copy pays for its writes too, so read-only streaming (what decoding does) can
    run faster: a roofline fraction above 100% means this bound is conservative, not broken."""
    src = np.ones(megabytes * (1 << 20) // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = min(_timed_copy(src, dst) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed_copy(src: np.ndarray, dst: np.ndarray) -> float:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def roofline_fraction(decode_tokens_per_s: float, bytes_per_token: int, bandwidth: float) -> float:
    """Decode speed as a fraction of the bandwidth bound: every weight byte is read once per
    generated token at batch 1, so the bound is bandwidth / bytes_per_token tokens per second."""
    return decode_tokens_per_s * bytes_per_token / bandwidth
