"""The run's typed config: pydantic models of the YAML file. Every default lives here.

Shape (the seed's mental model, plus a list of candidates):

    model:        {base, quantization}                   # the seed nests its one candidate here, or
    quantization: {method, bits, verified_against}      # one candidate (the same, at the top), or
    candidates:   [{method, bits, group_size, ...}, ...] # several
    serving:      {engine, max_batch_size, kv_cache, base_url | launch}
    quality_gate: {verified_against, eval_set, metric, min_acceptable, drift_check}
    evaluation:   {sizes of the default suite, batching}
    executor:     {kind: local} or {kind: ray, address, resources per model}

A candidate is validated by the config model of its method (methods/registry.py); which engine
runs which method is the backend registry's (engines/registry.py).

Values that parse but whose feature does not exist yet are rejected by `check_supported` with a
"not supported yet: ..." message, so the seed's own block is understood rather than crashed on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from quantgate.engines import registry as backends
from quantgate.errors import NotSupportedYet, UserError
from quantgate.executors import registry as executors
from quantgate.executors.registry import EXECUTORS, ExecutorConfig, LocalConfig
from quantgate.methods.registry import (
    METHODS, STEP_TYPES, Candidate, MethodConfig, RtnConfig, shorthand, upgrade_candidate,
)
from quantgate.readers import check_data, load_yaml, read_text
from quantgate.settings import DEFAULT_MAX_BATCH_SIZE, Frozen, ServingConfig

TAGS = set(METHODS) | set(STEP_TYPES) | set(EXECUTORS)  # the unions' tags (see _without_tags)
__all__ = ["Candidate", "MethodConfig", "ServingConfig", "DEFAULT_MAX_BATCH_SIZE"]  # re-exported

DEFAULT_MODEL = "smollm2-135m-instruct"
EVAL_PATH_ENV = "QUANTGATE_EVAL_PATH"  # more folders where named eval sets are looked up
NAMED_EVAL_SUFFIXES = (".jsonl", ".txt")
SEED_MAX = 2**63 - 1  # torch, numpy and the store all take a seed up to a signed 64-bit integer
DEFAULT_BATCH_TOKENS = 1024  # ~1k tokens per forward keeps activations in this CPU's caches
DEFAULT_ROUNDS = 5  # economics rounds (README, "Measuring speed honestly": cost and coverage)
# The reference the candidates are compared with: model.base evaluated in this precision
# ("baseline", "fp32" and "float32" are float32; bf16 and fp16 load the weights in that dtype).
Reference = Literal["baseline", "fp32", "float32", "bf16", "fp16"]
PRECISION_OF = {"baseline": "fp32", "fp32": "fp32", "float32": "fp32", "bf16": "bf16", "fp16": "fp16"}


class ModelConfig(Frozen):
    # The packaged default, a local Hugging Face directory, a .gguf file, or a hub id (needs network).
    base: str = DEFAULT_MODEL


DEFAULT_CANDIDATES = (
    RtnConfig(bits=8),
    RtnConfig(bits=4, group_size=64),
    RtnConfig(bits=3, group_size=64),
    RtnConfig(bits=2, group_size=64),
)


class EvalSetConfig(Frozen):
    """One eval file: JSONL items (kinds decided per line) or a plain text file (.txt/.raw) of
    held-out text for perplexity and KL divergence."""

    path: str
    task: str | None = None  # task name for every item (default: the line's "task", else the file name)
    limit: int | None = Field(None, ge=1)  # the first `limit` items of each task
    chat_template: bool = False  # render contexts / prompts through the model's chat template
    match: Literal["exact", "contains"] = "exact"  # short-answer generation, after normalisation
    scorer: str | None = Field(None, pattern=r"^[\w.]+:\w+$")  # "module:function" (prediction, item) -> [0, 1]
    max_new_tokens: int = Field(32, ge=1, le=4096)


class QualityGateConfig(Frozen):
    verified_against: Reference = "baseline"
    # "default" (the project's own offline suite), a path to a JSONL eval set, or "none"
    # (measure distributions only; no candidate can then be called shippable).
    eval_set: str = "default"
    # Several files instead of eval_set, each with its own options.
    eval_sets: tuple[EvalSetConfig, ...] | None = None
    # accuracy: argmax of summed continuation log-likelihood; accuracy_norm: per character;
    # task_accuracy: each task's own metric, named as such (multiple choice by summed
    # log-likelihood, cloze by the greedy hit, generation by its match rule or scorer: the
    # numbers of "accuracy").
    metric: Literal["accuracy", "accuracy_norm", "task_accuracy"] = "accuracy"
    # Recovery floor over all labeled items: candidate metric / baseline metric.
    min_acceptable: float = Field(0.94, gt=0.0, le=2.0)
    # Recovery floors per task (unlabeled prompt tasks: floors on agreement with the baseline).
    task_floors: dict[str, float] = {}
    # Floors on the candidate's own metric, per task or "overall".
    absolute_floors: dict[str, float] = {}
    # Budget for items whose correctness changed either way, as a fraction of labeled items.
    max_flip_rate: float | None = Field(None, ge=0.0, le=1.0)
    # Ceilings on per-token KL(baseline || candidate).
    max_kld_mean: float | None = Field(None, ge=0.0)
    max_kld_p99: float | None = Field(None, ge=0.0)
    # Two-sided confidence of the intervals a rule is judged on.
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    bootstrap_samples: int = Field(2000, ge=100, le=1_000_000)
    # A rule whose interval straddles its threshold is inconclusive, which fails unless "pass".
    inconclusive: Literal["fail", "pass"] = "fail"
    # Fewer labeled items than this: the run measures but calls no candidate shippable.
    min_items: int = Field(100, ge=1)
    drift_check: Literal["off", "daily", "weekly", "monthly"] = "weekly"
    # Rules on economics, judged on their intervals like the rules above (None: no rule). With
    # any of them the recommendation is the cheapest candidate that holds every rule.
    # Decode tokens/s over the baseline's, paired (e.g. 1.5: at least 1.5x as fast).
    min_decode_speedup: float | None = Field(None, gt=0.0)
    # The serving engine process's peak resident memory, MB (1e6 bytes).
    max_peak_rss_mb: float | None = Field(None, gt=0.0)
    # The 99th percentile of batch-1 request latency, seconds.
    max_p99_latency_s: float | None = Field(None, gt=0.0)
    # Cost per 1M generated tokens at the loaded throughput (needs economics' price and volume).
    max_cost_per_1m_tokens: float | None = Field(None, gt=0.0)

    @property
    def economics_rules(self) -> bool:
        """Whether any rule is on economics (then the recommendation is the cheapest that holds)."""
        return any(v is not None for v in (self.min_decode_speedup, self.max_peak_rss_mb, self.max_p99_latency_s,
                                           self.max_cost_per_1m_tokens))

    @model_validator(mode="after")
    def _one_eval_form(self) -> QualityGateConfig:
        if self.eval_sets is not None and "eval_set" in self.model_fields_set:
            raise ValueError("give either 'eval_set' or 'eval_sets', not both")
        if self.eval_sets is not None and not self.eval_sets:
            raise ValueError("'eval_sets' is empty")
        return self


class EvaluationConfig(Frozen):
    # The first `limit` items of each task of the eval set (None = all). The default suite's cloze
    # task has its own size, cloze_items (capped by limit too).
    limit: int | None = Field(None, ge=1)
    cloze_items: int = Field(200, ge=0)
    ppl_windows: int = Field(8, ge=1, le=100_000)
    window_tokens: int = Field(256, ge=16, le=8192)
    # Sequences in one forward pass while scoring, and an upper bound on its tokens (together
    # they bound memory).
    batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=4096)
    batch_tokens: int = Field(DEFAULT_BATCH_TOKENS, ge=64)
    # Scored items are recorded in the store every this many items (what a killed run keeps).
    record_every: int = Field(128, ge=1)


class EconomicsConfig(Frozen):
    """How the engine's speed is measured, and what the hardware costs."""

    # The fixed request mix: `requests` prompts of `prompt_tokens` tokens (from the held-out
    # text), each generating `new_tokens` tokens greedily at batch 1.
    # False: quality only, no speed or memory measured (faster; the report says so).
    measure: bool = True
    requests: int = Field(4, ge=1, le=1024)
    prompt_tokens: int = Field(64, ge=1, le=8192)
    new_tokens: int = Field(32, ge=2, le=4096)
    # Interleaved rounds (baseline, A, B, baseline, A, B, ...): every model measured this many
    # times; medians and intervals are over rounds x requests.
    rounds: int = Field(DEFAULT_ROUNDS, ge=1, le=1000)
    # Cost at volume: price of the serving machine per hour and tokens served per month.
    hardware_cost_per_hour: float | None = Field(None, gt=0)
    tokens_per_month: float | None = Field(None, gt=0)
    # A monthly saving under this is "already cheap enough at your volume".
    min_monthly_saving: float = Field(100.0, ge=0)

    @model_validator(mode="after")
    def _price_needs_volume_and_speed(self) -> EconomicsConfig:
        priced = (self.hardware_cost_per_hour is not None, self.tokens_per_month is not None)
        if any(priced) and not all(priced):
            raise ValueError("hardware_cost_per_hour and tokens_per_month go together: cost at volume needs both")
        if all(priced) and not self.measure:
            raise ValueError("a price needs measured speed: drop measure: false, or drop the price")
        return self


class CalibrationConfig(Frozen):
    """Text that calibrated methods (gptq, awq, smoothquant) see; never the eval text."""

    # "default": the calibration pool of the offline prose (disjoint from the default eval
    # suite); or a .txt file, or a .jsonl file whose lines have a "text" field.
    data: str = "default"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(256, ge=16, le=8192)
    seed: int = Field(0, ge=0, le=SEED_MAX)


class RunConfig(Frozen):
    model: ModelConfig = ModelConfig()
    # The seed's single candidate (its verified_against, if any, is the quality gate's).
    quantization: Candidate | None = None
    candidates: tuple[Candidate, ...] | None = None
    serving: ServingConfig = ServingConfig()
    quality_gate: QualityGateConfig = QualityGateConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    economics: EconomicsConfig = EconomicsConfig()
    # Where models are made and scored: {kind: local} (this process) or {kind: ray, ...} (a Ray
    # cluster; executors/registry.py). Results are the same number for number either way.
    executor: ExecutorConfig = LocalConfig()
    # "all": every candidate is measured and the smallest that holds the gate is recommended.
    # "ladder": candidates are rungs in order of aggressiveness (as listed); the run stops at the
    # first that does not hold the gate and recommends the last that did. Consecutive rungs of one
    # scheme (rtn, gptq, qat at int3 g64) are that rung by ever costlier methods: each runs only
    # when the one before failed (gate.ladder_step).
    strategy: Literal["all", "ladder"] = "all"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    results_dir: str = "quantgate-results"
    # Where runs are recorded: a SQLite file path or a URL (postgresql+psycopg://USER@HOST/DB);
    # None: <results_dir>/quantgate.db. $QUANTGATE_STORE and --store take precedence. Not part of
    # the run's settings: left out of model_dump and digest (a URL may carry a password).
    store: str | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _seed_reference(cls, data: Any) -> Any:
        """The seed writes its candidate under model (model.quantization) and verified_against
        inside it: the candidate is `quantization`'s, verified_against the gate's reference."""
        data = _seed_candidate(data)
        q = data.get("quantization") if isinstance(data, dict) else None
        if not isinstance(q, dict) or "verified_against" not in q:
            return data
        gate = data.get("quality_gate") or {}
        if not isinstance(gate, dict):
            return data
        ref = q["verified_against"]
        if "verified_against" in gate and gate["verified_against"] != ref:
            raise ValueError(f"quantization.verified_against ({ref}) and quality_gate.verified_against "
                             f"({gate['verified_against']}) disagree: give one")
        rest = {k: v for k, v in q.items() if k != "verified_against"}
        return {**data, "quantization": rest, "quality_gate": {**gate, "verified_against": ref}}

    @model_validator(mode="after")
    def _economics_rules_need_economics(self) -> RunConfig:
        gate, econ = self.quality_gate, self.economics
        if gate.economics_rules and not econ.measure:
            raise ValueError("quality_gate's economics rules (min_decode_speedup, max_peak_rss_mb, max_p99_latency_s, "
                             "max_cost_per_1m_tokens) need measured speed: drop economics.measure: false or the rules")
        if gate.max_cost_per_1m_tokens is not None and econ.hardware_cost_per_hour is None:
            raise ValueError("quality_gate.max_cost_per_1m_tokens needs a price: set economics.hardware_cost_per_hour "
                             "and economics.tokens_per_month")
        return self

    @model_validator(mode="after")
    def _one_candidate_form(self) -> RunConfig:
        if self.quantization is not None and self.candidates is not None:
            raise ValueError("give either 'quantization' (one candidate) or 'candidates', not both")
        if self.candidates is not None and not self.candidates:
            raise ValueError("'candidates' is empty: list at least one")
        labels = [c.label for c in self.resolved_candidates]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
        return self

    @property
    def resolved_candidates(self) -> tuple[MethodConfig, ...]:
        if self.quantization is not None:
            return (self.quantization,)
        return self.candidates if self.candidates is not None else DEFAULT_CANDIDATES

    @property
    def reference(self) -> str:
        return self.quality_gate.verified_against

    @property
    def precision(self) -> str:
        """The precision the baseline is evaluated in: fp32, bf16 or fp16."""
        return PRECISION_OF[self.reference]

    @property
    def needs_calibration(self) -> bool:
        """Whether making any candidate needs the calibration text."""
        return any(c.needs_calibration for c in self.resolved_candidates)

    def digest(self) -> str:
        """sha256 of the canonical JSON of the config (the identity of a run's settings)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def _seed_candidate(data: Any) -> Any:
    """model.quantization (the seed's place) moved to the top-level quantization."""
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or "quantization" not in model:
        return data
    if "quantization" in data:
        raise ValueError("model.quantization and quantization both name a candidate: give one")
    rest = {k: v for k, v in model.items() if k != "quantization"}
    return {**data, "model": rest, "quantization": model["quantization"]}


def check_supported(cfg: RunConfig) -> None:
    """Raise for what the config asks that cannot run: an engine that is not built (yet) or not
    installed, a method on an engine that does not run its artifacts, an executor whose package is
    not installed, a baseline precision the engine does not evaluate."""
    entry = backends.entry(cfg.serving.engine)
    for c in cfg.resolved_candidates:
        if not entry.runs(c.artifact):
            runs_on = backends.engines_for(c.artifact)
            theirs = [m for m, spec in METHODS.items() if entry.runs(spec.artifact)]
            raise UserError(f"candidate {c.label}: method '{c.method}' runs on serving.engine "
                            f"{' or '.join(runs_on)}, not '{entry.name}' (there: {', '.join(theirs)})")
    if cfg.precision not in entry.precisions:
        others = [e.name for e in backends.BACKENDS.values() if cfg.precision in e.precisions]
        raise NotSupportedYet(f"verified_against '{cfg.reference}' on serving.engine {entry.name} (it evaluates "
                              f"{', '.join(sorted(entry.precisions))} baselines; {cfg.precision}: {', '.join(others)})")
    entry.check_config(cfg)
    executors.entry(cfg.executor).check()


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A config as an older results.json stored it, in the current shape: candidates of schema 0
    (one flat model for every method) become their method's own fields (see
    methods.registry.upgrade_candidate); serving.max_batch_size, which also set the scoring batch,
    sets evaluation.batch_size and serving.max_concurrency too when those are absent; economics
    measured before it had rounds was measured once (rounds: 1)."""
    data = dict(data)
    if data.get("candidates"):
        data["candidates"] = [upgrade_candidate(c) for c in data["candidates"]]
    if data.get("quantization"):
        q = dict(data["quantization"])
        ref = q.pop("verified_against", None)
        data["quantization"] = upgrade_candidate(q)
        if ref is not None:
            data["quality_gate"] = {**(data.get("quality_gate") or {}), "verified_against": ref}
    economics = data.get("economics")
    if isinstance(economics, dict) and "rounds" not in economics:  # (before economics had rounds: one)
        data["economics"] = {**economics, "rounds": 1}
    serving = data.get("serving")
    if isinstance(serving, dict) and "max_concurrency" not in serving and "max_batch_size" in serving:
        data["serving"] = {**serving, "max_concurrency": serving["max_batch_size"]}
        evaluation = data.get("evaluation") or {}
        if "batch_size" not in evaluation:
            data["evaluation"] = {**evaluation, "batch_size": serving["max_batch_size"]}
    return data


# ---------------------------------------------------------------------------------------------
# Loading YAML, and command-line flags, with errors that name the file, the line, the key or the flag.
#
# Flags are a second way to write the same config: each sets one key of the YAML mapping
# (replacing what a file gave there), and the merged mapping is validated as one RunConfig.

# The named flags of `quantgate run` and `quantgate check`, and the key each sets. (--output is
# where run directories go: it overrides results_dir for the run without being a setting of it,
# so the run's config and digest are the same wherever its files are written.)
FLAG_KEYS: dict[str, str] = {
    "--model": "model.base", "--candidate": "candidates", "--eval-set": "quality_gate.eval_set",
    "--limit": "evaluation.limit", "--seed": "seed",
}
# Keys that a key set by a flag makes void (one form of a thing at a time).
VOIDS: dict[str, tuple[str, ...]] = {"candidates": ("quantization", "model.quantization"),
                                     "quality_gate.eval_set": ("quality_gate.eval_sets",)}
FLAG_PATHS = ("--model", "--eval-set")  # values that may be paths: relative to the working directory


@dataclass(frozen=True)
class Override:
    """One key set on the command line."""

    key: str  # its dotted YAML key path, e.g. "evaluation.limit"
    value: Any
    flag: str  # as written, named by errors: "--limit 0"
    items: tuple[str, ...] = ()  # a list value: each element as written ("--candidate rtn:12")

    def names(self, loc: tuple[Any, ...]) -> str | None:
        """How the user wrote the key at `loc` (a validation error's path), if this set it."""
        path = tuple(self.key.split("."))
        if tuple(str(x) for x in loc[: len(path)]) != path:
            return None
        rest = loc[len(path):]
        if self.items and rest and isinstance(rest[0], int) and rest[0] < len(self.items):
            return self.items[rest[0]]
        return self.flag


def flag_overrides(flags: Mapping[str, Any], sets: Sequence[str] = ()) -> list[Override]:
    """The overrides named flags ({"--limit": 20, "--candidate": ["rtn:8"], ...}; None or empty:
    not given) and `--set KEY=VALUE` flags (VALUE in YAML) stand for. A candidate's shorthand
    (`rtn:8`, `gptq:4:g64`) is the method registry's (methods/registry.py shorthand)."""
    out = []
    for flag, value in flags.items():
        if value is None or value == () or value == []:
            continue
        key = FLAG_KEYS[flag]
        if isinstance(value, list | tuple):
            written = tuple(f"{flag} {v}" for v in value)
            out.append(Override(key, [_shorthand(w, v) for w, v in zip(written, value)], written[0], written))
            continue
        if flag in FLAG_PATHS and Path(str(value)).exists():
            value = str(Path(str(value)).resolve())
        out.append(Override(key, str(value) if isinstance(value, Path) else value, f"{flag} {value}"))
    for text in sets:
        key, eq, raw = text.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {text}: expected KEY=VALUE (e.g. evaluation.cloze_items=12)")
        out.append(Override(key.strip(), load_yaml(raw, f"--set {text}") if raw.strip() else None, f"--set {text}"))
    return out


def _shorthand(written: str, text: str) -> dict[str, Any]:
    try:
        return shorthand(text)
    except ValueError as e:
        raise UserError(f"{written}: {e}") from None


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[Override]) -> dict[str, Any]:
    """The config mapping with each override's key set (its voided keys removed)."""
    out = copy.deepcopy(dict(data))
    for o in overrides:
        for void in VOIDS.get(o.key, ()):
            *parents, last = void.split(".")
            node = _node(out, parents, create=False)
            if isinstance(node, dict):
                node.pop(last, None)
        *parents, last = o.key.split(".")
        _node(out, parents, create=True)[last] = o.value
    return out


def _node(data: dict[str, Any], path: Sequence[str], *, create: bool) -> Any:
    """The mapping at `path` in data (made, replacing any non-mapping there, when create)."""
    for part in path:
        if not isinstance(data.get(part), dict):
            if not create:
                return None
            data[part] = {}
        data = data[part]
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[Override] = ()) -> RunConfig:
    """Read, merge, validate and resolve a config: the YAML file at `path` (None: no file, only the
    overrides; neither: the packaged default run) with command-line overrides on top. Relative
    paths in the file are relative to its folder; those of flags to the working directory."""
    if path is None and not overrides:
        path = default_config_path()
    if path is None:
        where, text, data, folder = "command line", "", {}, Path.cwd()
    else:
        path = Path(path)
        where, folder = str(path), path.parent
        text = read_text(path, "config file")
        data = load_yaml(text, where)
        if data is None:
            raise UserError(f"{path}: config is empty")
        if not isinstance(data, dict):
            raise UserError(f"{path}:1: config must be a mapping of keys (model, candidates, ...)")
    try:
        merged = apply_overrides(data, overrides)
        cfg = RunConfig.model_validate(merged)
    except ValidationError as e:
        raise UserError(_describe(where, text, e, merged, overrides)) from None
    return _resolve_paths(cfg, folder)


def config_from_mapping(data: Mapping[str, Any], where: str = "config") -> RunConfig:
    """A RunConfig from a mapping of the YAML's keys (the Python API's dict); UserError naming
    the key. Relative paths stay relative to the working directory."""
    check_data(data, where)
    try:
        return RunConfig.model_validate(dict(data))
    except ValidationError as e:
        raise UserError(_describe(where, "", e, data)) from None


def _describe(where: str, text: str, err: ValidationError, data: Mapping[str, Any],
              overrides: Sequence[Override] = ()) -> str:
    """The first validation error in one line, at the file:line, or the flag, that set its key
    (`data`: the mapping validated, overrides applied)."""
    first = err.errors()[0]
    first = {**first, "loc": _without_tags(first["loc"])}
    loc = _user_loc(first["loc"], data)
    key = ".".join(map(str, loc)) or "(top level)"
    flag = next((n for o in reversed(overrides) if (n := o.names(loc))), None)
    line = None if flag or not text else _line_of(text, loc)
    place = flag or (f"{where}:{line}" if line else where)
    if first["type"] == "extra_forbidden":
        return f"{place}: unknown key '{key}'"
    return f"{place}: {key}: {error_text(first)}" if loc else f"{place}: {error_text(first)}"


def _user_loc(loc: tuple[Any, ...], data: Mapping[str, Any]) -> tuple[Any, ...]:
    """An error's key path as the user wrote it: the seed's model.quantization (validated as the
    top-level quantization, RunConfig._seed_reference) is named model.quantization.KEY."""
    model = data.get("model")
    nested = isinstance(model, Mapping) and "quantization" in model
    return ("model", *loc) if nested and loc[:1] == ("quantization",) else loc


def _without_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """A validation error's key path without the tags the candidate and executor unions add
    (candidates.0.rtn.bits -> candidates.0.bits, executor.ray.address -> executor.address): they
    are not keys of the YAML."""
    return tuple(x for i, x in enumerate(loc) if not (i and x in TAGS and (
        isinstance(loc[i - 1], int) or loc[i - 1] in ("quantization", "executor"))))


def error_text(error: Mapping[str, Any]) -> str:
    """A pydantic error's message without the "Value error, " our own validators' messages get."""
    return str(error["msg"]).removeprefix("Value error, ")


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at a validation error's location (key path), if found."""
    node = yaml.compose(text)  # (read once already by load_yaml: it parses)
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if str(k.value) == str(part)]
            if not match:
                break
            key_node, node = match[0]
            line = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _resolve_paths(cfg: RunConfig, base_dir: Path) -> RunConfig:
    def resolve(value: str) -> str:
        candidate = base_dir / value
        return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.exists() else value

    gate = cfg.quality_gate
    sets = gate.eval_sets and tuple(e.model_copy(update={"path": resolve(e.path)}) for e in gate.eval_sets)
    calib = cfg.calibration
    eval_set = named_eval_set(gate.eval_set, base_dir) or resolve(gate.eval_set)
    updates = {
        "model": cfg.model.model_copy(update={"base": resolve(cfg.model.base)}),
        "calibration": calib.model_copy(update={"data": resolve(calib.data)}),
        "quality_gate": gate.model_copy(update={"eval_set": eval_set, "eval_sets": sets}),
    }
    return cfg.model_copy(update=updates)


def eval_set_folders(base_dir: Path) -> list[Path]:
    """Where a named eval set is looked up, in order: the config file's folder, its evals/
    folder, then each folder of $QUANTGATE_EVAL_PATH (separated by os.pathsep)."""
    extra = [Path(p) for p in os.environ.get(EVAL_PATH_ENV, "").split(os.pathsep) if p]
    return [base_dir, base_dir / "evals", *extra]


def named_eval_set(value: str, base_dir: Path) -> str | None:
    """quality_gate.eval_set given as a name (no folder, no suffix; not default or none): the
    first NAME.jsonl or NAME.txt in eval_set_folders, as an absolute path; None for anything
    else (a path). UserError saying where it looked when there is none."""
    if value in ("default", "none") or Path(value).name != value or Path(value).suffix or (base_dir / value).exists():
        return None
    folders = eval_set_folders(base_dir.resolve())  # (named in full in the error)
    for folder in folders:
        for suffix in NAMED_EVAL_SUFFIXES:
            if (folder / f"{value}{suffix}").is_file():
                return str((folder / f"{value}{suffix}").resolve())
    raise UserError(f"quality_gate.eval_set '{value}': no {value}{' or '.join(NAMED_EVAL_SUFFIXES)} in "
                    f"{', '.join(map(str, folders))} (names are looked up there; ${EVAL_PATH_ENV} adds folders)")


def default_config_path() -> Path:
    return Path(__file__).parent / "configs" / "default.yaml"
