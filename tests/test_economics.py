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
    if t.decode_range is not None:  # the pooled rate (total tokens / total time) lies within the requests'
        lo, hi = t.decode_range
        assert lo <= t.decode_tokens_per_s * (1 + 1e-9) and t.decode_tokens_per_s <= hi * (1 + 1e-9)


def test_memory_bandwidth_is_plausible():
    assert 1e8 < memory_bandwidth(megabytes=16, repeats=2) < 1e13


def test_batch_sizes_double_up_to_the_maximum():
    from quantgate.economics import batch_sizes

    assert batch_sizes(1) == [1]
    assert batch_sizes(16) == [1, 2, 4, 8, 16]
    assert batch_sizes(6) == [1, 2, 4, 6]


def test_load_levels_batch_on_the_torch_engine(tiny_llama, torch_single_thread):
    from quantgate.economics import load_levels
    from quantgate.engines.torch import TorchEngine

    engine = TorchEngine(tiny_llama)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    levels = load_levels(engine, prompts, 6, [1, 2, 4])
    assert [(lv.batch_size, lv.batched) for lv in levels] == [(1, True), (2, True), (4, True)]
    assert all(lv.tokens_per_s > 0 and lv.latency_s["p50"] <= lv.latency_s["p99"] for lv in levels)
    # batching changes nothing but padding: greedy outputs equal one-at-a-time generation
    batched = engine.generate_batch(prompts, 6)
    assert [len(b) for b in batched] == [6, 6]  # no stopping under load
    for p, b in zip(prompts, batched):
        single = engine.generate([p], 6)[0]  # may end early at end-of-sequence
        assert b[: len(single)] == single


def test_cost_at_volume_prices_machine_time():
    from quantgate.economics import cost_at_volume

    # 100 tokens/s -> 360k tokens per hour; at 0.36 an hour that is 1.00 per 1M tokens
    c = cost_at_volume(100.0, 50.0, cost_per_hour=0.36, tokens_per_month=36e6, min_saving=10.0)
    assert abs(c.per_million_tokens - 1.0) < 1e-12
    assert abs(c.monthly - 36.0) < 1e-9  # 100 machine-hours
    assert abs(c.monthly_saving - 36.0) < 1e-9  # the baseline needs 200 hours
    assert c.worth_it and "saves" in c.note
    cheap = cost_at_volume(100.0, 90.0, cost_per_hour=0.36, tokens_per_month=36e6, min_saving=10.0)
    assert not cheap.worth_it and "already cheap enough at your volume" in cheap.note
