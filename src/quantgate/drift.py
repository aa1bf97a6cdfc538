"""`quantgate drift`: re-check a shipped candidate on a fresh sample of production inputs.

Given an earlier gate run and the candidate it shipped, the check
  1. evaluates the baseline and that candidate on the new sample with the run's own settings and
     applies the same gate rules (a rule that now fails: drift outcome "fail");
  2. compares recovery, flip rate and mean KLD with the original run's: each change gets a
     two-sided test (recovery and KLD mean: the difference of two independent estimates, its
     standard error read off the two runs' bootstrap intervals; flip rate: Fisher's exact test on
     the two runs' flip counts). A metric "moved beyond what the intervals allow" when its p-value
     is under (1 - quality_gate.confidence) / k, Bonferroni over the k metrics tested;
  3. checks whether the new inputs still look like the eval set: the baseline's mean per-token
     NLL of each input (its prompt or context, after BOS) and its length in tokens, original eval
     set vs new sample, each by a two-sample Kolmogorov-Smirnov test. A shift is p < 0.01 with
     D > 0.1 (the effect-size guard: large samples make trivial differences significant).
No drift (outcome "pass", exit 0) needs all three clean; otherwise "fail" (exit 1) with the
reasons. The check is recorded in the store and written to <results>/drift-<UTC time>/.

Flow: plan (find the run, its candidate, the new config; validate the inputs; --if-due) ->
check (the model work) -> finish (files, store, terminal).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import Engine as Store

from quantgate.config import EconomicsConfig, EvalSetConfig, RunConfig, error_text
from quantgate.errors import UserError
from quantgate.evals import stats
from quantgate.evals.datasets import TEXT_SUFFIXES, EvalSuite, load_suite
from quantgate.evals.metrics import OVERALL, Comparison
from quantgate.gate import check_tasks
from quantgate.methods.registry import MethodConfig, parse_candidate
from quantgate.record import Interval, Rule, RunRecord, rule_record

if TYPE_CHECKING:
    from quantgate.run import Progress

PERIODS = {"daily": timedelta(days=1), "weekly": timedelta(days=7), "monthly": timedelta(days=30)}
SHIFT_ALPHA = 0.01  # input shift: KS p-value under this ...
SHIFT_MIN_D = 0.1  # ... and a KS statistic over this
# Speed is not what a drift check measures: the run's engine measurement shrinks to one short request.
QUICK_ECONOMICS = EconomicsConfig(measure=False)  # a drift check is about quality; speed is not re-measured


@dataclass(frozen=True)
class Plan:
    """Everything decided before any model work."""

    record: RunRecord  # the original run's record
    candidate: str  # the shipped candidate's name
    config: RunConfig  # the original run's config with only that candidate and the new inputs
    original: RunConfig  # the original run's config
    inputs: Path
    inputs_sha256: str
    suite: EvalSuite  # the new sample as the check's config reads it
    store: Store
    results_root: Path


@dataclass(frozen=True)
class Movement:
    """One metric, original run vs now, and the test of the change."""

    metric: str  # "recovery" | "flip_rate" | "kld_mean"
    before: float
    before_ci: tuple[float, float]
    now: float
    now_ci: tuple[float, float]
    test: str
    p: float
    alpha: float  # Bonferroni-adjusted level the p-value is compared with

    @property
    def moved(self) -> bool:
        return not math.isnan(self.p) and self.p < self.alpha


@dataclass(frozen=True)
class Shift:
    """One property of the inputs, original eval set vs new sample (KS test)."""

    what: str  # "baseline NLL per token" | "length (tokens)"
    original_median: float
    new_median: float
    d: float
    p: float
    n_original: int
    n_new: int

    @property
    def shifted(self) -> bool:
        return self.p < SHIFT_ALPHA and self.d > SHIFT_MIN_D


@dataclass
class DriftReport:
    checked_at: datetime
    gate: tuple[Rule, ...]  # every gate rule on the new sample (as in the run record)
    gate_failed: tuple[Rule, ...]  # the rules that keep it from passing (quality_gate.inconclusive applied)
    movements: list[Movement]
    shifts: list[Shift]
    model_sha256: str  # the baseline's weights now
    items: int  # items of the new sample
    result: Any = field(repr=False)  # run.RunResult: the evaluation on the new sample
    error: str | None = None  # the candidate's engine crashed, or the baseline's weights changed

    @property
    def reasons(self) -> list[str]:
        out = [self.error] if self.error else []
        out += [f"gate now {r.status}: {r.rule} ({_num(r.value)}, interval {_ci(r.interval)})"
                for r in self.gate_failed]
        out += [f"{m.metric} moved: {_num(m.before)} -> {_num(m.now)} ({m.test} p={m.p:.2g} < {m.alpha:.2g})"
                for m in self.movements if m.moved]
        out += [f"input shift in {s.what}: median {s.original_median:.3g} -> {s.new_median:.3g} "
                f"(KS D={s.d:.3f}, p={s.p:.2g})" for s in self.shifts if s.shifted]
        return out

    @property
    def outcome(self) -> str:
        """error > fail (a rule failed, a metric moved, the inputs shifted) > inconclusive (only
        inconclusive rules stand in the way) > pass."""
        if self.error:
            return "error"
        if (any(r.status == "fail" for r in self.gate_failed) or any(m.moved for m in self.movements)
                or any(s.shifted for s in self.shifts)):
            return "fail"
        return "inconclusive" if self.gate_failed else "pass"

    @property
    def exit_code(self) -> int:
        return 0 if self.outcome == "pass" else 1


# -- plan ---------------------------------------------------------------------------------------


def plan(run: str, inputs: Path, *, candidate: str | None, store: str | None,
         results_dir: Path | None) -> Plan:
    """Find the original run (a run directory holding results.json, or a run id in the store),
    the candidate to check (default: the one it recommended) and the config of the check. The new
    inputs are read and validated here, before any model work. UserError for anything missing."""
    record, root, db = _original(run, store, results_dir)
    name = candidate or record.recommended
    if name is None:
        raise UserError(f"run {record.run_id} recommended no candidate: name one with --candidate")
    try:
        settings = _settings(record, name)
        original = RunConfig.model_validate(record.config)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"run {record.run_id}: its stored settings no longer validate "
                        f"({'.'.join(map(str, first['loc']))}: {error_text(first)})") from None
    cfg = drift_config(original, settings, inputs, record.eval.tasks)
    suite = load_suite(cfg.quality_gate, limit=cfg.evaluation.limit, cloze_items=0, seed=cfg.seed)
    check_tasks(cfg.quality_gate, suite.tasks)
    if len(suite.items) < cfg.quality_gate.min_items:
        raise UserError(f"{inputs}: {len(suite.items)} items; quality_gate.min_items of run {record.run_id} "
                        f"is {cfg.quality_gate.min_items}")
    from quantgate.models.load import file_sha256

    return Plan(record, name, cfg, original, inputs, file_sha256(inputs), suite, db, root)


def _original(run: str, store: str | None, results_dir: Path | None) -> tuple[RunRecord, Path, Store]:
    from quantgate.report.files import RESULTS, load_results
    from quantgate.store import load_run, open_store, store_location

    path = Path(run)
    if (path / RESULTS).is_file():
        root = results_dir or path.parent
        return load_results(path), root, open_store(store_location(store, None, root))
    if path.is_dir() or os.sep in run:  # a path, not a run id (those hold no separator)
        raise UserError(f"{run}: not a run directory (it holds no {RESULTS})")
    root = results_dir or Path(RunConfig().results_dir)
    db = open_store(store_location(store, None, root), create=False)
    record = load_run(db, run)
    if record is None:
        shown = db.url.render_as_string(hide_password=True)
        raise UserError(f"{run}: not a run directory holding {RESULTS}, nor a run id recorded in store {shown}")
    return record, root, db


def _settings(record: RunRecord, name: str) -> MethodConfig:
    found = record.candidate(name)
    if found is None:
        names = ", ".join(c.name for c in record.candidates) or "none"
        raise UserError(f"--candidate {name}: not a candidate of run {record.run_id} (candidates: {names})")
    if found.settings is None:
        raise UserError(f"run {record.run_id}: candidate {name} has no recorded settings (results.json "
                        "from an older quantgate): rerun the gate")
    return parse_candidate(found.settings)


def drift_config(original: RunConfig, candidate: MethodConfig, inputs: Path, tasks: dict[str, int]) -> RunConfig:
    """The original config with only `candidate` and the new inputs as its eval set; every gate
    rule and evaluation setting kept. JSONL inputs replace the original's item files (their items
    take the original's task name when it had exactly one, and its options); the original's text
    files stay, so KLD is measured on the same held-out text. A .txt sample replaces the text and
    keeps the original's items (it needs an original run on eval files)."""
    gate = original.quality_gate
    entries = gate.eval_sets or (() if gate.eval_set in ("default", "none") else (EvalSetConfig(path=gate.eval_set),))
    is_text = [Path(e.path).suffix in TEXT_SUFFIXES for e in entries]
    if inputs.suffix in TEXT_SUFFIXES:
        kept = [e for e, text in zip(entries, is_text) if not text]
        if not kept:
            raise UserError(f"{inputs}: a text sample needs a run gated on eval files (run {gate.eval_set!r} has "
                            "no items of its own to keep); give a JSONL sample")
        new = (*kept, EvalSetConfig(path=str(inputs)))
    else:
        items = [e for e, text in zip(entries, is_text) if not text]
        options = items[0].model_dump(exclude={"path", "task"}) if len(items) == 1 else {}
        task = next(iter(tasks)) if len(tasks) == 1 else None
        new = (EvalSetConfig(path=str(inputs), task=task, **options),
               *(e for e, text in zip(entries, is_text) if text))
    data = original.model_dump(mode="json")
    data.update(quantization=None, candidates=[candidate.model_dump(mode="json")],
                economics=QUICK_ECONOMICS.model_dump(mode="json"))
    data["quality_gate"] = {**{k: v for k, v in data["quality_gate"].items() if k != "eval_set"},
                            "eval_sets": [e.model_dump(mode="json") for e in new]}
    return RunConfig.model_validate(data)


def due_at(period: str, last: datetime) -> datetime | None:
    """When the next check is due after `last` (aware UTC) under quality_gate.drift_check; None
    when checks are off."""
    return None if period == "off" else last + PERIODS[period]


def not_due(p: Plan, now: datetime | None = None) -> str | None:
    """Why --if-due runs no check now (checks are off, or the period has not passed since the
    last check, else since the run); None when a check is due."""
    period = p.original.quality_gate.drift_check
    last = last_checked(p)
    due = due_at(period, last)
    if due is None:
        return f"drift_check is off (quality_gate.drift_check of run {p.record.run_id}): nothing checked"
    if due > (now or datetime.now(timezone.utc)):
        return (f"not due: last checked {last:%Y-%m-%d %H:%M} UTC; the {period} check is due "
                f"{due:%Y-%m-%d %H:%M} UTC")
    return None


def last_checked(p: Plan) -> datetime:
    """The last drift check of this candidate of this model, else the original run's start."""
    from quantgate.store import last_drift

    last = last_drift(p.store, p.record.model.sha256, p.candidate)
    return last.checked_at if last else p.record.started.astimezone(timezone.utc)


# -- check --------------------------------------------------------------------------------------


def check(p: Plan, progress: Progress, workdir: Path | None = None) -> DriftReport:
    """Evaluate baseline and candidate on the new sample (run.execute), then compare with the
    original run and test the inputs for a shift."""
    from quantgate.run import execute

    checked_at = datetime.now(timezone.utc)
    shifts = input_shift(p)
    result = execute(p.config, progress, workdir=workdir)
    verdict = result.decision.verdicts[0]
    gate, failed = (tuple(map(rule_record, rules)) for rules in (verdict.rules, verdict.failed_rules))
    report = DriftReport(checked_at, gate, failed, [], shifts, result.model_digest, len(result.prepared.suite.items),
                         result)
    if result.failed:
        report.error = f"{p.candidate}: engine failed ({result.failed[0].error})"
        return report
    report.movements = movements(p.record, p.candidate, result.candidates[0].comparison,
                                 p.config.quality_gate.confidence)
    if result.model_digest != p.record.model.sha256:
        report.error = f"baseline weights changed since run {p.record.run_id} (sha256 {result.model_digest[:12]})"
    return report


def movements(record: RunRecord, candidate: str, cmp: Comparison, confidence: float) -> list[Movement]:
    """Recovery, flip rate and KLD mean of `candidate` in the original run's record vs `cmp` (its
    comparison on the new sample). Metrics missing on either side (no labeled items) are left out."""
    before = record.candidate(candidate).vs_baseline
    rows = []  # (metric, before, before_ci, now, now_ci, test, p)
    old, new = before.overall, cmp.tasks.get(OVERALL)
    if old is not None and new is not None and old.recovery is not None:
        rows.append(("recovery", old.recovery, _pair(old.recovery_ci), new.recovery, new.recovery_ci,
                     "interval z-test", stats.interval_difference_p(
                         old.recovery, _pair(old.recovery_ci), new.recovery, new.recovery_ci, confidence)))
        k_old = old.flips.correct_to_wrong + old.flips.wrong_to_correct
        k_new = new.flips.correct_to_wrong + new.flips.wrong_to_correct
        rows.append(("flip_rate", _value(old.flips.rate), _pair(old.flip_rate_ci), new.flips.rate, new.flip_rate_ci,
                     "Fisher exact", stats.fisher_exact(k_old, old.flips.n, k_new, new.flips.n)))
    if before.kld_mean is not None:
        rows.append(("kld_mean", before.kld_mean, _pair(before.kld_mean_ci), cmp.kld.mean, cmp.kld.mean_ci,
                     "interval z-test", stats.interval_difference_p(
                         before.kld_mean, _pair(before.kld_mean_ci), cmp.kld.mean, cmp.kld.mean_ci, confidence)))
    alpha = (1.0 - confidence) / max(1, len(rows))
    return [Movement(m, b, _pair(bci), n, _pair(nci), t, p, alpha) for m, b, bci, n, nci, t, p in rows]


def _value(v: float | None) -> float:
    return math.nan if v is None else float(v)


def _pair(ci: Interval) -> tuple[float, float]:
    """A recorded interval as floats (NaN where the record has none)."""
    return (math.nan, math.nan) if ci is None else (_value(ci[0]), _value(ci[1]))


def input_shift(p: Plan) -> list[Shift]:
    """KS tests of the baseline's per-input NLL and of input lengths, original eval set vs the new
    sample. Units: each item's prompt (JSONL samples), or each non-empty line of held-out text
    (a .txt sample, against the original's held-out text)."""
    from quantgate.engines.torch import TorchEngine
    from quantgate.models.load import load_baseline

    cfg, ev = p.config, p.config.evaluation
    text = p.inputs.suffix in TEXT_SUFFIXES
    new = input_units(p.suite, text=text)
    orig_suite = load_suite(p.original.quality_gate, limit=p.original.evaluation.limit,
                            cloze_items=p.original.evaluation.cloze_items, seed=p.original.seed)
    old = input_units(orig_suite, text=text)
    if not old:
        return []
    baseline = load_baseline(cfg.model.base, cfg.precision)
    engine = TorchEngine(baseline.model, max_batch_size=ev.batch_size, batch_tokens=ev.batch_tokens)
    (old_nll, old_len), (new_nll, new_len) = (
        unit_nll(engine, baseline.tokenizer, units, max_tokens=ev.window_tokens) for units in (old, new))
    return [shift_test("baseline NLL per token", old_nll, new_nll), shift_test("length (tokens)", old_len, new_len)]


def input_units(suite: EvalSuite, *, text: bool) -> list[str]:
    """The inputs of a suite as production would send them: item prompts, or text lines."""
    if text:
        return [line for line in (suite.perplexity_text or "").splitlines() if line.strip()]
    return [item.prompt for item in suite.items if item.prompt.strip()]


def unit_nll(engine, tokenizer, units: list[str], *, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Per unit: the baseline's mean NLL per token of its first `max_tokens` tokens, each predicted
    from BOS and the tokens before it, float64 [n]; and its full length in tokens, float64 [n].
    Units that tokenize to nothing are left out."""
    from quantgate.evals.tasks import start_tokens

    start = list(start_tokens(tokenizer))  # the tokenizer's BOS, else its BOS/EOS token
    ids = [tokenizer.encode(u, add_special_tokens=False) for u in units]
    ids = [t for t in ids if t]
    windows = [[*start, *t[:max_tokens]] for t in ids]  # [len(start) + min(len, max_tokens)] each
    skip = len(start) - 1  # rows predicting the start tokens themselves are not the unit's
    nll = [float(-lp[np.arange(skip, len(w) - 1), w[skip + 1:]].double().mean())
           for w, lp in zip(windows, engine.token_logprobs(windows))]
    return np.array(nll), np.array([len(t) for t in ids], dtype=np.float64)


def shift_test(what: str, original: np.ndarray, new: np.ndarray) -> Shift:
    ks = stats.ks_2samp(original, new)
    return Shift(what, float(np.median(original)), float(np.median(new)), ks.d, ks.p, ks.n_x, ks.n_y)


# -- finish -------------------------------------------------------------------------------------


def to_dict(p: Plan, report: DriftReport) -> dict[str, Any]:
    """drift.json: the check, its inputs, and every statistic it was decided on."""
    return _json_safe({
        "checked_at": report.checked_at.isoformat(),
        "run_id": p.record.run_id,
        "model": {**p.record.model.model_dump(mode="json"), "sha256_now": report.model_sha256},
        "candidate": p.candidate,
        "inputs": {"path": str(p.inputs), "sha256": p.inputs_sha256, "items": report.items},
        "outcome": report.outcome,
        "reasons": report.reasons,
        "gate": [r.model_dump(mode="json") for r in report.gate],
        "movement": [{**asdict(m), "moved": m.moved} for m in report.movements],
        "input_shift": [{**asdict(s), "shifted": s.shifted, "alpha": SHIFT_ALPHA, "min_d": SHIFT_MIN_D}
                        for s in report.shifts],
        "exit_code": report.exit_code,
    })


def metrics(report: DriftReport) -> dict[str, float | None]:
    """The numbers stored with the check (history shows recovery, flip_rate, kld_mean)."""
    out: dict[str, float | None] = {}
    for m in report.movements:
        out[m.metric], out[f"{m.metric}_p"] = m.now, m.p
    for s, key in zip(report.shifts, ("input_nll_shift", "length_shift")):
        out[f"{key}_D"], out[f"{key}_p"] = s.d, s.p
    return {k: None if v is None or not math.isfinite(v) else float(v) for k, v in out.items()}


def finish(p: Plan, report: DriftReport, console: Console) -> int:
    """Write drift.json (and the new sample's results.json) under the results root, record the
    check in the store, print the summary; returns the exit code."""
    from quantgate.record import build_record, dump_record
    from quantgate.store import DriftCheck, digest, record_drift

    out = p.results_root / f"drift-{report.checked_at:%Y%m%dT%H%M%SZ}"
    out.mkdir(parents=True, exist_ok=True)
    payload = to_dict(p, report)
    (out / "drift.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (out / "results.json").write_text(dump_record(build_record(report.result)), encoding="utf-8")
    record_drift(p.store, DriftCheck(
        model_base=p.record.model.base, model_sha256=p.record.model.sha256, candidate=p.candidate,
        outcome=report.outcome, checked_at=report.checked_at, metrics=metrics(report), run_id=p.record.run_id,
        settings_digest=digest(p.config.resolved_candidates[0].model_dump(mode="json")),
        data_digest=p.inputs_sha256, detail="; ".join(report.reasons),
    ))
    render(p, report, console)
    console.print(f"drift check: {out / 'drift.json'}  (recorded in "
                  f"{p.store.url.render_as_string(hide_password=True)})", soft_wrap=True)
    return report.exit_code


def render(p: Plan, report: DriftReport, console: Console) -> None:
    console.print(f"[bold]drift check[/] of {p.candidate} (run {p.record.run_id}) on {p.inputs}: "
                  f"{report.items} items")
    t = Table(title="original run vs now")
    for col in ("metric", "original", "interval", "now", "interval", "test", "p", "moved"):
        t.add_column(col, justify="left" if col in ("metric", "test") else "right")
    for m in report.movements:
        t.add_row(m.metric, _num(m.before), _ci(m.before_ci), _num(m.now), _ci(m.now_ci), m.test, f"{m.p:.3g}",
                  "[red]yes[/]" if m.moved else "no")
    console.print(t)
    s = Table(title=f"input shift (KS; shift: p < {SHIFT_ALPHA} and D > {SHIFT_MIN_D})")
    for col in ("input", "original median", "new median", "D", "p", "n orig / new", "shift"):
        s.add_column(col, justify="left" if col == "input" else "right")
    for x in report.shifts:
        s.add_row(x.what, f"{x.original_median:.3g}", f"{x.new_median:.3g}", f"{x.d:.3f}", f"{x.p:.3g}",
                  f"{x.n_original} / {x.n_new}", "[red]yes[/]" if x.shifted else "no")
    console.print(s)
    for r in report.gate:
        console.print(f"gate: {r.rule}: {r.status}")
    style = {"pass": "green", "fail": "red", "inconclusive": "yellow", "error": "red"}[report.outcome]
    console.print(f"[bold {style}]drift: {report.outcome}[/]" + ("" if report.outcome == "pass" else ":"))
    for reason in report.reasons:
        console.print(f"  - {reason}", soft_wrap=True)


def _num(v: float | None) -> str:
    return "—" if v is None or math.isnan(v) else f"{v:.4g}"


def _ci(ci: Interval) -> str:
    lo, hi = (None, None) if ci is None else ci
    return f"[{_num(lo)}, {_num(hi)}]"


def _json_safe(value: Any) -> Any:
    """drift.json's values JSON-safe: NaN/inf -> None, tuples -> lists, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
