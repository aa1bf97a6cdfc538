from __future__ import annotations

import math

import pytest

from quantgate.economics import measure_round, memory_bandwidth, roofline_fraction
from quantgate.engines.torch import TorchEngine


def test_roofline_fraction_is_decode_speed_over_the_bandwidth_bound():
    # 100 MB per token at 10 GB/s allows 100 tokens/s; 50 tokens/s is half of it
    assert roofline_fraction(50.0, 100_000_000, 10e9) == pytest.approx(0.5)


def test_a_round_times_each_request_and_its_first_token(tiny_llama, torch_single_thread):
    prompts = [[1, 5, 9, 12], [1, 7, 7, 3, 4, 8]]
    r = measure_round(TorchEngine(tiny_llama), prompts, new_tokens=6, sizes=[1, 2])
    assert r.prompt_tokens == (4, 6) and all(0 <= n <= 5 for n in r.decoded)  # may end early at end-of-sequence
    assert all(w >= p > 0 for w, p in zip(r.latency_s, r.prefill_s))
    rates = r.decode_rates()
    assert all(math.isnan(x) if n == 0 else x > 0 for x, n in zip(rates, r.decoded))
    assert (r.prefill_rates() > 0).all()
    assert [(lv.batch_size, lv.batched) for lv in r.load] == [(1, True), (2, True)]  # torch batches


def test_memory_bandwidth_is_plausible():
    assert 1e8 < memory_bandwidth(megabytes=16, repeats=2) < 1e13


def test_batch_sizes_double_up_to_the_maximum():
    from quantgate.economics import batch_sizes

    assert batch_sizes(1) == [1]
    assert batch_sizes(16) == [1, 2, 4, 8, 16]
    assert batch_sizes(6) == [1, 2, 4, 6]


def test_load_levels_batch_on_the_torch_engine(tiny_llama, torch_single_thread):
    from quantgate.economics import batched_load
    from quantgate.engines.torch import TorchEngine

    engine = TorchEngine(tiny_llama)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    levels = batched_load(engine, prompts, 6, [1, 2, 4])
    assert [(lv.batch_size, lv.batched) for lv in levels] == [(1, True), (2, True), (4, True)]
    assert all(lv.tokens_per_s > 0 and len(set(lv.latency_s)) == 1 and lv.tokens == 6 * lv.batch_size
               for lv in levels)
    # batching changes nothing but padding: greedy outputs equal one-at-a-time generation
    batched = engine.generate_batch(prompts, 6)
    assert [len(b) for b in batched] == [6, 6]  # no stopping under load
    for p, b in zip(prompts, batched):
        single = engine.generate([p], 6)[0]  # may end early at end-of-sequence
        assert b[: len(single)] == single


def test_queued_load_is_the_round_s_requests_one_after_another():
    from quantgate.economics import queued_load

    levels = queued_load([1.0, 2.0, 3.0], [10, 20, 30], [1, 2, 4])
    assert [lv.latency_s for lv in levels] == [(1.0,), (1.0, 3.0), (1.0, 3.0, 6.0, 7.0)]  # the mix repeated
    assert [lv.tokens_per_s for lv in levels] == [10.0, 10.0, 70 / 7]
    assert not any(lv.batched for lv in levels)


def test_cost_at_volume_prices_machine_time():
    from quantgate.economics import Estimate, cost_at_volume

    # 100 tokens/s -> 360k tokens per hour; at 0.36 an hour that is 1.00 per 1M tokens
    c = cost_at_volume(Estimate(100.0, (100.0, 100.0)), Estimate(50.0, (50.0, 50.0)), Estimate(2.0, (2.0, 2.0)),
                       cost_per_hour=0.36, tokens_per_month=36e6, min_saving=10.0)
    assert abs(c.per_million_tokens.value - 1.0) < 1e-12
    assert abs(c.monthly.value - 36.0) < 1e-9  # 100 machine-hours
    assert abs(c.monthly_saving.value - 36.0) < 1e-9  # the baseline needs 200 hours
    assert c.worth_it and "saves" in c.note
