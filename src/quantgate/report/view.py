"""What the terminal, HTML and Markdown reports show, computed once from a run's record
(quantgate.record): formatted tables, gate rules, callouts, noise floor, manifest. Every cell is
formatted here, so the three agree (KLD in significant digits, percentages, dashes for None).

The record may lack optional parts (economics, cost, noise floor, calibration, kld_hist, an overall
task on unlabeled eval sets); metrics that were not finite are None and show as a dash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from quantgate.economics import compared
from quantgate.record import (
    CandidateRecord, Comparison, Conditions, Cost, EconomicsSettings, LoadLevel, ModelRecord, NoiseFloor, Ratio, Rule,
    Rung, RunRecord, SpeedRatios, TaskStats,
)

# A candidate whose accuracy recovery holds but which is beyond either line gets a "silent loss"
# callout: what a gate on accuracy alone would ship.
FLIP_CALLOUT = 0.05
TOP1_CALLOUT = 0.90
SIMULATED = "simulated: quality only"
UNSERVABLE = "not servable: quality only"
DASH = "—"
NO_DIFFERENCE = "no measurable difference at this noise"
AA = "A/A check"


# ---- formatting (None -> a dash) -----------------------------------------------------------

def pct(v: float | None, digits: int = 1) -> str:
    return DASH if v is None else f"{v:.{digits}%}"


def num(v: float | None, digits: int = 4) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def sig(v: float | None, digits: int = 3) -> str:
    """`digits` significant digits (KLD spans many decades: 2.9e-08 and 10.1 both stay legible)."""
    return DASH if v is None else f"{v:.{digits}g}"


def interval(iv: Sequence[float | None] | None, as_pct: bool = False, as_sig: bool = False,
             fmt: Callable[[float], str] | None = None) -> str:
    """"[lo, hi]" as percentages, significant digits, 3 decimals, or each end by `fmt` (e.g.
    rate, money); "" when there is none."""
    if not iv or iv[0] is None or iv[1] is None:
        return ""
    lo, hi = iv
    if fmt is not None:
        return f"[{fmt(lo)}, {fmt(hi)}]"
    return f"[{lo:.1%}, {hi:.1%}]" if as_pct else f"[{lo:.3g}, {hi:.3g}]" if as_sig else f"[{lo:.3f}, {hi:.3f}]"


def megabytes(b: int | None) -> str:
    return DASH if b is None else f"{b / 1e6:,.1f}"


def rate(v: float | None) -> str:
    return DASH if v is None else f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def decode_cell(pooled: float | None, spread: Sequence[float | None] | None) -> str:
    """Pooled decode tokens/s, with the slowest and fastest single request when recorded."""
    if spread and pooled is not None and None not in spread:
        return f"{rate(pooled)} ({spread[0]:,.0f}–{spread[1]:,.0f})"
    return rate(pooled)


def money(v: float | None, cents: bool = True) -> str:
    if v is None:
        return DASH
    sign = "-" if v < 0 else ""
    return f"{sign}${abs(v):,.2f}" if cents else f"{sign}${abs(v):,.0f}"


def ratio_cell(r: Ratio | None) -> str:
    """"×1.52 [1.41, 1.63]": a ratio to the baseline with its interval."""
    if r is None or r.value is None:
        return DASH
    return with_interval(f"×{r.value:.2f}", interval(r.ci, fmt=lambda v: f"{v:.2f}"))


WORDS = (  # (ratio, higher is better, word when better, word when worse)
    ("decode", True, "faster", "slower"),
    ("peak_rss", False, "smaller in memory", "larger in memory"),
    ("under_load", True, "cheaper", "dearer"),
)


def in_words(r: SpeedRatios | None) -> str:
    """What the intervals allow saying: "faster, cheaper", or NO_DIFFERENCE when no ratio's
    interval excludes 1."""
    if r is None:
        return DASH
    hows = [(compared(ratio.ci if (ratio := getattr(r, name)) else None, up), good, bad)
            for name, up, good, bad in WORDS]
    return ", ".join(good if how == "better" else bad for how, good, bad in hows if how != "same") or NO_DIFFERENCE


def with_interval(value: str, iv: str) -> str:
    return f"{value} {iv}".strip()


# ---- accessors -----------------------------------------------------------------------------

def cost(m: ModelRecord) -> Cost | None:
    """The model's cost at volume, when priced."""
    return m.economics.cost if m.economics else None


def simulated(m: ModelRecord) -> bool:
    return bool(m.economics and m.economics.simulated)


def decode_speed(m: ModelRecord) -> float | None:
    """Measured decode tokens/s, or None when not measured or only simulated (fake quantization:
    its speed says nothing about a real kernel)."""
    return m.economics.measured_speed if m.economics else None


def model_line(results: RunRecord) -> str:
    """The model and the precision its baseline was evaluated in, e.g. "SmolLM2 … · baseline in bf16"."""
    model = results.model
    return f"{model.description or model.base} · baseline in {model.precision}"


def gate_status(results: RunRecord, m: ModelRecord) -> str:
    if not isinstance(m, CandidateRecord) or m.aa_check:
        return "reference"
    return "pass" if m.gate.passed else "fail"


# ---- tables --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    cells: tuple[str, ...]
    status: str  # reference | pass | fail (the gate), for styling
    recommended: bool = False
    simulated: bool = False


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[Row, ...]
    numeric: tuple[bool, ...]  # right-align this column


def candidates_table(results: RunRecord) -> Table:
    metric = results.eval.metric
    level = results.quality_gate.confidence
    ci = f" [{level:.0%} CI]" if level else ""
    headers = ("model", "scheme", "weights MB", metric, f"recovery{ci}", "c→w / w→c", f"flip rate{ci}",
               "KLD mean", "KLD p99", "top-1 agree", "perplexity", "gate")
    base = results.baseline
    rows = [Row((base.name, base.scheme or "baseline", megabytes(base.weight_bytes), num(base.metric(metric)),
                 "1.0000", DASH, DASH, DASH, DASH, DASH, num(base.perplexity, 2), "reference"), "reference")]
    full = results.full_precision
    if full is not None:  # the checkpoint in fp32 against a bf16/fp16 baseline: a reference, not a candidate
        rows.append(Row((*_candidate_cells(full, metric, False)[:-1], "reference"), "reference"))
    rec = results.recommended
    for c in results.candidates:
        rows.append(Row(_candidate_cells(c, metric, c.name == rec), gate_status(results, c), c.name == rec))
    numeric = tuple(h not in ("model", "scheme", "gate") for h in headers)
    return Table(headers, tuple(rows), numeric)


def scheme(c: CandidateRecord) -> str:
    """e.g. "rtn 4-bit g64", "rtn 8-bit" (per channel), "w8a8 8-bit"; the run's own scheme text
    when the record has one."""
    if c.scheme:
        return c.scheme
    bits = f" {c.bits}-bit" if c.bits else ""
    group = f" g{c.group_size}" if c.group_size else ""
    return f"{c.method}{bits}{group}"


def _candidate_cells(c: CandidateRecord, metric: str, is_rec: bool) -> tuple[str, ...]:
    vs, o = c.vs_baseline, c.vs_baseline.overall
    return (
        c.name, scheme(c), megabytes(c.weight_bytes), num(c.metric(metric)),
        with_interval(num(vs.recovery), interval(o and o.recovery_ci)),
        f"{vs.flips.correct_to_wrong} / {vs.flips.wrong_to_correct}",
        with_interval(pct(vs.flips.rate), interval(o and o.flip_rate_ci, as_pct=True)),
        sig(vs.kld_mean), sig(vs.kld_p99), pct(vs.top1_agreement),
        num(c.perplexity, 2), AA if c.aa_check else ("pass ★" if is_rec else "pass") if c.gate.passed else "fail",
    )


TASK_HEADERS = ("candidate", "task", "items", "baseline", "candidate ", "recovery", "c→w / w→c", "McNemar p",
                "detectable drop (80% power)")


def task_table(results: RunRecord) -> Table | None:
    """Per candidate and task (overall included): the paired statistics; None when no candidate
    has any task."""
    rows = tuple(Row(_task_cells(results, c.name, t), gate_status(results, c))
                 for c in results.candidates for t in c.vs_baseline.tasks.values())
    return Table(TASK_HEADERS, rows, tuple(h not in ("candidate", "task") for h in TASK_HEADERS)) if rows else None


def _task_cells(results: RunRecord, name: str, t: TaskStats) -> tuple[str, ...]:
    if not t.labeled:
        return (name, t.task, str(t.n), DASH, f"{pct(t.cand)} same output", num(t.recovery, 3),
                f"{t.flips.changed} changed", DASH, DASH)
    drop = t.min_detectable_drop
    small = " (set too small for the floor)" if too_small(t, _floor(results, t.task)) else ""
    return (name, t.task, str(t.n), num(t.base, 3), num(t.cand, 3),
            with_interval(num(t.recovery, 3), interval(t.recovery_ci)),
            f"{t.flips.correct_to_wrong} / {t.flips.wrong_to_correct}", sig(t.mcnemar_p),
            f"{drop:.3f}{small}" if drop is not None and drop < 1 else "none at this flip rate")


def _floor(results: RunRecord, task: str) -> float | None:
    floors = results.quality_gate.task_floors or {}
    return floors.get(task, results.quality_gate.min_acceptable)


def too_small(t: TaskStats, floor: float | None) -> bool:
    """The set cannot detect (80% power) a drop as large as the floor allows, at the observed
    discordance. When fewer items flipped than the floor allows, the drop is bounded by the flips
    and no power is needed."""
    if floor is None or t.base is None or t.flips.rate is None or t.min_detectable_drop is None:
        return False
    allowed = (1.0 - floor) * t.base
    return t.flips.rate >= allowed and t.min_detectable_drop > allowed


ECONOMICS_HEADERS = ("model", "engine", "artifact MB", "peak RSS MB", "prefill tok/s", "decode tok/s",
                     "latency p50 / p95 / p99", "roofline", "$ / 1M tokens", "monthly", "saving / month", "worth it")


def economics_table(results: RunRecord) -> Table | None:
    """One row per model with economics; None when no model has any. Speeds are medians over
    the rounds with their intervals. Speed-derived cells of a simulated model (fake
    quantization) are not shown as speed: its decode cell reads SIMULATED."""
    rows = [_economics_row(results, m) for m in results.models if m.economics]
    if not rows:
        return None
    numeric = tuple(h not in ("model", "engine", "worth it") for h in ECONOMICS_HEADERS)
    return Table(ECONOMICS_HEADERS, tuple(rows), numeric)


RATIO_HEADERS = ("candidate", "decode", "prefill", "latency p50", "latency p99", "peak RSS", "tokens/s under load",
                 "in words")


def ratios_table(results: RunRecord) -> Table | None:
    """Each measured candidate over the baseline, paired, with intervals, and what those
    intervals allow saying in words; None when no candidate has ratios."""
    rows = tuple(Row((c.name, ratio_cell(r.decode), ratio_cell(r.prefill), ratio_cell(r.latency_s.get("p50")),
                      ratio_cell(r.latency_s.get("p99")), ratio_cell(r.peak_rss), ratio_cell(r.under_load),
                      in_words(r)), gate_status(results, c), c.name == results.recommended)
                 for c in results.candidates if c.economics and (r := c.economics.vs_baseline))
    return Table(RATIO_HEADERS, rows, (False, *[True] * 6, False)) if rows else None


LOAD_HEADERS = ("model", "batch size", "served", "latency p50 / p95 / p99", "tokens/s", "vs baseline")


def load_table(results: RunRecord) -> Table | None:
    """The request mix at each batch size, per model with a measured (not simulated) sweep:
    latency percentiles and throughput (median of the rounds, interval) under that load, and
    the throughput over the baseline's; None when no model has one."""
    rows = tuple(Row((m.name, str(level.batch_size), "batched" if level.batched else "queued",
                      latencies(level.latency_s), fleet_rate(level),
                      ratio_cell(level.vs_baseline) if m is not results.baseline else "reference"),
                     gate_status(results, m))
                 for m in results.models if m.economics and not m.economics.simulated
                 for level in sorted(m.economics.load, key=lambda r: r.batch_size))
    return Table(LOAD_HEADERS, rows, (False, True, False, True, True, True)) if rows else None


def fleet_rate(level: LoadLevel) -> str:
    """Tokens/s under one load level with its interval; for replicas of one server, the fleet's
    with each replica's share ("812 [790, 830] (401 + 411)"); their batch size is per replica."""
    fleet = with_interval(rate(level.tokens_per_s), interval(level.tokens_per_s_ci, fmt=rate))
    if not level.replica_tokens_per_s:
        return fleet
    return f"{fleet} ({' + '.join(rate(r) for r in level.replica_tokens_per_s)})"


def economics_notes(results: RunRecord) -> list[str]:
    """The cost notes ("name, name: note"), for under the economics table."""
    return grouped_notes((m.name, c.note) for m in results.models if (c := cost(m)) and c.note)


def grouped_notes(named: Iterable[tuple[str, str]]) -> list[str]:
    """(name, note) pairs -> "a, b: note", one line per distinct note, in first-seen order."""
    names: dict[str, list[str]] = {}
    for name, note in named:
        names.setdefault(note, []).append(name)
    return [f"{', '.join(n)}: {note}" for note, n in names.items()]


def latencies(lat: dict[str, float | None] | None) -> str:
    """p50 / p95 / p99 in one unit (ms when the p99 is under a second)."""
    vals = [lat.get(k) for k in ("p50", "p95", "p99")] if lat else []
    if not vals or any(v is None for v in vals):
        return DASH
    ms = vals[-1] < 1
    return " / ".join(f"{v * 1000:.0f}" if ms else f"{v:.2f}" for v in vals) + (" ms" if ms else " s")


def _economics_row(results: RunRecord, m: ModelRecord) -> Row:
    e, price = m.economics, cost(m)
    decode = (with_interval(rate(e.decode_tokens_per_s), interval(e.decode_tokens_per_s_ci, fmt=rate))
              if e.decode_tokens_per_s_ci else decode_cell(e.decode_tokens_per_s, e.decode_tokens_per_s_range))
    speed = ((DASH, UNSERVABLE if m.unservable else SIMULATED, DASH, DASH) if e.simulated else
             (with_interval(rate(e.prefill_tokens_per_s), interval(e.prefill_tokens_per_s_ci, fmt=rate)), decode,
              latencies(e.latency_s), pct(e.roofline_fraction, 0)))
    money_cells = ((DASH, DASH, DASH, DASH) if e.simulated or price is None else
                   (with_interval(money(price.per_million_tokens), interval(price.per_million_tokens_ci, fmt=money)),
                    money(price.monthly, cents=False),
                    with_interval(money(price.monthly_saving, cents=False),
                                  interval(price.monthly_saving_ci, fmt=lambda v: money(v, cents=False)))
                    if m is not results.baseline else DASH,
                    _worth(price.worth_it, m is results.baseline)))
    cells = (m.name, e.engine, megabytes(e.artifact_bytes), megabytes(e.peak_rss_bytes), *speed, *money_cells)
    return Row(cells, gate_status(results, m), m.name == results.recommended, e.simulated)


def _worth(v: bool | None, reference: bool) -> str:
    if reference:
        return DASH
    return "can't tell" if v is None else _yes_no(v)


def _yes_no(v: bool | None) -> str:
    return DASH if v is None else "yes" if v else "no"


# ---- the gate's reasons, callouts, noise floor, manifest -----------------------------------

@dataclass(frozen=True)
class RuleView:
    rule: str
    status: str  # pass | fail | inconclusive
    value: str
    interval: str
    threshold: str


def rules(c: CandidateRecord) -> list[RuleView]:
    return [_rule_view(r) for r in c.gate.rules]


def _rule_view(r: Rule) -> RuleView:
    as_pct, as_sig = r.kind.is_rate, r.kind.is_divergence
    fmt = pct if as_pct else sig if as_sig else num
    return RuleView(r.rule, r.status, fmt(r.value), interval(r.interval, as_pct, as_sig), fmt(r.threshold))


def verdict_line(results: RunRecord) -> tuple[bool, str]:
    """(a candidate is recommended, the headline)."""
    rec = results.recommendation
    if rec.candidate:
        return True, f"Recommended: {rec.candidate} — {rec.reason}"
    return False, f"No candidate recommended — {rec.reason}"


def silent_loss(name: str, vs: Comparison, min_acceptable: float) -> str | None:
    """What a gate on accuracy alone would ship without noticing, if anything."""
    recovery, flips, top1 = vs.recovery, vs.flips, vs.top1_agreement
    if recovery is None or recovery < min_acceptable or top1 is None or flips.rate is None:
        return None
    if flips.rate < FLIP_CALLOUT and top1 >= TOP1_CALLOUT:
        return None
    return (
        f"{name} keeps {recovery:.1%} of the baseline's accuracy, yet {flips.rate:.1%} of answers "
        f"flipped ({flips.correct_to_wrong} correct→wrong, {flips.wrong_to_correct} wrong→correct) "
        f"and it agrees with the baseline's top-1 next token only {top1:.1%} of the time "
        f"(KLD mean {sig(vs.kld_mean)}): a gate on accuracy alone would ship it."
    )


def silent_losses(results: RunRecord) -> dict[str, str]:
    """{candidate name: its silent-loss note} for the candidates that have one."""
    floor = results.quality_gate.min_acceptable
    if floor is None:
        return {}
    notes = {c.name: silent_loss(c.name, c.vs_baseline, floor) for c in results.candidates}
    return {name: note for name, note in notes.items() if note}


def noise_floor(results: RunRecord) -> str:
    """One sentence: the engine's own noise floor, or that it was not measured."""
    nf = results.noise_floor
    if nf is None:
        return ("Engine noise floor: not measured (run the baseline on two engines to see how much two "
                "engines disagree before any compression).")
    return (f"Engine noise floor: the baseline on {nf.engine} vs on {nf.reference} — "
            f"KLD mean {sig(nf.kld_mean)}, KLD p99 {sig(nf.kld_p99)}, top-1 agreement "
            f"{pct(nf.top1_agreement)} over {nf.tokens} tokens. Candidate differences "
            f"below this are the engine's, not the compression's." + _truncation(nf))


def _truncation(nf: NoiseFloor) -> str:
    if nf.truncation_kld_mean is None:
        return ""
    return (f" (Top-k rows: the truncation itself, the reference against its own top-k view, is KLD mean "
            f"{sig(nf.truncation_kld_mean)}; not part of the floor.)")


def aa_check(results: RunRecord) -> tuple[bool, str] | None:
    """(the A/A pair agrees, one sentence) for the run's A/A check (a candidate that is the
    baseline served again); None when its speed was not measured. Its decode ratio interval must
    contain 1; its half-width is the noise this run's speed verdicts are read against."""
    pair = next((c for c in results.candidates if c.aa_check and c.economics and c.economics.vs_baseline), None)
    if pair is None:
        return None
    r = pair.economics.vs_baseline.decode
    if r.value is None or not r.ci or None in r.ci:
        return None
    lo, hi = r.ci
    width = f"±{(hi - lo) / 2:.1%}"
    if compared(r.ci) == "same":
        return True, (f"A/A check: {pair.name} (the baseline served again) vs the baseline, decode {ratio_cell(r)}: "
                      f"the interval contains 1, so the pair is called \"{NO_DIFFERENCE}\". Speed noise in this run: "
                      f"{width}; differences inside it are not differences.")
    return False, (f"A/A check failed: {pair.name} (the baseline served again) vs the baseline, decode "
                   f"{ratio_cell(r)}: the interval excludes 1, so this run's noise is larger than its intervals "
                   f"say (the machine's load changed during the rounds?). Read its speed verdicts as unreliable; "
                   f"rerun on a quieter machine or with more economics.rounds.")


def speed_lines(results: RunRecord) -> list[str]:
    """How speed was measured, and the nudge toward an A/A check when there is none."""
    return [line for line in (conditions_line(results.conditions), aa_hint(results)) if line]


def speed_checks(results: RunRecord) -> list[tuple[bool, str]]:
    """(all right, sentence): the A/A check's outcome and the overload warning, where they apply."""
    checks = [aa_check(results)]
    warning = overload_warning(results.conditions)
    checks.append((False, warning) if warning else None)
    return [c for c in checks if c]


def aa_hint(results: RunRecord) -> str | None:
    """A nudge when speed was measured without an A/A check."""
    if results.conditions is None or any(c.aa_check for c in results.candidates):
        return None
    return ("No A/A check in this run: add a candidate {method: none} (the baseline served again) to see how wide "
            "this machine's speed noise is.")


def conditions_line(c: Conditions | None) -> str | None:
    """How speed was measured: rounds, threads, cores, CPU, load before and during."""
    if c is None:
        return None
    during = [v for v in c.load_during if v is not None]
    load = f"load average {c.load_before[0]:.1f} before" + (f", {min(during):.1f}–{max(during):.1f} during"
                                                             if during else "")
    threads = "the server's own threads" if c.threads is None else f"{c.threads} thread{'s' * (c.threads != 1)}"
    rounds = f"{c.rounds} interleaved round{'s' * (c.rounds != 1)} (baseline, A, B, baseline, ...)" if c.interleaved \
        else f"{c.rounds} round{'s' * (c.rounds != 1)} back to back per model (one server up at a time)"
    return (f"Speed measured in {rounds}, "
            f"{threads} on {c.cores} core{'s' * (c.cores != 1)} ({c.cpu}); {load}.")


def overload_warning(c: Conditions | None) -> str | None:
    if c is None or c.peak_load <= c.cores:
        return None
    return (f"The load average reached {c.peak_load:.1f} on {c.cores} cores while speed was measured: other "
            "work shared the CPU, so speeds are low and noisy. Compare within this run (the intervals and the A/A "
            "check say how far); measure on a quiet machine for absolute numbers.")


def ladder_line(results: RunRecord) -> str | None:
    """"ladder: a ✓ → b ✗ quality broke here → c not measured" (a rung of the same scheme as one that
    held: "not needed"); None for a run that is no ladder."""
    if results.ladder is None:
        return None
    last = [r.name for r in results.ladder if r.status in ("pass", "fail")][-1:]  # the last rung measured

    def mark(r: Rung) -> str:
        if r.status == "fail":  # a failed rung retried by a costlier method did not break the ladder
            return "✗ quality broke here" if [r.name] == last else "✗ (retried)"
        return {"pass": "✓", "not needed": "not needed (a cheaper method held)"}.get(r.status, r.status)
    return "ladder: " + " → ".join(f"{r.name} {mark(r)}" for r in results.ladder)


def manifest(results: RunRecord) -> list[tuple[str, str]]:
    """(key, value) pairs that identify the run: what was measured, with what, where."""
    model, ev, calib = results.model, results.eval, results.calibration
    tasks = ", ".join(f"{t} ({n})" for t, n in ev.tasks.items())
    pairs = [
        ("run id", results.run_id),
        ("started / finished", f"{results.started.isoformat()} / {results.finished.isoformat()}"),
        ("model", f"{model.base} — {model.description}"),
        ("baseline precision", model.precision),
        ("model source", model.source),
        ("model sha256", model.sha256),
        ("eval set", f"{ev.eval_set}: {ev.items} items; {tasks}"),
        ("duplicate items", str(len(ev.duplicates))),
        ("perplexity / KLD tokens", str(ev.window_tokens if ev.window_tokens is not None else DASH)),
        ("gate metric", ev.metric),
        ("config digest (sha256)", results.config_digest),
        ("seed", str(results.seed if results.seed is not None else DASH)),
        ("calibration", f"{calib.source}, sha256 {calib.sha256}" if calib
         else "none (no candidate method needed calibration data)"),
    ]
    pairs += [(f"artifact: {m.name}", f"{m.artifact.path} ({megabytes(m.artifact.bytes)} MB), "
               f"sha256 {m.artifact.sha256}") for m in results.models if m.artifact]
    pairs += [(k, str(v)) for k, v in results.environment.items()]
    bandwidth = results.machine.memory_bandwidth_bytes_per_s
    if bandwidth:
        pairs.append(("memory bandwidth (measured copy)", f"{bandwidth / 1e9:.1f} GB/s"))
    if results.economics_config:
        pairs.append(("economics", economics_assumptions(results.economics_config)))
    if results.conditions:
        pairs.append(("speed measured", conditions_line(results.conditions)))
    return pairs


def economics_assumptions(ec: EconomicsSettings) -> str:
    if not ec.priced:
        return "no price given (economics.hardware_cost_per_hour and tokens_per_month): costs not computed"
    return (f"hardware {money(ec.hardware_cost_per_hour)}/hour, {ec.tokens_per_month:,.0f} "
            f"tokens/month, worth it from {money(ec.min_monthly_saving, cents=False)}/month saved")
