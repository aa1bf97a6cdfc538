"""The run's typed config: pydantic models of the YAML file. Every default lives here.

Shape (the seed's mental model, plus a list of candidates):

    model:        {base}
    quantization: {method, bits, verified_against}      # one candidate (the seed's form), or
    candidates:   [{method, bits, group_size, ...}, ...] # several
    serving:      {engine, max_batch_size}
    quality_gate: {verified_against, eval_set, metric, min_acceptable, drift_check}
    evaluation:   {sizes of the default suite, batching}

Values that parse but whose feature does not exist yet are rejected by `check_supported` with a
"not supported yet: ..." message, so the seed's own block is understood rather than crashed on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantgate.errors import NotSupportedYet, UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_TOKENS = 1024  # ~1k tokens per forward keeps activations in this CPU's caches

Method = Literal["rtn", "gptq", "awq", "smoothquant", "w8a8", "gguf", "prune"]
IMPLEMENTED_METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8")
CALIBRATED_METHODS = ("gptq", "awq", "smoothquant")
# Weights and activations in 8 bits: smoothquant (with smoothing) and w8a8 (naive, no smoothing).
W8A8_METHODS = ("smoothquant", "w8a8")
Engine = Literal["torch", "llamacpp", "vllm", "openai", "tgi", "sglang"]
IMPLEMENTED_ENGINES = ("torch",)
# The reference the candidates are compared with. "baseline" is model.base exactly as loaded
# (float32); fp32/float32 are synonyms. bf16/fp16 references parse but are not implemented.
Reference = Literal["baseline", "fp32", "float32", "bf16", "fp16"]
IMPLEMENTED_REFERENCES = ("baseline", "fp32", "float32")


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Frozen):
    # The packaged default, a local Hugging Face directory, a .gguf file, or a hub id (needs network).
    base: str = DEFAULT_MODEL


class CandidateConfig(Frozen):
    method: Method = "rtn"
    bits: int = Field(4, ge=2, le=8)
    # Columns per quantization group along the input dimension; None = one scale per output row.
    group_size: int | None = Field(None, ge=1)
    # None: symmetric when there is no group (per-channel), asymmetric with groups.
    symmetric: bool | None = None
    # Embeddings and lm_head stay at the baseline's precision unless asked for.
    quantize_embeddings: bool = False
    name: str | None = None
    # gptq: process columns by descending Hessian diagonal; dampening as a fraction of its mean.
    act_order: bool = False
    damp: float = Field(0.01, gt=0.0, lt=1.0)
    # awq: points of the scale-exponent grid searched per group of linears.
    grid: int = Field(20, ge=1, le=100)
    # smoothquant: migration strength (0: all difficulty stays on activations, 1: all on weights).
    alpha: float = Field(0.5, ge=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_method(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if data.get("method") in W8A8_METHODS:
            if data.get("bits", 8) != 8 or data.get("group_size") is not None or data.get("symmetric") is False:
                raise ValueError(f"method {data['method']} is W8A8: int8 per-channel symmetric weights "
                                 "(leave bits, group_size and symmetric out)")
            data = {**data, "bits": 8}
        if data.get("symmetric") is None:
            data = {**data, "symmetric": data.get("group_size") is None}
        return data

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.method == "smoothquant":
            return f"smoothquant-w8a8-a{self.alpha:g}"
        if self.method == "w8a8":
            return "w8a8-naive"
        group = f"-g{self.group_size}" if self.group_size else ""
        order = "-actorder" if self.act_order else ""
        return f"{self.method}-w{self.bits}{group}{order}"


class QuantizationConfig(CandidateConfig):
    """The seed's single-candidate block; `verified_against` may sit here or in quality_gate."""

    verified_against: Reference | None = None


DEFAULT_CANDIDATES = (
    CandidateConfig(method="rtn", bits=8),
    CandidateConfig(method="rtn", bits=4, group_size=64),
    CandidateConfig(method="rtn", bits=3, group_size=64),
    CandidateConfig(method="rtn", bits=2, group_size=64),
)


class ServingConfig(Frozen):
    engine: Engine = "torch"
    # Largest number of sequences in one forward pass.
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=4096)


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
    # accuracy: argmax of summed continuation log-likelihood; accuracy_norm: per character.
    metric: Literal["accuracy", "accuracy_norm"] = "accuracy"
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
    bootstrap_samples: int = Field(2000, ge=100)
    # A rule whose interval straddles its threshold is inconclusive, which fails unless "pass".
    inconclusive: Literal["fail", "pass"] = "fail"
    # Fewer labeled items than this: the run measures but calls no candidate shippable.
    min_items: int = Field(100, ge=1)
    drift_check: Literal["off", "daily", "weekly", "monthly"] = "weekly"

    @model_validator(mode="after")
    def _one_eval_form(self) -> QualityGateConfig:
        if self.eval_sets is not None and "eval_set" in self.model_fields_set:
            raise ValueError("give either 'eval_set' or 'eval_sets', not both")
        if self.eval_sets is not None and not self.eval_sets:
            raise ValueError("'eval_sets' is empty")
        return self


class EvaluationConfig(Frozen):
    # The first `limit` items of each task of the eval set (None = all). The default suite's cloze
    # task has its own size, cloze_items.
    limit: int | None = Field(None, ge=1)
    cloze_items: int = Field(200, ge=0)
    ppl_windows: int = Field(8, ge=1)
    window_tokens: int = Field(256, ge=16, le=8192)
    # Upper bound on tokens in one forward pass (with max_batch_size it bounds memory).
    batch_tokens: int = Field(DEFAULT_BATCH_TOKENS, ge=64)


class CalibrationConfig(Frozen):
    """Text that calibrated methods (gptq, awq, smoothquant) see; never the eval text."""

    # "default": the calibration pool of the offline prose (disjoint from the default eval
    # suite); or a .txt file, or a .jsonl file whose lines have a "text" field.
    data: str = "default"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(256, ge=16, le=8192)
    seed: int = 0


class RunConfig(Frozen):
    model: ModelConfig = ModelConfig()
    quantization: QuantizationConfig | None = None
    candidates: tuple[CandidateConfig, ...] | None = None
    serving: ServingConfig = ServingConfig()
    quality_gate: QualityGateConfig = QualityGateConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    seed: int = 0
    results_dir: str = "quantgate-results"

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
    def resolved_candidates(self) -> tuple[CandidateConfig, ...]:
        if self.quantization is not None:
            fields = self.quantization.model_dump(exclude={"verified_against"})
            return (CandidateConfig(**fields),)
        return self.candidates if self.candidates is not None else DEFAULT_CANDIDATES

    @property
    def reference(self) -> str:
        q = self.quantization
        return q.verified_against if q and q.verified_against else self.quality_gate.verified_against

    def digest(self) -> str:
        """sha256 of the canonical JSON of the config (the identity of a run's settings)."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def check_supported(cfg: RunConfig) -> None:
    """Raise NotSupportedYet for values that parse but whose feature is not built yet."""
    for c in cfg.resolved_candidates:
        if c.method not in IMPLEMENTED_METHODS:
            raise NotSupportedYet(
                f"method '{c.method}' (candidate {c.label}); available: {', '.join(IMPLEMENTED_METHODS)}"
            )
    if cfg.serving.engine not in IMPLEMENTED_ENGINES:
        raise NotSupportedYet(
            f"serving.engine '{cfg.serving.engine}'; available: {', '.join(IMPLEMENTED_ENGINES)}"
        )
    if cfg.reference not in IMPLEMENTED_REFERENCES:
        raise NotSupportedYet(
            f"verified_against '{cfg.reference}': the reference is model.base as loaded (float32); "
            "use 'baseline'"
        )


# ---------------------------------------------------------------------------------------------
# Loading YAML with errors that name the file, the line and the key.


def load_config(path: str | Path) -> RunConfig:
    """Read, validate and resolve a YAML config. Relative paths in it are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: malformed YAML: {e.problem or e.context}") from None
    if data is None:
        raise UserError(f"{path}: config is empty")
    if not isinstance(data, dict):
        raise UserError(f"{path}:1: config must be a mapping of keys (model, candidates, ...)")
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_describe(path, text, e)) from None
    return _resolve_paths(cfg, path.parent)


def _describe(path: Path, text: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = tuple(str(x) for x in first["loc"])
    key = ".".join(loc) or "(top level)"
    line = _line_of(text, first["loc"])
    where = f"{path}:{line}" if line else str(path)
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown key '{key}'"
    return f"{where}: {key}: {first['msg']}"


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at a validation error's location (key path), if found."""
    node = yaml.compose(text)
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == part]
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
    updates = {
        "model": cfg.model.model_copy(update={"base": resolve(cfg.model.base)}),
        "calibration": calib.model_copy(update={"data": resolve(calib.data)}),
        "quality_gate": gate.model_copy(update={"eval_set": resolve(gate.eval_set), "eval_sets": sets}),
    }
    return cfg.model_copy(update=updates)


def default_config_path() -> Path:
    return Path(__file__).parent / "configs" / "default.yaml"
