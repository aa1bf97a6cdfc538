"""Model-on-engine economics, measured through the engine interface with the honesty the quality
side has: repeated, interleaved, with intervals.

Three parts:
  - on the engine (`measure_round`, run inside an engine process or against a server): one round
    of one model, raw: each request of the fixed mix at batch 1 (time to the first new token, the
    time and tokens after it, the whole request), then the load sweep;
  - the economics stage (`interleaved`): every served model measured in rounds, baseline, A, B,
    baseline, A, B, ... (a fresh engine each round, or one kept warm, as the backend says), so a
    slow minute of a shared machine falls on every model rather than on one; the measuring
    conditions (threads, cores, load average before and during, CPU) are recorded beside them;
  - the statistics (`summarize`): each model's medians with bootstrap intervals, and each
    candidate's ratios to the baseline by a paired bootstrap (evals/stats.py). The unit is one
    request: request i of round r of a candidate is paired with request i of round r of the
    baseline (the same prompt, seconds apart); load-sweep throughput and peak memory have one
    value per round, so there the unit is the round. An interval that contains 1 means "no
    measurable difference at this noise", whatever the point estimate says.

Cost at volume carries the throughput interval through (`cost_at_volume`).
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from quantgate.engines.base import Engine
from quantgate.evals import stats

if TYPE_CHECKING:
    import torch

Clock = Callable[[], float]
PERCENTILES = {"p50": 50.0, "p95": 95.0, "p99": 99.0}


# ---------------------------------------------------------------------------------------------
# On the engine: one round of one model, raw.


@dataclass(frozen=True)
class LoadSample:
    """One batch size of the sweep in one round: each request's latency (queueing included), the
    tokens generated and the wall time of the whole load; a server's time to first text."""

    batch_size: int
    batched: bool  # True: served together (one forward, or a server's own batching); False: queued
    latency_s: tuple[float, ...]  # [requests]
    tokens: int
    wall_s: float
    ttft_s: tuple[float, ...] | None = None  # [requests], streamed from a server
    # Replicas of one served model: the tokens each generated of `tokens` (None: one server)
    replica_tokens: tuple[int, ...] | None = None

    def __post_init__(self) -> None:  # (from JSON: lists)
        for name in ("latency_s", "ttft_s", "replica_tokens"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


@dataclass(frozen=True)
class RoundSample:
    """One model in one round. Per request of the fixed mix at batch 1 ([requests] each): its
    prompt tokens, the time to the first new token (prefill), the time from it to the last token
    and the tokens generated after the first (decode), and the whole request's latency. Then the
    load sweep."""

    prompt_tokens: tuple[int, ...]
    prefill_s: tuple[float, ...]
    decode_s: tuple[float, ...]
    decoded: tuple[int, ...]
    latency_s: tuple[float, ...]
    load: tuple[LoadSample, ...] = ()
    peak_rss_bytes: int | None = None  # the engine process's high-water mark after this round

    def __post_init__(self) -> None:  # (from JSON: lists and dicts)
        for name in ("prompt_tokens", "prefill_s", "decode_s", "decoded", "latency_s"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "load", tuple(lv if isinstance(lv, LoadSample) else LoadSample(**lv)
                                               for lv in self.load))

    def decode_rates(self) -> np.ndarray:
        """Decode tokens/s per request, float64 [requests]; NaN where nothing followed the first
        token."""
        return np.array([n / t if n > 0 and t > 0 else math.nan for n, t in zip(self.decoded, self.decode_s)])

    def prefill_rates(self) -> np.ndarray:
        """Prompt tokens/s per request (time to the first token), float64 [requests]."""
        return np.array([n / t if t > 0 else math.nan for n, t in zip(self.prompt_tokens, self.prefill_s)])


def measure_round(engine: Engine, prompts: Sequence[Sequence[int]], new_tokens: int, sizes: Sequence[int],
                  clock: Clock = time.perf_counter) -> RoundSample:
    """One round on `engine`: one untimed request first (a serving engine is warm: its mapped
    weights paged in, its threads started), then each prompt greedily at batch 1 for `new_tokens`
    tokens, timed as each token is known (Engine.generate's on_token): prefill = the time to the
    first token, decode = the time from the first token to the last; then the load sweep over
    `sizes` (`batched_load`, or `queued_load` for an engine that serves one request at a time)."""
    engine.generate([prompts[0]], 2)
    prefill, decode, decoded, latency = [], [], [], []
    for prompt in prompts:
        marks: list[float] = []
        t0 = clock()
        engine.generate([prompt], new_tokens, on_token=lambda: marks.append(clock()))
        latency.append(clock() - t0)
        prefill.append(marks[0] - t0)
        decode.append(marks[-1] - marks[0])
        decoded.append(len(marks) - 1)
    load = (batched_load(engine, prompts, new_tokens, sizes, clock) if hasattr(engine, "generate_batch")
            else queued_load(latency, [n + 1 for n in decoded], sizes))
    return RoundSample(tuple(map(len, prompts)), tuple(prefill), tuple(decode), tuple(decoded), tuple(latency),
                       tuple(load))


def batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to and including max_batch_size."""
    sizes = [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size]
    return sizes + [max_batch_size]


def batched_load(engine: Engine, prompts: Sequence[Sequence[int]], new_tokens: int, sizes: Sequence[int],
                 clock: Clock = time.perf_counter) -> list[LoadSample]:
    """For each batch size B: B requests (the mix, repeated as needed) arrive together and the
    engine's `generate_batch` serves them in one batch, exactly `new_tokens` each (every
    request's latency is the batch's)."""
    levels = []
    for b in sizes:
        batch = [prompts[i % len(prompts)] for i in range(b)]
        t0 = clock()
        engine.generate_batch(batch, new_tokens)
        wall = clock() - t0
        levels.append(LoadSample(b, True, (wall,) * b, b * new_tokens, wall))
    return levels


def queued_load(latencies: Sequence[float], tokens: Sequence[int], sizes: Sequence[int]) -> list[LoadSample]:
    """The sweep for an engine that serves one request at a time: B requests arriving together
    are served one after another, so request i waits for the i before it. Nothing more is run:
    request i's service is the batch-1 request i of this round (the mix repeated as needed), so
    its latency at batch size B is the running sum of those requests' latencies and the load's
    throughput their tokens over that sum."""
    levels = []
    for b in sizes:
        picked = [i % len(latencies) for i in range(b)]
        waited = np.cumsum([latencies[i] for i in picked])
        levels.append(LoadSample(b, False, tuple(map(float, waited)), sum(tokens[i] for i in picked),
                                 float(waited[-1])))
    return levels


def percentiles(xs: Sequence[float]) -> dict[str, float]:
    """p50 / p95 / p99 of `xs` (the percentiles every latency figure reports)."""
    return {k: float(v) for k, v in zip(PERCENTILES, np.percentile(xs, list(PERCENTILES.values())))}


# ---------------------------------------------------------------------------------------------
# The economics stage: every served model in interleaved rounds.


class Serving(Protocol):
    """An engine as served, measured one round at a time (an engine process, a server)."""

    def measure_round(self, prompts: Sequence[Sequence[int]], new_tokens: int, sizes: Sequence[int]) -> RoundSample:
        ...

    def peak_rss_bytes(self) -> int | None:
        """The serving process's peak resident memory so far (None: not ours to see)."""
        ...


# Opens a model's serving engine with this many threads (None: the engine's own choice, e.g. a server's).
Opener = Callable[[int | None], AbstractContextManager[Serving]]


@dataclass(frozen=True)
class Conditions:
    """What the measurement ran on and beside: the threads each engine used (None: a server's
    own), the cores this process may use, the CPU, the 1/5/15-minute load average before the
    stage and the 1-minute load average after each round."""

    threads: int | None
    cores: int
    cpu: str
    load_before: tuple[float, float, float]
    load_during: tuple[float, ...]
    rounds: int
    interleaved: bool = True  # False: each model's rounds ran back to back

    @property
    def peak_load(self) -> float:
        return max((self.load_before[0], *self.load_during))

    @property
    def overloaded(self) -> bool:
        """More runnable work than cores at some point: timings then carry other processes' load."""
        return self.peak_load > self.cores

    def warning(self) -> str | None:
        if not self.overloaded:
            return None
        return (f"load average reached {self.peak_load:.1f} on {self.cores} cores while speed was measured: "
                "other work shared the CPU, so speeds are low and noisy (the intervals and the A/A check show "
                "how much); measure on a quiet machine for absolute numbers")


def cores_available() -> int:
    return len(os.sched_getaffinity(0))


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def serving_threads(threads: int | None, cores: int | None = None, load: float | None = None) -> int:
    """Threads an engine quantgate runs serves with: `threads` when set (serving.threads), else
    the cores that are idle now: the cores this process may use less the 1-minute load average,
    rounded, at least 1. On a busy shared machine extra threads only wait on each other (on this
    project's 2-core machine at a load average of 8-10, ORT and llama.cpp decoded 1.6x to 11x
    faster on 1 thread than on 2: `make bench-threads`, README "Measuring speed honestly"); on an
    idle one every core is used."""
    if threads is not None:
        return threads
    cores = cores or cores_available()
    load = os.getloadavg()[0] if load is None else load
    return max(1, min(cores, cores - round(load)))


@dataclass
class Rounds:
    """What the stage measured: each model's rounds in order, the models whose engine failed (and
    why), and the measuring conditions."""

    samples: dict[str, list[RoundSample]]
    failed: dict[str, str]
    conditions: Conditions


def interleaved(openers: Mapping[str, Opener], *, rounds: int, warm: bool, prompts: Sequence[Sequence[int]],
                new_tokens: int, sizes: Sequence[int], threads: int | None, interleave: bool = True,
                on_round: Callable[[int], None] = lambda n: None) -> Rounds:
    """Measure every model of `openers` (label -> how to open its serving engine with `threads`
    threads; the baseline first) in `rounds` interleaved rounds: baseline, A, B, baseline, A, B,
    ... warm=False opens a fresh engine for every measurement (an engine process: its start, its
    memory, its luck are in every round); warm=True opens each once and keeps it (a server that
    is up anyway). interleave=False runs each model's rounds back to back (baseline, baseline, ...,
    A, A, ...: a backend that keeps one server up at a time), so load that changes between
    models is not spread over them alike. A model whose engine fails (a crash, a server error) is
    dropped, its rounds with it, and named in `failed`; the others go on. The load average is
    read after each round: all models' when interleaved, each measured model's otherwise."""
    before = os.getloadavg()
    samples: dict[str, list[RoundSample]] = {label: [] for label in openers}
    failed: dict[str, str] = {}
    during: list[float] = []
    with ExitStack() as stack:
        kept: dict[str, Serving] = {}

        @contextmanager
        def engine(label: str) -> Iterator[Serving]:
            if not warm:
                with openers[label](threads) as fresh:
                    yield fresh
                return
            if label not in kept:
                kept[label] = stack.enter_context(openers[label](threads))
            yield kept[label]

        order = [(r, label) for r in range(rounds) for label in openers] if interleave else \
            [(r, label) for label in openers for r in range(rounds)]
        for i, (r, label) in enumerate(order):
            tried = label not in failed
            if tried:
                try:
                    with engine(label) as s:
                        sample = s.measure_round(prompts, new_tokens, sizes)
                        samples[label].append(_with_rss(sample, s.peak_rss_bytes()))
                except (OSError, RuntimeError) as e:  # an engine process that ended (EngineCrashed), a lost server
                    failed[label] = str(e)
                on_round(1)
            round_ended = (i + 1 == len(order) or order[i + 1][0] != r) if interleave else tried
            if round_ended:
                during.append(os.getloadavg()[0])
    conditions = Conditions(threads, cores_available(), cpu_model(), before, tuple(during), rounds, interleave)
    return Rounds({k: v for k, v in samples.items() if k not in failed}, failed, conditions)


def _with_rss(sample: RoundSample, rss: int | None) -> RoundSample:
    return RoundSample(sample.prompt_tokens, sample.prefill_s, sample.decode_s, sample.decoded, sample.latency_s,
                       sample.load, rss)


# ---------------------------------------------------------------------------------------------
# Statistics: medians with intervals, ratios to the baseline with intervals.


@dataclass(frozen=True)
class Estimate:
    """A measured figure: its value (a median, or the percentile named) and its bootstrap
    interval at the run's confidence."""

    value: float
    ci: tuple[float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "ci", tuple(self.ci))

    def compared(self, higher_is_better: bool = True) -> Literal["better", "worse", "same"]:
        """For a ratio to the baseline: see `compared`."""
        return compared(self.ci, higher_is_better)


def compared(ci: Sequence[float | None] | None, higher_is_better: bool = True) -> Literal["better", "worse", "same"]:
    """What a ratio's interval allows saying: "better" / "worse" only when the whole interval is
    on that side of 1; "same" (no measurable difference at this noise) when it contains 1 or is
    unknown (None, NaN)."""
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "same"
    lo, hi = ci
    if lo <= 1.0 <= hi:
        return "same"
    return "better" if (lo > 1.0) == higher_is_better else "worse"


@dataclass(frozen=True)
class Throughput:
    """A model's batch-1 speed over all its rounds (medians over its requests, with intervals)."""

    prefill_tokens_per_s: Estimate  # prompt tokens per second (time to the first new token)
    decode_tokens_per_s: Estimate  # new tokens per second after the first
    latency_s: dict[str, Estimate]  # p50 / p95 / p99 of whole-request latency
    new_tokens: int  # tokens generated in total, every round (generation may end early at end-of-sequence)
    requests: int  # requests measured: rounds x the mix
    # slowest and fastest single request's decode tokens/s (how far one request is from the median)
    decode_range: tuple[float, float] | None = None


@dataclass(frozen=True)
class LoadLevel:
    """The fixed request mix served `batch_size` requests at a time (for a server: with that many
    requests in flight at once), over every round: throughput median (one value per round) and
    latency percentiles (over every request), with intervals."""

    batch_size: int
    batched: bool
    latency_s: dict[str, Estimate]
    tokens_per_s: Estimate
    ttft_s: dict[str, Estimate] | None = None  # a server's time to first text
    requests: int | None = None  # requests sent per round (a server)
    vs_baseline: Estimate | None = None  # tokens/s over the baseline's at this batch size, paired by round
    # Replicas of one served model (batch_size requests in flight on each): tokens_per_s is the
    # fleet's, and this each replica's share of it, median over rounds (None: one server)
    replica_tokens_per_s: tuple[float, ...] | None = None


@dataclass(frozen=True)
class SpeedRatios:
    """A candidate over the baseline, paired (same prompt, same round): decode and prefill speed
    (> 1: faster), latency percentiles (< 1: quicker), peak memory (< 1: smaller) and throughput
    at the largest batch size (> 1: more tokens per machine-hour, so cheaper)."""

    decode: Estimate
    prefill: Estimate
    latency: dict[str, Estimate]
    peak_rss: Estimate | None = None
    under_load: Estimate | None = None


@dataclass(frozen=True)
class Cost:
    """Cost at volume with the throughput's interval carried through. worth_it: True when even
    the interval's low end saves at least economics.min_monthly_saving, False when its high end
    does not, None when the interval straddles it (or for the baseline itself)."""

    per_million_tokens: Estimate
    monthly: Estimate
    monthly_saving: Estimate  # versus the baseline; negative when the candidate costs more
    worth_it: bool | None
    note: str


@dataclass(frozen=True)
class Economics:
    """A model on its engine. For fake-quantized candidates (simulated=True) only the quality is
    real: the weights are still float32, so no speed or memory of theirs is measured."""

    engine: str
    simulated: bool
    artifact_bytes: int | None  # the file the engine loads (GGUF, ONNX graph), None when nothing is written
    peak_rss_bytes: Estimate | None  # peak resident memory of the engine's own process (median of rounds)
    throughput: Throughput | None
    roofline_fraction: float | None  # decode tokens/s x bytes per token / memory bandwidth
    load: tuple[LoadLevel, ...] = ()  # batch sizes 1 .. serving.max_batch_size
    cost: Cost | None = None  # at economics.tokens_per_month, when a price is configured
    vs_baseline: SpeedRatios | None = None  # None for the baseline and for what was not measured
    rounds: int = 0  # rounds measured

    @property
    def tokens_per_s_under_load(self) -> Estimate | None:
        """Generated tokens/s at the largest batch size measured."""
        return self.load[-1].tokens_per_s if self.load else None


# Fewer measured units than this give no interval (NaN): a bootstrap over one or two values would
# draw a zero-width or all-or-nothing interval and call a single lucky measurement "faster".
MIN_UNITS = 3


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are computed: confidence, replicates, seed (the run's)."""

    confidence: float = 0.95
    n_boot: int = 2000
    seed: int = 0

    def quantile(self, values: Sequence[float] | np.ndarray, q: float = 0.5) -> Estimate:
        """The q-quantile of `values` (NaN dropped) and its bootstrap interval."""
        x = np.asarray(values, dtype=np.float64)
        x = x[np.isfinite(x)]
        if x.size < MIN_UNITS:
            return Estimate(float(np.quantile(x, q)) if x.size else math.nan, (math.nan, math.nan))
        r = stats.bootstrap_mean_quantile(x, q=q, n_boot=self.n_boot, confidence=self.confidence, seed=self.seed)
        return Estimate(r.quantile, r.quantile_ci)

    def ratio(self, base: Sequence[float] | np.ndarray, cand: Sequence[float] | np.ndarray,
              q: float = 0.5) -> Estimate:
        """quantile(cand) / quantile(base) over paired units (NaN in either drops the pair)."""
        b, c = np.asarray(base, dtype=np.float64), np.asarray(cand, dtype=np.float64)
        keep = np.isfinite(b) & np.isfinite(c) & (b > 0) & (c > 0)
        if keep.sum() < MIN_UNITS:
            point = np.quantile(c[keep], q) / np.quantile(b[keep], q) if keep.any() else math.nan
            return Estimate(float(point), (math.nan, math.nan))
        r = stats.paired_quantile_ratio(b[keep], c[keep], q=q, n_boot=self.n_boot, confidence=self.confidence,
                                        seed=self.seed)
        return Estimate(r.ratio, r.ratio_ci)

    def percentiles(self, values: Sequence[float] | np.ndarray) -> dict[str, Estimate]:
        return {k: self.quantile(values, p / 100) for k, p in PERCENTILES.items()}


@dataclass(frozen=True)
class Summary:
    """One model's figures over its rounds (and its ratios to the baseline when it is a candidate)."""

    throughput: Throughput
    peak_rss_bytes: Estimate | None
    load: tuple[LoadLevel, ...]
    vs_baseline: SpeedRatios | None
    rounds: int


def summarize(samples: Mapping[str, Sequence[RoundSample]], baseline: str, boot: Bootstrap) -> dict[str, Summary]:
    """Every model's Summary; ratios pair each candidate's rounds with the baseline's (the first
    min(rounds) of both, request by request)."""
    base = samples.get(baseline)
    return {label: _summary(rounds, boot, base if label != baseline else None) for label, rounds in samples.items()
            if rounds}


def _units(rounds: Sequence[RoundSample], what: Callable[[RoundSample], np.ndarray]) -> np.ndarray:
    """One value per request of every round, in order: float64 [rounds x requests]."""
    return np.concatenate([what(r) for r in rounds])


def _summary(rounds: Sequence[RoundSample], boot: Bootstrap, base: Sequence[RoundSample] | None) -> Summary:
    decode = _units(rounds, RoundSample.decode_rates)
    rates = decode[np.isfinite(decode)]
    throughput = Throughput(
        prefill_tokens_per_s=boot.quantile(_units(rounds, RoundSample.prefill_rates)),
        decode_tokens_per_s=boot.quantile(decode),
        latency_s=boot.percentiles(_units(rounds, lambda r: np.array(r.latency_s))),
        new_tokens=sum(sum(r.decoded) + len(r.decoded) for r in rounds),
        requests=decode.size,
        decode_range=(float(rates.min()), float(rates.max())) if rates.size else None,
    )
    rss = [r.peak_rss_bytes for r in rounds if r.peak_rss_bytes is not None]
    peak = boot.quantile(rss) if rss else None
    base_load = _load_by_size(base) if base else {}
    load = tuple(_level(size, levels, boot, base_load.get(size)) for size, levels in _load_by_size(rounds).items())
    ratios = _ratios(rounds, base, boot, load) if base else None
    return Summary(throughput, peak, load, ratios, len(rounds))


def _load_by_size(rounds: Sequence[RoundSample]) -> dict[int, list[LoadSample]]:
    by_size: dict[int, list[LoadSample]] = {}
    for r in rounds:
        for level in r.load:
            by_size.setdefault(level.batch_size, []).append(level)
    return dict(sorted(by_size.items()))


def _level(size: int, levels: Sequence[LoadSample], boot: Bootstrap, base: Sequence[LoadSample] | None) -> LoadLevel:
    latencies = np.concatenate([lv.latency_s for lv in levels])
    ttft = [t for lv in levels for t in (lv.ttft_s or ())]
    n = min(len(levels), len(base)) if base else 0
    return LoadLevel(
        batch_size=size, batched=levels[0].batched, latency_s=boot.percentiles(latencies),
        tokens_per_s=boot.quantile([lv.tokens_per_s for lv in levels]),
        ttft_s=boot.percentiles(ttft) if ttft else None,
        requests=len(levels[0].latency_s) if levels[0].ttft_s is not None else None,
        vs_baseline=boot.ratio([lv.tokens_per_s for lv in base[:n]], [lv.tokens_per_s for lv in levels[:n]])
        if n else None,
        replica_tokens_per_s=_replica_shares(levels),
    )


def _replica_shares(levels: Sequence[LoadSample]) -> tuple[float, ...] | None:
    """Each replica's tokens/s (its tokens over the level's wall time), median over rounds."""
    shares = [[t / lv.wall_s for t in lv.replica_tokens] for lv in levels if lv.replica_tokens]
    return tuple(float(v) for v in np.median(shares, axis=0)) if shares else None


def _ratios(rounds: Sequence[RoundSample], base: Sequence[RoundSample], boot: Bootstrap,
            load: Sequence[LoadLevel]) -> SpeedRatios:
    n = min(len(rounds), len(base))
    cand, ref = rounds[:n], base[:n]

    def paired(what: Callable[[RoundSample], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        b, c = [], []
        for rb, rc in zip(ref, cand):  # request i with request i: the same prompt, the same round
            k = min(len(rb.latency_s), len(rc.latency_s))
            b.append(what(rb)[:k])
            c.append(what(rc)[:k])
        return np.concatenate(b), np.concatenate(c)

    latency = paired(lambda r: np.array(r.latency_s))
    rss = [(b.peak_rss_bytes, c.peak_rss_bytes) for b, c in zip(ref, cand)
           if b.peak_rss_bytes is not None and c.peak_rss_bytes is not None]
    return SpeedRatios(
        decode=boot.ratio(*paired(RoundSample.decode_rates)),
        prefill=boot.ratio(*paired(RoundSample.prefill_rates)),
        latency={k: boot.ratio(*latency, q=p / 100) for k, p in PERCENTILES.items()},
        peak_rss=boot.ratio(*zip(*rss)) if rss else None,
        under_load=load[-1].vs_baseline if load else None,
    )


# ---------------------------------------------------------------------------------------------
# Cost at volume, memory bandwidth, roofline.


def cost_at_volume(tokens_per_s: Estimate, baseline_tokens_per_s: Estimate, vs_baseline: Estimate | None, *,
                   cost_per_hour: float, tokens_per_month: float, min_saving: float) -> Cost:
    """Machine time to serve the monthly volume at the measured throughput under load, priced
    by the hour: cost per 1M tokens = price per hour / (tokens per hour / 1e6). The interval of
    the throughput carries through (cost falls as throughput rises, so the ends swap). The saving
    is the baseline's monthly cost x (1 - 1 / ratio), the ratio being the paired throughput ratio
    to the baseline (vs_baseline; None: the baseline itself, no saving)."""
    def monthly(tps: float) -> float:
        return tokens_per_month / (tps * 3600) * cost_per_hour

    def priced(per: Callable[[float], float], e: Estimate) -> Estimate:
        return Estimate(per(e.value), (per(e.ci[1]), per(e.ci[0])))

    per_million = priced(lambda tps: cost_per_hour / (tps * 3600) * 1e6, tokens_per_s)
    base_monthly = monthly(baseline_tokens_per_s.value)
    if vs_baseline is None:
        return Cost(per_million, priced(monthly, tokens_per_s), Estimate(0.0, (0.0, 0.0)), None, "")
    save = Estimate(base_monthly * (1 - 1 / vs_baseline.value),
                    (base_monthly * (1 - 1 / vs_baseline.ci[0]), base_monthly * (1 - 1 / vs_baseline.ci[1])))
    lo, hi = save.ci
    worth = True if lo >= min_saving else False if hi < min_saving else None
    span = f"{save.value:,.2f} a month [{lo:,.2f}, {hi:,.2f}]"
    note = (f"saves {span}" if worth else
            f"already cheap enough at your volume: saves {span} (under {min_saving:,.2f})" if worth is False else
            f"can't tell at this noise: saves {span}, which straddles {min_saving:,.2f}")
    return Cost(per_million, priced(monthly, tokens_per_s), save, worth, note)


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

