"""Model-on-engine economics measured through the engine interface: prefill and decode speed,
request latency percentiles, and how close decoding runs to the memory-bandwidth roofline."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from quantgate.engines.base import Engine

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Throughput:
    prefill_tokens_per_s: float  # prompt tokens per second (time to the first new token)
    decode_tokens_per_s: float  # new tokens per second after the first, batch 1
    latency_s: dict[str, float]  # p50 / p95 / p99 of whole-request latency over the prompts
    new_tokens: int  # tokens generated in total (generation may end early at end-of-sequence)
    # slowest and fastest single request's decode tokens/s: how far one short request is from the
    # pooled number above (on a shared machine, often 10% either way); None where not measured
    decode_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.decode_range is not None:  # from JSON (a list) or a child process
            object.__setattr__(self, "decode_range", tuple(self.decode_range))


@dataclass(frozen=True)
class Economics:
    """A model on its engine. For fake-quantized candidates (simulated=True) only the quality is
    real: the weights are still float32, so no speed or memory of theirs is measured."""

    engine: str
    simulated: bool
    artifact_bytes: int | None  # the file the engine loads (GGUF), None when nothing is written
    peak_rss_bytes: int | None  # peak resident memory of the engine's own process
    throughput: Throughput | None
    roofline_fraction: float | None  # decode tokens/s x bytes per token / memory bandwidth
    load: tuple[LoadLevel, ...] = ()  # batch sizes 1 .. serving.max_batch_size
    cost: Cost | None = None  # at economics.tokens_per_month, when a price is configured

    @property
    def tokens_per_s_under_load(self) -> float | None:
        """Generated tokens/s at the largest batch size measured."""
        return self.load[-1].tokens_per_s if self.load else None


def measure(engine: Engine, prompts: Sequence[Sequence[int]], new_tokens: int) -> Throughput:
    """Generate greedily for each prompt twice — 1 token (prefill) and `new_tokens` (the request)
    — at batch 1. Decode speed = extra tokens / extra time, summed over the prompts. One untimed
    request first: a serving engine is warm (its mapped weights paged in, its threads started),
    and the first timed prefill would otherwise carry the page faults of every weight."""
    engine.generate([prompts[0]], 2)
    prefill_time = decode_time = 0.0
    prompt_tokens = decoded = 0
    latencies, rates = [], []
    for prompt in prompts:
        t0 = time.perf_counter()
        engine.generate([prompt], 1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = engine.generate([prompt], new_tokens)[0]
        whole = time.perf_counter() - t0
        decoding = max(whole - first, 1e-9)
        prefill_time += first
        prompt_tokens += len(prompt)
        decode_time += decoding
        decoded += len(out) - 1
        latencies.append(whole)
        if len(out) > 1:
            rates.append((len(out) - 1) / decoding)
    return Throughput(
        prefill_tokens_per_s=prompt_tokens / prefill_time,
        decode_tokens_per_s=decoded / decode_time if decoded else float("nan"),
        latency_s=percentiles(latencies),
        new_tokens=decoded + len(prompts),
        decode_range=(min(rates), max(rates)) if rates else None,
    )


def percentiles(xs: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 of `xs` (the percentiles every latency figure reports)."""
    p50, p95, p99 = np.percentile(xs, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


@dataclass(frozen=True)
class LoadLevel:
    """The fixed request mix served `batch_size` requests at a time (for a server: with that many
    requests in flight at once)."""

    batch_size: int
    batched: bool  # True: served together (one forward, or a server's own batching); False: requests queue
    latency_s: dict[str, float]  # p50 / p95 / p99 of request latency (queueing included)
    tokens_per_s: float  # generated tokens per second over the whole load
    # Streamed from a server: time to the first text (p50 / p95 / p99), requests sent, their rate,
    # and the tokens generated (the server's usage count, else streamed events). None elsewhere.
    ttft_s: dict[str, float] | None = None
    requests: int | None = None
    requests_per_s: float | None = None
    new_tokens: int | None = None
    # Replicas of one served model: batch_size requests in flight on each; tokens_per_s is the
    # fleet's, and this each replica's share of it (None: one server)
    replica_tokens_per_s: tuple[float, ...] | None = None


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def load_levels(engine: Engine, prompts: Sequence[Sequence[int]], new_tokens: int,
                sizes: Sequence[int]) -> list[LoadLevel]:
    """For each batch size B: B requests (the mix, repeated as needed) arrive together. An engine
    with `generate_batch` serves them in one batch (every request's latency is the batch's);
    otherwise they queue and request i waits for the i before it."""
    levels = []
    for b in sizes:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        batched = hasattr(engine, "generate_batch")
        if batched:
            t0 = time.perf_counter()
            engine.generate_batch(batch, new_tokens)
            latencies = [time.perf_counter() - t0] * b
        else:
            latencies, t0 = [], time.perf_counter()
            for prompt in batch:  # no stop ids: generation may still end early at end-of-sequence
                engine.generate([prompt], new_tokens)
                latencies.append(time.perf_counter() - t0)
        levels.append(LoadLevel(b, batched, percentiles(latencies), b * new_tokens / max(latencies)))
    return levels


@dataclass(frozen=True)
class Cost:
    per_million_tokens: float
    monthly: float
    monthly_saving: float  # versus the baseline; negative when the candidate costs more
    worth_it: bool | None  # None for the baseline itself
    note: str


def cost_at_volume(tokens_per_s: float, baseline_tokens_per_s: float, *, cost_per_hour: float,
                   tokens_per_month: float, min_saving: float) -> Cost:
    """Machine time to serve the monthly volume at the measured throughput under load, priced
    by the hour: cost per 1M tokens = price per hour / (tokens per hour / 1e6)."""
    def monthly(tps: float) -> float:
        return tokens_per_month / (tps * 3600) * cost_per_hour

    saving = monthly(baseline_tokens_per_s) - monthly(tokens_per_s)
    worth = saving >= min_saving
    note = (f"saves {saving:,.2f} a month" if worth else
            f"already cheap enough at your volume: saves {saving:,.2f} a month (under {min_saving:,.2f})")
    return Cost(cost_per_hour / (tokens_per_s * 3600) * 1e6, monthly(tokens_per_s), saving, worth, note)


def memory_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Measured read bandwidth of this machine in bytes/s: a sum over a large float32 array on
    every intra-op thread torch has (best of `repeats`, after one warm-up pass). Batch-1 decoding
    streams the weights in the same way (read-only, all cores), so this is the ceiling its speed
    is compared with. On the 2-core machine this was written on it reads 40-46 GB/s where a
    single-threaded copy gave 36-37, which had put llama.cpp's F32 decode at 121% of the bound.
    Shared machines vary by tens of percent from minute to minute: read fractions near 100% as
    "at the bound", not as a precise number."""
    import torch

    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    x.sum()  # pages faulted in, threads started
    return x.numel() * 4 / min(_timed_sum(x) for _ in range(repeats))


def _timed_sum(x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    x.sum()
    return time.perf_counter() - t0


def roofline_fraction(decode_tokens_per_s: float, bytes_per_token: int, bandwidth: float) -> float:
    """Decode speed as a fraction of the bandwidth bound: every weight byte is read once per
    generated token at batch 1, so the bound is bandwidth / bytes_per_token tokens per second."""
    return decode_tokens_per_s * bytes_per_token / bandwidth
