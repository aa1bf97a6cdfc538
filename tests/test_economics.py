from __future__ import annotations

import math

import pytest

from quantgate.economics import measure, memory_bandwidth, roofline_fraction
from quantgate.engines.torch import TorchEngine


def test_roofline_fraction_is_decode_speed_over_the_bandwidth_bound():
    # 100 MB per token at 10 GB/s allows 100 tokens/s; 50 tokens/s is half of it
    assert roofline_fraction(50.0, 100_000_000, 10e9) == pytest.approx(0.5)


def test_measure_counts_tokens_and_orders_percentiles(tiny_llama, torch_single_thread):
    prompts = [[1, 5, 9, 12], [1, 7, 7, 3, 4, 8]]
    t = measure(TorchEngine(tiny_llama), prompts, new_tokens=6)
    assert t.prefill_tokens_per_s > 0 and (t.decode_tokens_per_s > 0 or math.isnan(t.decode_tokens_per_s))
    assert 2 <= t.new_tokens <= 12
    assert t.latency_s["p50"] <= t.latency_s["p95"] <= t.latency_s["p99"]


def test_memory_bandwidth_is_plausible():
    assert 1e8 < memory_bandwidth(megabytes=16, repeats=2) < 1e13
