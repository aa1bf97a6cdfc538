"""The run record: what results.json holds, typed and versioned.

    record = build_record(result)                    # once, at the end of a run (report/data.py helpers)
    path.write_text(dump_record(record))             # results.json
    record = load_record(path)                       # any results.json quantgate ever wrote

Every reader (reports, store, drift, export) takes a RunRecord and reads attributes. A results.json
of an older schema goes through `upgrade` (the one migration function) before it is validated; a
malformed or missing field is a one-line UserError naming the file and the key. Measured numbers
that are not finite (NaN, inf) are None in the record, as JSON has no NaN.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from quantgate.config import upgrade_config
from quantgate.errors import UserError
from quantgate.gate import RuleKind, RuleResult
from quantgate.methods.registry import upgrade_candidate
from quantgate.readers import read_json

if TYPE_CHECKING:
    from quantgate.run import RunResult

SCHEMA_VERSION = 3  # results.json without a schema_version is version 0
OVERALL = "overall"  # the pooled task of a comparison (quantgate.evals.metrics.OVERALL)


def _finite(value: Any) -> Any:
    """NaN and inf -> None; numpy scalars -> Python floats (anything else is left to validation)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "item"):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


Num = Annotated[float | None, BeforeValidator(_finite)]  # a measured number; None: not measured or not finite
Interval = tuple[Num, Num] | None  # [low, high] of a confidence interval


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# ---- what was measured, with what ------------------------------------------------------------

class ModelInfo(Record):
    base: str
    source: str
    sha256: str
    description: str
    precision: Literal["fp32", "bf16", "fp16"]  # what the baseline was evaluated in (fp32 before version 2)


class Duplicate(Record):
    task: str
    id: str
    same_as: str


class EvalInfo(Record):
    eval_set: str
    metric: str  # the gate metric: accuracy | accuracy_norm
    items: int
    tasks: dict[str, int]  # task -> items
    duplicates: tuple[Duplicate, ...]
    window_tokens: int | None  # tokens scored for perplexity / KLD
    sha256: str | None  # the prepared suite's digest (evals/digest.py); None in old records


class Calibration(Record):
    source: str
    sha256: str  # of the token windows
    samples: int | None
    seq_len: int | None


class NoiseFloor(Record):
    """The baseline on the serving engine against a reference path, over the same tokens."""

    engine: str
    reference: str
    kld_mean: Num
    kld_p99: Num
    top1_agreement: Num
    tokens: int
    # Top-k rows (a server's): the mean KL(reference || reference truncated the same way), the
    # bias a full-vocabulary comparison would add, reported apart from the floor (None: untruncated).
    truncation_kld_mean: Num = None


class Machine(Record):
    memory_bandwidth_bytes_per_s: Num


class EconomicsSettings(Record):
    """economics.* of the run's config that the reports state as assumptions."""

    measure: bool | None
    requests: int | None
    prompt_tokens: int | None
    new_tokens: int | None
    hardware_cost_per_hour: Num
    tokens_per_month: Num
    min_monthly_saving: Num
    rounds: int | None = None  # interleaved rounds (None in version-1 records: one)

    @property
    def priced(self) -> bool:
        return self.hardware_cost_per_hour is not None and self.tokens_per_month is not None


class GateSettings(Record):
    """quality_gate.* of the run's config that the reports draw (floors, ceilings, CI level)."""

    min_acceptable: Num
    max_flip_rate: Num
    confidence: Num
    task_floors: dict[str, float] | None  # task -> its recovery floor


# ---- economics ---------------------------------------------------------------------------------
# Measured in interleaved rounds (economics.py): speeds and latencies are medians / percentiles over
# every request of every round with bootstrap intervals (`*_ci`); ratios to the baseline are paired.
# Version-1 records hold one round's pooled numbers and no intervals (the `*_ci` fields are None).

class Ratio(Record):
    """A candidate's figure over the baseline's, paired, with its interval."""

    value: Num
    ci: Interval


class SpeedRatios(Record):
    decode: Ratio  # > 1: faster
    prefill: Ratio
    latency_s: dict[str, Ratio]  # p50 / p95 / p99; < 1: quicker
    peak_rss: Ratio | None  # < 1: smaller
    under_load: Ratio | None  # tokens/s at the largest batch size; > 1: cheaper


class LoadLevel(Record):
    batch_size: int
    batched: bool  # False: requests queued one at a time
    latency_s: dict[str, Num] | None  # p50 / p95 / p99
    tokens_per_s: Num  # median over rounds
    # a server's levels: time to first text (p50 / p95 / p99), requests sent, their rate, tokens made
    ttft_s: dict[str, Num] | None = None
    requests: int | None = None
    requests_per_s: Num = None  # (version-1 records)
    new_tokens: int | None = None  # (version-1 records)
    tokens_per_s_ci: Interval = None
    latency_s_ci: dict[str, Interval] | None = None
    vs_baseline: Ratio | None = None  # tokens/s over the baseline's at this batch size
    replica_tokens_per_s: tuple[Num, ...] | None = None  # replicas of one server: each one's share


class Cost(Record):
    per_million_tokens: Num
    monthly: Num
    monthly_saving: Num
    worth_it: bool | None  # None for the baseline itself, or when the saving's interval straddles the bar
    note: str
    per_million_tokens_ci: Interval = None
    monthly_saving_ci: Interval = None


class Economics(Record):
    engine: str
    simulated: bool  # fake quantization: only the quality is real
    artifact_bytes: int | None
    peak_rss_bytes: int | None  # median over rounds
    prefill_tokens_per_s: Num
    decode_tokens_per_s: Num
    decode_tokens_per_s_range: Interval  # slowest and fastest single request
    latency_s: dict[str, Num] | None  # p50 / p95 / p99
    roofline_fraction: Num
    load: tuple[LoadLevel, ...]
    cost: Cost | None
    prefill_tokens_per_s_ci: Interval = None
    decode_tokens_per_s_ci: Interval = None
    latency_s_ci: dict[str, Interval] | None = None
    peak_rss_bytes_ci: Interval = None
    vs_baseline: SpeedRatios | None = None  # None for the baseline and for what was not measured
    rounds: int | None = None
    requests: int | None = None  # requests measured at batch 1: rounds x the mix

    @property
    def measured_speed(self) -> float | None:
        """Decode tokens/s when measured on a real kernel (None when simulated)."""
        return None if self.simulated else self.decode_tokens_per_s


class Conditions(Record):
    """What speed was measured on and beside (economics.Conditions)."""

    threads: int | None  # threads each engine served with (None: a server's own)
    cores: int  # cores this process could use
    cpu: str
    load_before: tuple[Num, ...]  # 1 / 5 / 15-minute load average before the economics stage
    load_during: tuple[Num, ...]  # 1-minute load average after each round
    rounds: int
    interleaved: bool = True  # False: each model's rounds back to back (one server up at a time)

    @property
    def peak_load(self) -> float:
        return max(v for v in (*self.load_before[:1], *self.load_during) if v is not None)


class Artifact(Record):
    path: str
    sha256: str
    bytes: int


# ---- a candidate against the baseline ---------------------------------------------------------

class Flips(Record):
    """Overall flips (vs_baseline.flips)."""

    correct_to_wrong: int
    wrong_to_correct: int
    answers_changed: int
    rate: Num
    items: int


class TaskFlips(Record):
    correct_to_wrong: int
    wrong_to_correct: int
    changed: int
    n: int
    rate: Num


class TaskStats(Record):
    """One task (or OVERALL) of a candidate against the baseline, with intervals."""

    task: str
    n: int
    labeled: bool  # False: unlabeled prompts, recovery is agreement with the baseline
    base: Num
    cand: Num
    recovery: Num
    recovery_ci: Interval
    diff: Num
    diff_ci: Interval
    flips: TaskFlips
    flip_rate_ci: Interval
    mcnemar_p: Num
    min_detectable_drop: Num  # None: none detectable at this flip rate (was inf)


class KldHistogram(Record):
    edges: tuple[float, ...]  # [bins + 1], log-spaced
    counts: tuple[int, ...]  # [bins]


class Comparison(Record):
    recovery: Num
    tasks: dict[str, TaskStats]
    flips: Flips
    kld_mean: Num
    kld_mean_ci: Interval
    kld_p99: Num
    kld_p99_ci: Interval
    top1_agreement: Num
    kld_hist: KldHistogram | None

    @property
    def overall(self) -> TaskStats | None:
        return self.tasks.get(OVERALL)


class Rule(Record):
    rule: str  # e.g. "accuracy recovery >= 0.94"
    status: Literal["pass", "fail", "inconclusive"]
    value: Num
    interval: Interval
    threshold: Num
    kind: RuleKind
    passed: bool


class Gate(Record):
    passed: bool
    rules: tuple[Rule, ...]


Direction = Literal["correct->wrong", "wrong->correct", "output changed"]


class FlippedItem(Record):
    id: str
    task: str
    prompt: str
    gold: str | None
    baseline_answer: str | None
    candidate_answer: str | None
    direction: Direction


class ModelRecord(Record):
    """The baseline, or what every candidate has too."""

    name: str
    weight_bytes: int
    accuracy: Num
    accuracy_norm: Num
    per_task: dict[str, Num]  # task -> the gate metric
    perplexity: Num
    eval_seconds: Num
    items_scored: int | None  # None in old records
    items_reused: int | None
    economics: Economics | None
    artifact: Artifact | None  # the file the engine evaluated (GGUF)
    scheme: str | None = None  # what the weights are, in words (None in old records)
    bytes_counted: str | None = None  # which bytes weight_bytes counts (None in old records)
    unservable: str | None = None  # why the serving engine could not serve it (then simulated)

    def metric(self, name: str) -> float | None:
        """The model's own value of the gate metric `name` (accuracy | accuracy_norm)."""
        return self.accuracy_norm if name == "accuracy_norm" else self.accuracy


class CandidateRecord(ModelRecord):
    method: str
    bits: int | None  # None: nothing quantized (pruning alone)
    group_size: int | None
    symmetric: bool | None
    settings: dict[str, Any] | None  # the candidate's config as JSON (config.py's to read)
    modules_changed: int
    quantize_seconds: Num
    vs_baseline: Comparison
    gate: Gate
    flipped_items: tuple[FlippedItem, ...]
    aa_check: bool  # the baseline itself served again (method none): measured, never recommended


class FailedCandidate(Record):
    name: str
    settings: dict[str, Any] | None
    error: str


class Rung(Record):
    name: str
    status: Literal["pass", "fail", "not needed", "not measured"]


class Recommendation(Record):
    candidate: str | None
    reason: str


class RunRecord(Record):
    schema_version: int
    run_id: str
    started: datetime
    finished: datetime
    config: dict[str, Any]  # the RunConfig as JSON (validated by config.py where a reader needs it)
    config_digest: str
    environment: dict[str, str]
    model: ModelInfo
    eval: EvalInfo
    calibration: Calibration | None
    noise_floor: NoiseFloor | None
    notes: tuple[str, ...]
    machine: Machine
    conditions: Conditions | None  # None: no speed measured (or a version-1 record)
    economics_config: EconomicsSettings | None
    quality_gate: GateSettings
    seed: int | None
    baseline: ModelRecord
    candidates: tuple[CandidateRecord, ...]
    failed_candidates: tuple[FailedCandidate, ...]
    strategy: str  # all | ladder
    ladder: tuple[Rung, ...] | None
    recommendation: Recommendation
    exit_code: int
    # A bf16/fp16 baseline: the checkpoint in fp32 scored against it like a candidate (never
    # recommended); None for an fp32 baseline.
    full_precision: CandidateRecord | None

    @property
    def models(self) -> tuple[ModelRecord, ...]:
        return (self.baseline, *self.candidates)

    @property
    def recommended(self) -> str | None:
        return self.recommendation.candidate

    def candidate(self, name: str) -> CandidateRecord | None:
        return next((c for c in self.candidates if c.name == name), None)


# ---- per-item records (items.jsonl beside results.json) -------------------------------------------

class ItemScore(Record):
    """One model's outcome on one item."""

    answer: str | None  # the answer it gave: the option chosen, a generation's first line, ...
    score: Num  # under the gate metric, in [0, 1]; None: unlabeled (a prompt item)
    correct: bool | None  # score >= 0.5; None: unlabeled
    option_ll: tuple[Num, ...] | None = None  # each option's summed log-likelihood (None: -inf)
    greedy: tuple[bool, ...] | None = None  # each option's continuation was the greedy choice


class ItemRecord(Record):
    """One eval item with every model's outcome (one line of items.jsonl), like lm-eval's
    --log_samples: all items, not only the flipped ones."""

    index: int  # position in the eval suite
    id: str
    task: str
    kind: Literal["choice", "cloze", "generation", "prompt"]
    prompt: str
    gold: str | None  # None: unlabeled
    models: dict[str, ItemScore]  # "baseline" and each candidate, by name


def dump_items(items: Iterable[ItemRecord]) -> str:
    """items.jsonl's text: one JSON object per line."""
    return "".join(i.model_dump_json() + "\n" for i in items)


# ---- building, writing, reading ---------------------------------------------------------------

def build_record(result: RunResult) -> RunRecord:
    """The record of a finished run (built once; every report renders from it)."""
    from quantgate.report.data import record_fields

    return RunRecord(schema_version=SCHEMA_VERSION, **record_fields(result))


def rule_record(r: RuleResult) -> Rule:
    """A gate rule as recorded (gate.RuleResult with its pass flag)."""
    return Rule(rule=r.rule, status=r.status, value=r.value, interval=r.interval, threshold=r.threshold,
                kind=r.kind, passed=r.passed)


def dump_record(record: RunRecord) -> str:
    """results.json's text (NaN/inf are null already: the record holds None)."""
    return record.model_dump_json(indent=2) + "\n"


def load_record(source: Path | Mapping[str, Any], *, where: str | None = None,
                check_config: bool = False) -> RunRecord:
    """A RunRecord from a results.json path or its parsed content (`where` names it in errors),
    of any schema version: upgraded, then validated. check_config: the config must match its
    config_digest as stored (before any upgrade), else UserError (the file was edited)."""
    if isinstance(source, Path):
        where = where or str(source)
        data = _read_json(source)
    else:
        where, data = where or "results", source
    if not isinstance(data, Mapping):
        raise UserError(f"{where}: expected a JSON object, found {type(data).__name__}")
    _require(data, REQUIRED + (("config", "config_digest") if check_config else ()), where)
    if check_config and _digest(data.get("config")) != data.get("config_digest"):
        raise UserError(f"{where}: the stored config does not match its config_digest (edited?)")
    try:
        return RunRecord.model_validate(upgrade(dict(data), where))
    except ValidationError as e:
        raise UserError(f"{where}: {error_line(e)}") from None


def _read_json(path: Path) -> Any:
    return read_json(path, "results file")


def _digest(config: Any) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def error_line(e: ValidationError, under: str = "") -> str:
    """The first validation error in one line: "missing key 'candidates[1].gate'", or the key and
    what is wrong with its value; keys are named below `under` (e.g. "measured") when given."""
    first = e.errors()[0]
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (under, *first["loc"]) if p != "").lstrip(".")
    if first["type"] == "missing":
        return f"missing key '{key}'"
    if first["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    return f"key '{key}': {first['msg']} (got {str(first.get('input'))[:60]!r})"


# ---- migration --------------------------------------------------------------------------------

REQUIRED = ("baseline", "candidates", "recommendation")  # what makes a dict a results file at all


def upgrade(data: dict[str, Any], where: str = "results") -> dict[str, Any]:
    """Any results.json content (a parsed dict) in the current schema's shape, not yet validated.
    Version 0 (no schema_version): every results.json before the record, and older files still
    that lack parts added since (noise floor, economics, rule kinds, settings ...). Versions 1
    and 2: before both the baseline's precision (it was float32) and economics in rounds were
    recorded (a version-2 file has one or the other). The run's config is converted by config.py
    (upgrade_config). UserError for a newer schema or for a
    dict that is no results file."""
    version = data.get("schema_version", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{where}: schema_version {version!r}: written by a newer quantgate (this one reads up to "
                        f"{SCHEMA_VERSION})")
    _require(data, REQUIRED, where)
    if version == 0:
        data = _from_v0(data)
    if version <= 2:
        data = _from_v2(data)
    return data


def _from_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Versions 1 and 2 -> 3. Version 1 recorded neither the baseline's precision (it was always
    float32; no full-precision row) nor economics in rounds. Version 2 was written by two lines of
    development with one of those each: the precision and the full-precision row, or the
    measuring conditions and the A/A flag. Whatever a file lacks gets its value from before: fp32,
    no full-precision row, no measuring conditions, no candidate an A/A check (method none did not
    exist), and a config measured once (upgrade_config: economics.rounds 1)."""
    out = {"full_precision": None, "conditions": None, **data, "schema_version": 3}
    if isinstance(out.get("model"), dict):
        out["model"] = {"precision": "fp32", **out["model"]}
    if isinstance(out.get("config"), dict) and out["config"]:
        out["config"] = upgrade_config(out["config"])
        out["config_digest"] = _digest(out["config"])
    if isinstance(out["candidates"], list):
        out["candidates"] = [{"aa_check": False, **c} if isinstance(c, dict) else c for c in out["candidates"]]
    if isinstance(out["full_precision"], dict):
        out["full_precision"] = {"aa_check": False, **out["full_precision"]}
    return out


def _require(data: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise UserError(f"{where}: missing key '{missing[0]}' (not a quantgate results file?)")


def _from_v0(data: dict[str, Any]) -> dict[str, Any]:
    """Version 0 -> 1: parts older files lack get their empty value; the gate settings the reports
    draw are lifted out of the config; rules get the kind their text names; a model's cost beside
    its economics moves inside it; calibration "shape" becomes samples and seq_len."""
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    gate = config.get("quality_gate") if isinstance(config.get("quality_gate"), dict) else {}
    out = {"calibration": None, "noise_floor": None, "notes": [], "machine": {}, "economics_config": None,
           "failed_candidates": [], "strategy": "all", "ladder": None, **data, "schema_version": 1}
    out["quality_gate"] = {k: gate.get(k) for k in GateSettings.model_fields}
    out["seed"] = config.get("seed")
    out["machine"] = {"memory_bandwidth_bytes_per_s": None, **(out["machine"] or {})}
    if isinstance(out["economics_config"], dict):
        out["economics_config"] = {k: out["economics_config"].get(k) for k in EconomicsSettings.model_fields}
    if isinstance(out.get("eval"), dict):
        out["eval"] = {"duplicates": [], "window_tokens": None, "sha256": None, **out["eval"]}
    if isinstance(out["calibration"], dict) and "shape" in out["calibration"]:
        calib = dict(out["calibration"])
        samples, seq_len = (calib.pop("shape") or [None, None])[:2]
        out["calibration"] = {"samples": samples, "seq_len": seq_len, **calib}
    metric = out["eval"].get("metric", "accuracy") if isinstance(out.get("eval"), dict) else "accuracy"
    if isinstance(out["baseline"], dict):
        out["baseline"] = _model_v0(out["baseline"])
    out["failed_candidates"] = [{**f, "settings": upgrade_candidate(f["settings"])}
                                if isinstance(f, dict) and isinstance(f.get("settings"), dict) else f
                                for f in out["failed_candidates"] or []]
    if isinstance(out["candidates"], list):
        out["candidates"] = [_candidate_v0(c, metric) if isinstance(c, dict) else c for c in out["candidates"]]
    if isinstance(config, dict) and config:  # the run's config in the current shape, and the digest of that
        out["config"] = upgrade_config(config)  # (load_record's check_config checked the digest as stored)
        out["config_digest"] = _digest(out["config"])
    return out


def _model_v0(m: dict[str, Any]) -> dict[str, Any]:
    m = {"items_scored": None, "items_reused": None, "economics": None, "artifact": None, **m}
    cost = m.pop("cost", None)
    if isinstance(m["economics"], dict):
        economics = {"artifact_bytes": None, "peak_rss_bytes": None, "prefill_tokens_per_s": None,
                     "decode_tokens_per_s": None, "decode_tokens_per_s_range": None, "latency_s": None,
                     "roofline_fraction": None, "load": [], "cost": cost, **m["economics"]}
        economics["load"] = [{"batched": True, **lv} if isinstance(lv, dict) else lv for lv in economics["load"] or []]
        m["economics"] = economics
    return m


def _candidate_v0(c: dict[str, Any], metric: str) -> dict[str, Any]:
    c = {"settings": None, "flipped_items": [], **_model_v0(c)}
    if isinstance(c["settings"], dict):  # one flat candidate model then: its method's own fields now
        c["settings"] = upgrade_candidate(c["settings"])
    c.setdefault("modules_changed", 0)
    c.setdefault("quantize_seconds", None)
    vs = c.get("vs_baseline")
    if isinstance(vs, dict):
        c["vs_baseline"] = {"kld_hist": None, **vs}
    gate = c.get("gate")
    if isinstance(gate, dict) and isinstance(gate.get("rules"), list):
        c["gate"] = {**gate, "rules": [_rule_v0(r, metric) for r in gate["rules"]]}
    return c


def _rule_v0(r: Any, metric: str) -> Any:
    """A rule of a version-0 file: its kind, from the rule's text when it has none (the text is
    gate.judge's; this is the one place that reads it)."""
    if not isinstance(r, dict) or "kind" in r:
        return r
    text = str(r.get("rule", ""))
    kind = (RuleKind.FLIP_RATE if text.startswith("flip rate") else
            RuleKind.KLD_MEAN if text.startswith("KLD mean") else
            RuleKind.KLD_P99 if text.startswith("KLD p99") else
            RuleKind.ENGINE if text.startswith("engine ran") else
            RuleKind.NO_RULE if text.startswith("some gate rule") else
            RuleKind.AGREEMENT if "agreement with baseline" in text else
            RuleKind.RECOVERY if text.startswith(f"{metric} recovery") else
            RuleKind.TASK_RECOVERY if " recovery >= " in text else RuleKind.ABSOLUTE)
    return {**r, "kind": kind.value, "passed": r.get("passed", r.get("status") == "pass")}
