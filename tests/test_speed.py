"""Economics with intervals: a fake engine whose speed is drawn from a known distribution, timed on
a fake clock, through the real economics stage (interleaved rounds, economics.summarize): the
intervals cover the true ratio at about the nominal rate, an A/A pair is "no measurable
difference", and the words, costs and gate rules follow the intervals."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

from quantgate import economics as ec
from quantgate.config import DEFAULT_ROUNDS, EconomicsConfig, QualityGateConfig, RunConfig
from quantgate.evals import stats
from quantgate.gate import CandidateVerdict, RuleKind, decide, judge_economics

PROMPTS = [[1] * 64] * 4  # the default mix: 4 prompts of 64 tokens
NEW_TOKENS = 32
SIZES = [1, 2, 4]
SIGMA = 0.1  # per-request multiplicative noise (log scale)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeEngine:
    """Greedy generation that takes time on a fake clock: prefill at `prefill_rate` prompt
    tokens/s and decoding at `decode_rate` tokens/s, each request's times scaled by its own
    log-normal draw (median 1): the true median speeds are the rates."""

    name = "fake"

    def __init__(self, clock: FakeClock, rng: np.random.Generator, decode_rate: float, prefill_rate: float):
        self.clock, self.rng = clock, rng
        self.decode_rate, self.prefill_rate = decode_rate, prefill_rate

    def generate(self, prompts, max_new_tokens, stop_ids=(), on_token=None):
        for p in prompts:
            noise = math.exp(self.rng.normal(0.0, SIGMA))
            self.clock.now += noise * len(p) / self.prefill_rate
            for i in range(max_new_tokens):
                self.clock.now += noise / self.decode_rate if i else 0.0
                if on_token is not None:
                    on_token()
        return [[7] * max_new_tokens for _ in prompts]


class FakeServing:
    """economics.Serving over a FakeEngine (a fixed peak memory)."""

    def __init__(self, engine: FakeEngine, rss: int):
        self.engine, self.rss = engine, rss

    def measure_round(self, prompts, new_tokens, sizes):
        return ec.measure_round(self.engine, prompts, new_tokens, sizes, clock=self.engine.clock)

    def peak_rss_bytes(self):
        return self.rss


def fake_run(speedup: float, seed: int, rounds: int = DEFAULT_ROUNDS) -> dict[str, ec.Summary]:
    """Baseline (100 tokens/s decode) and one candidate `speedup` times as fast, in interleaved
    rounds on one fake clock; each model's Summary."""
    clock, rng = FakeClock(), np.random.default_rng(seed)
    rates = {"baseline": 100.0, "cand": 100.0 * speedup}
    openers = {label: (lambda threads, r=r: contextlib.nullcontext(
        FakeServing(FakeEngine(clock, rng, r, 20 * r), int(500e6 * 100 / r)))) for label, r in rates.items()}
    rounds_ = ec.interleaved(openers, rounds=rounds, warm=False, prompts=PROMPTS, new_tokens=NEW_TOKENS, sizes=SIZES,
                             threads=1)
    assert not rounds_.failed and [len(v) for v in rounds_.samples.values()] == [rounds, rounds]
    return ec.summarize(rounds_.samples, "baseline", ec.Bootstrap(0.95, 500, seed))


def covers(e: ec.Estimate, truth: float) -> bool:
    return e.ci[0] <= truth <= e.ci[1]


@pytest.mark.parametrize("speedup", [1.0, 1.5])
def test_intervals_cover_the_true_ratio_at_about_the_nominal_rate(speedup):
    """200 simulated runs at the default rounds: the 95% intervals of the decode ratio (units:
    requests) and of the throughput ratio at the largest batch size (units: rounds) hold the
    true ratio about 95% of the time (a binomial 200-run estimate: +-3 points is 2 SD; at 5
    units the bootstrap of a median runs a little short)."""
    decode = load = 0
    for seed in range(int(speedup * 1000), int(speedup * 1000) + 200):  # (other draws for each speedup)
        r = fake_run(speedup, seed)["cand"].vs_baseline
        decode += covers(r.decode, speedup)
        load += covers(r.under_load, speedup)
    assert 0.89 <= decode / 200 <= 0.99
    assert 0.86 <= load / 200 <= 0.99


def test_an_a_a_pair_is_no_measurable_difference_and_a_real_speedup_is_faster():
    aa = fake_run(1.0, seed=3)["cand"].vs_baseline
    assert covers(aa.decode, 1.0) and aa.decode.compared() == "same"
    assert aa.under_load.compared() == "same"
    fast = fake_run(1.5, seed=3)["cand"].vs_baseline
    assert fast.decode.compared() == "better" and fast.decode.ci[0] > 1.3
    assert fast.latency["p50"].compared(higher_is_better=False) == "better"
    assert fast.peak_rss.compared(higher_is_better=False) == "better"  # 500 MB / 1.5


def test_medians_and_percentiles_have_intervals_around_the_truth():
    s = fake_run(1.0, seed=5)["baseline"]
    t = s.throughput
    assert t.requests == DEFAULT_ROUNDS * len(PROMPTS)
    assert t.decode_tokens_per_s.ci[0] < 100.0 < t.decode_tokens_per_s.ci[1]
    assert t.prefill_tokens_per_s.ci[0] < 2000.0 < t.prefill_tokens_per_s.ci[1]
    p = t.latency_s
    assert p["p50"].value <= p["p95"].value <= p["p99"].value
    assert [lv.batch_size for lv in s.load] == SIZES and not s.load[0].batched
    assert s.load[-1].latency_s["p50"].value > s.load[0].latency_s["p50"].value  # queued requests wait
    assert s.peak_rss_bytes.value == 500e6 and s.vs_baseline is None


def test_rounds_are_interleaved_and_a_failing_engine_is_dropped_not_fatal():
    order = []

    class Broken:
        def measure_round(self, *a):
            raise RuntimeError("engine process ended (killed by signal 9)")

        def peak_rss_bytes(self):
            return None

    class Logged(FakeServing):
        def __init__(self, label, *a):
            super().__init__(*a)
            self.label = label

        def measure_round(self, *a):
            order.append(self.label)
            return super().measure_round(*a)

    clock, rng = FakeClock(), np.random.default_rng(0)
    openers = {label: (lambda threads, label=label: contextlib.nullcontext(
        Logged(label, FakeEngine(clock, rng, 100.0, 2000.0), 1))) for label in ("baseline", "a", "b")}
    openers["broken"] = lambda threads: contextlib.nullcontext(Broken())
    out = ec.interleaved(openers, rounds=3, warm=True, prompts=PROMPTS[:1], new_tokens=4, sizes=[1], threads=2)
    assert order == ["baseline", "a", "b"] * 3
    assert "killed by signal 9" in out.failed["broken"] and "broken" not in out.samples
    c = out.conditions
    assert (c.threads, c.rounds, len(c.load_during), c.interleaved) == (2, 3, 3, True) and c.cores >= 1 and c.cpu

    # one server up at a time (vLLM started here): each model's rounds back to back, a load
    # reading after each model's round
    order.clear()
    out = ec.interleaved(openers, rounds=3, warm=True, prompts=PROMPTS[:1], new_tokens=4, sizes=[1], threads=None,
                         interleave=False)
    assert order == ["baseline"] * 3 + ["a"] * 3 + ["b"] * 3
    assert [len(out.samples[k]) for k in ("baseline", "a", "b")] == [3, 3, 3] and "broken" in out.failed
    assert not out.conditions.interleaved and len(out.conditions.load_during) == 10  # 9 rounds + the broken one's


def test_too_few_measurements_give_no_interval_and_no_claim():
    boot = ec.Bootstrap(0.95, 200, 0)
    one = boot.ratio([100.0, float("nan")], [300.0, 310.0])  # one usable pair: 3x, but no interval
    assert one.value == 3.0 and all(math.isnan(v) for v in one.ci) and one.compared() == "same"
    assert all(math.isnan(v) for v in boot.quantile([5.0, 6.0]).ci)
    assert boot.quantile([5.0, 6.0, 7.0]).ci[0] <= 6.0


def test_paired_quantile_ratio_pairs_units_and_checks_its_input():
    rng = np.random.default_rng(0)
    shared = np.exp(rng.normal(0, 0.5, 40))  # a slow moment both saw: pairing cancels it
    base, cand = 100 * shared, 150 * shared
    r = stats.paired_quantile_ratio(base, cand, q=0.5, n_boot=500, seed=1)
    assert r.ratio == pytest.approx(1.5) and r.ratio_ci == pytest.approx((1.5, 1.5))
    assert stats.paired_quantile_ratio(base, cand, q=0.99, n_boot=200).ratio == pytest.approx(1.5)
    for bad in ((base, cand[:3]), (base, -cand), (base[:0], cand[:0])):
        with pytest.raises(ValueError):
            stats.paired_quantile_ratio(*bad)


def test_cost_carries_the_interval_and_says_can_t_tell_when_it_straddles_the_bar():
    base = ec.Estimate(100.0, (90.0, 110.0))
    clear = ec.cost_at_volume(ec.Estimate(200.0, (180.0, 220.0)), base, ec.Estimate(2.0, (1.8, 2.2)),
                              cost_per_hour=0.36, tokens_per_month=36e6, min_saving=10.0)
    assert clear.per_million_tokens.value == pytest.approx(0.5)
    assert clear.per_million_tokens.ci == pytest.approx((0.36 / (220 * 3600) * 1e6, 0.36 / (180 * 3600) * 1e6))
    assert clear.monthly_saving.value == pytest.approx(18.0)  # the baseline's 36 x (1 - 1/2)
    assert clear.worth_it is True and "saves 18.00 a month [16.00, 19.64]" in clear.note
    noisy = ec.cost_at_volume(ec.Estimate(105.0, (95.0, 115.0)), base, ec.Estimate(1.05, (0.9, 1.2)),
                              cost_per_hour=0.36, tokens_per_month=36e6, min_saving=1.0)
    assert noisy.worth_it is None and "can't tell at this noise" in noisy.note
    small = ec.cost_at_volume(base, base, ec.Estimate(1.01, (1.0, 1.02)), cost_per_hour=0.36,
                              tokens_per_month=36e6, min_saving=10.0)
    assert small.worth_it is False and "already cheap enough at your volume" in small.note
    ref = ec.cost_at_volume(base, base, None, cost_per_hour=0.36, tokens_per_month=36e6, min_saving=10.0)
    assert ref.worth_it is None and ref.monthly_saving.value == 0.0


def _economics(speedup: ec.Estimate | None, simulated: bool = False) -> ec.Economics:
    e = ec.Estimate
    if simulated:
        return ec.Economics("fake", True, None, None, None, None)
    t = ec.Throughput(e(100.0, (90.0, 110.0)), e(100.0 * speedup.value, (90.0, 110.0)),
                      {"p50": e(0.3, (0.28, 0.33)), "p95": e(0.4, (0.35, 0.45)), "p99": e(0.5, (0.45, 0.55))}, 128, 20)
    level = ec.LoadLevel(4, False, t.latency_s, e(90.0 * speedup.value, (80.0, 100.0)))
    ratios = ec.SpeedRatios(speedup, e(1.0, (0.9, 1.1)), {}, None, speedup)
    cost = ec.Cost(e(0.3 / speedup.value, (0.25, 0.35)), e(30.0, (25.0, 35.0)), e(0.0, (0.0, 0.0)), None, "")
    return ec.Economics("fake", False, None, e(500e6, (499e6, 501e6)), t, None, (level,), cost, ratios, 5)


def test_speed_rules_are_judged_on_intervals_and_the_cheapest_passing_candidate_is_recommended():
    gate = QualityGateConfig(min_decode_speedup=1.5, max_peak_rss_mb=600, max_p99_latency_s=1.0)

    def judged(name: str, e: ec.Economics, weight_bytes: int = 100) -> CandidateVerdict:
        return judge_economics(CandidateVerdict(name, weight_bytes, ()), e, gate)

    fast = judged("fast", _economics(ec.Estimate(2.0, (1.7, 2.3))), weight_bytes=50)
    faster = judged("faster", _economics(ec.Estimate(3.0, (2.6, 3.4))))
    unsure = judged("unsure", _economics(ec.Estimate(1.6, (1.2, 2.0))))
    fake = judged("fake", _economics(None, simulated=True))
    assert fast.passed and faster.passed
    assert [r.status for r in unsure.rules if r.kind == RuleKind.DECODE_SPEEDUP] == ["inconclusive"]
    assert not fake.passed and "fake quantization keeps float32 weights" in fake.failed_rules[0].rule
    d = decide([fast, faster, unsure, fake], eval_items=500, min_items=100, cheapest=True)
    assert d.recommended == "faster" and "cheapest to serve" in d.reason  # not the smallest (fast)
    nothing = decide([unsure, fake], eval_items=500, min_items=100, cheapest=True)
    assert nothing.recommended is None and "decode speedup >= 1.5" in nothing.reason and "fake" in nothing.reason


def test_the_baseline_again_is_never_recommended():
    aa = CandidateVerdict("none", 100, (), shippable=False)
    assert decide([aa], eval_items=500, min_items=100).recommended is None
    assert decide([aa, CandidateVerdict("w8", 50, ())], eval_items=500, min_items=100).recommended == "w8"


def test_speed_rules_need_measured_speed_and_a_price():
    with pytest.raises(ValueError, match="need measured speed"):
        RunConfig.model_validate({"quality_gate": {"min_decode_speedup": 1.5}, "economics": {"measure": False}})
    with pytest.raises(ValueError, match="max_cost_per_1m_tokens needs a price"):
        RunConfig.model_validate({"quality_gate": {"max_cost_per_1m_tokens": 0.5}})
    assert EconomicsConfig().rounds == DEFAULT_ROUNDS


def test_auto_threads_are_the_idle_cores():
    assert ec.serving_threads(3, cores=2, load=5.0) == 3  # set: as set
    assert ec.serving_threads(None, cores=2, load=0.2) == 2  # idle machine: every core
    assert ec.serving_threads(None, cores=2, load=1.2) == 1
    assert ec.serving_threads(None, cores=2, load=6.0) == 1  # busy: at least one
    assert ec.Conditions(1, 2, "cpu", (2.5, 2.0, 1.0), (1.0,), 3).warning() is not None
    assert ec.Conditions(1, 2, "cpu", (0.5, 0.4, 0.3), (1.5,), 3).warning() is None

