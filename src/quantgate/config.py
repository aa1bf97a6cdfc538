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
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from quantgate.errors import NotSupportedYet, UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MAX_BATCH_SIZE = 16
DEFAULT_BATCH_TOKENS = 1024  # ~1k tokens per forward keeps activations in this CPU's caches

Method = Literal["rtn", "gptq", "awq", "smoothquant", "w8a8", "gguf", "prune"]
IMPLEMENTED_METHODS = ("rtn", "gptq", "awq", "smoothquant", "w8a8", "gguf", "prune")
# Methods that may need calibration data (prune: all scores but magnitude; see needs_calibration).
CALIBRATED_METHODS = ("gptq", "awq", "smoothquant", "prune")
PruneScore = Literal["magnitude", "wanda", "sparsegpt"]
# n:m patterns: keep n of every m consecutive input columns.
PRUNE_PATTERNS = {"2:4": (2, 4)}
PRUNE_FIELDS = ("prune", "sparsity", "pattern", "structure")
# Quantizers a `steps` composition may end with (fake-quantized in torch; a pruned zero stays 0).
STEP_QUANTIZERS = ("rtn", "gptq", "awq", "smoothquant", "w8a8")
# Weights and activations in 8 bits: smoothquant (with smoothing) and w8a8 (naive, no smoothing).
W8A8_METHODS = ("smoothquant", "w8a8")
Engine = Literal["torch", "llamacpp", "vllm", "openai", "tgi", "sglang"]
IMPLEMENTED_ENGINES = ("torch", "llamacpp", "openai")
# llama.cpp file types a gguf candidate may ask for -> nominal bits (K-quant mixes keep some
# tensors wider; the artifact's real size is measured).
GGUF_TYPE_BITS = {"Q8_0": 8, "Q6_K": 6, "Q5_K_M": 5, "Q4_K_M": 4, "Q4_0": 4, "Q3_K_M": 3, "Q2_K": 2, "IQ4_XS": 4}
# Methods that each engine runs: the torch engine evaluates fake-quantized PyTorch models; the
# llama.cpp engine evaluates GGUF files quantized by llama.cpp itself.
ENGINE_METHODS = {"torch": ("rtn", "gptq", "awq", "smoothquant", "w8a8", "prune"), "llamacpp": ("gguf",)}
# The reference the candidates are compared with. "baseline" is model.base exactly as loaded
# (float32); fp32/float32 are synonyms. bf16/fp16 references parse but are not implemented.
Reference = Literal["baseline", "fp32", "float32", "bf16", "fp16"]
IMPLEMENTED_REFERENCES = ("baseline", "fp32", "float32")


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Frozen):
    # The packaged default, a local Hugging Face directory, a .gguf file, or a hub id (needs network).
    base: str = DEFAULT_MODEL


class ServingConfig(Frozen):
    engine: Engine = "torch"
    # Largest number of sequences in one forward pass (openai: concurrent requests).
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=4096)
    # openai: the server's API root as the OpenAI SDK takes it (e.g. http://host:8000/v1), the
    # served model's name (None: the only one the server lists) and the environment variable
    # holding the API key (None: no key sent).
    base_url: str | None = Field(None, pattern=r"^https?://")
    model: str | None = None
    api_key_env: str | None = None
    # openai: seconds one try of a request may take; retries after a failed try (429, 5xx,
    # timeout, dropped connection), with exponential backoff.
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0)
    max_retries: int = Field(4, ge=0, le=20)
    # openai: log-probabilities per position asked for (KL divergence is estimated from the top k;
    # vLLM allows up to its --max-logprobs, 20 by default).
    top_logprobs: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _server_needs_url(self) -> ServingConfig:
        if self.engine == "openai" and self.base_url is None:
            raise ValueError("serving.engine openai needs base_url (e.g. http://host:8000/v1)")
        return self


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
    # gguf: llama.cpp's file type, and whether an importance matrix from the calibration text
    # guides its rounding.
    type: str | None = None
    imatrix: bool = False
    # prune: the score that picks the weights removed (magnitude: smallest |W| per matrix; wanda:
    # smallest |W_ij|·‖X_j‖ per output row; sparsegpt: OBS sweep on H = XᵀX that also updates the
    # weights kept). Giving it implies method prune; method prune alone means wanda.
    prune: PruneScore | None = None
    # Fraction removed: of each weight matrix, or with `structure` of each block's units.
    sparsity: float | None = Field(None, gt=0.0, lt=1.0)
    # "2:4": in every 4 consecutive input columns keep 2 (implies sparsity 0.5).
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    # Remove whole units so shapes shrink, the same count in every block: "mlp" intermediate
    # neurons, "heads" KV groups (a key/value head with the query heads that share it).
    structure: Literal["mlp", "heads"] | None = None
    # A composition applied in order: prune steps, then at most one quantize step (in a step,
    # `quantize: gptq` means method gptq). The candidate's method, bits and other quantization
    # settings mirror its quantize step (method prune when there is none).
    steps: tuple[CandidateConfig, ...] | None = None
    # Where this candidate is served, when not where serving says (e.g. its own vLLM server).
    serving: ServingConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _defaults_by_method(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _step_aliases(data)
        if data.get("steps") is not None:
            return _mirror_quantize_step(data)
        if data.get("method") == "prune":  # no quantization defaults; checked in _check_prune
            pattern = PRUNE_PATTERNS.get(data.get("pattern"))
            if pattern and data.get("sparsity") is None:
                data = {**data, "sparsity": 1 - pattern[0] / pattern[1]}
            return data
        if data.get("method") in W8A8_METHODS:
            if data.get("bits", 8) != 8 or data.get("group_size") is not None or data.get("symmetric") is False:
                raise ValueError(f"method {data['method']} is W8A8: int8 per-channel symmetric weights "
                                 "(leave bits, group_size and symmetric out)")
            data = {**data, "bits": 8}
        if data.get("method") == "gguf":
            data = _gguf_defaults(data)
        if data.get("symmetric") is None:
            data = {**data, "symmetric": data.get("group_size") is None}
        return data

    @model_validator(mode="after")
    def _check_prune(self) -> CandidateConfig:
        if self.steps is not None:
            _check_steps(self.steps)
        elif self.method == "prune":
            _check_prune_fields(self)
        elif any(getattr(self, k) != CandidateConfig.model_fields[k].default for k in PRUNE_FIELDS):
            raise ValueError(f"{', '.join(PRUNE_FIELDS)} belong to method prune (or a prune step in 'steps')")
        return self

    @property
    def needs_calibration(self) -> bool:
        """Whether making this candidate needs calibration data."""
        if self.steps:
            return any(s.needs_calibration for s in self.steps)
        if self.method == "prune":
            return self.prune != "magnitude"
        return self.method in CALIBRATED_METHODS

    @property
    def quantized_bits(self) -> int | None:
        """Bits per quantized weight; None when nothing is quantized (pruning alone keeps the
        baseline's precision, whatever `bits` defaults to)."""
        return None if self.method == "prune" else self.bits

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.steps:
            return "+".join(s.label for s in self.steps)
        if self.method == "prune":
            if self.pattern != "unstructured":
                return f"{self.prune}-{self.pattern}"
            return f"{self.prune}-{self.structure or 's'}{self.sparsity * 100:.4g}"
        if self.method == "smoothquant":
            return f"smoothquant-w8a8-a{self.alpha:g}"
        if self.method == "w8a8":
            return "w8a8-naive"
        if self.method == "gguf":
            return f"gguf-{self.type}" + ("-imatrix" if self.imatrix else "")
        group = f"-g{self.group_size}" if self.group_size else ""
        order = "-actorder" if self.act_order else ""
        return f"{self.method}-w{self.bits}{group}{order}"


def _gguf_defaults(data: dict[str, Any]) -> dict[str, Any]:
    gguf_type = data.get("type")
    if gguf_type not in GGUF_TYPE_BITS:
        raise ValueError(f"method gguf needs 'type', one of {', '.join(GGUF_TYPE_BITS)} (got {gguf_type!r})")
    # (the type's own bits and no group_size are what a dumped config holds: it validates again)
    if data.get("bits", GGUF_TYPE_BITS[gguf_type]) != GGUF_TYPE_BITS[gguf_type] or data.get("group_size") is not None:
        raise ValueError("method gguf: the type sets the bits and block layout (leave bits and group_size out)")
    return {**data, "bits": GGUF_TYPE_BITS[gguf_type]}


def _quantization_fields() -> list[str]:
    """CandidateConfig fields that only a quantizer reads (a prune step leaves them at defaults)."""
    own = {"method", "name", "steps", "damp", *PRUNE_FIELDS}  # damp: also sparsegpt's dampening
    return [k for k in CandidateConfig.model_fields if k not in own]


def _step_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """`quantize: X` means method X; `prune: S` implies method prune; method prune means wanda."""
    if "quantize" in data:
        if "method" in data:
            raise ValueError("give 'quantize' or 'method', not both")
        data = {**{k: v for k, v in data.items() if k != "quantize"}, "method": data["quantize"]}
    if data.get("prune") is not None and "method" not in data:
        data = {**data, "method": "prune"}
    if data.get("method") == "prune" and data.get("prune") is None and data.get("steps") is None:
        data = {**data, "prune": "wanda"}
    return data


def _mirror_quantize_step(data: dict[str, Any]) -> dict[str, Any]:
    """A composition's own method and quantization settings: those of its quantize step. Settings
    given beside `steps` must agree with it (so a dumped candidate validates again)."""
    try:
        steps = [CandidateConfig.model_validate(s) for s in data["steps"]]
    except (ValidationError, TypeError):
        return data  # the steps field's own validation reports where
    quantizers = [s for s in steps if s.method != "prune"]
    mirror = {"method": "prune"}
    if quantizers:
        mirror = {k: getattr(quantizers[-1], k) for k in ("method", "damp", *_quantization_fields())}
    fields = CandidateConfig.model_fields
    clash = [k for k, v in data.items() if k in fields and k not in ("name", "steps")
             and v != mirror.get(k, fields[k].default)]
    if clash:
        raise ValueError(f"with 'steps', give {', '.join(clash)} inside a step")
    return {**data, **mirror}


def _check_steps(steps: tuple[CandidateConfig, ...]) -> None:
    if not steps:
        raise ValueError("'steps' is empty: list at least one")
    if any(s.steps is not None or s.name is not None for s in steps):
        raise ValueError("a step has neither 'steps' nor 'name' (name the whole candidate)")
    quantize = [i for i, s in enumerate(steps) if s.method != "prune"]
    if len(quantize) > 1 or (quantize and quantize[0] != len(steps) - 1):
        raise ValueError("steps: prune steps first, then at most one quantize step")
    if quantize and steps[-1].method not in STEP_QUANTIZERS:
        raise ValueError(f"steps: quantize with one of {', '.join(STEP_QUANTIZERS)}, not {steps[-1].method}")


def _check_prune_fields(c: CandidateConfig) -> None:
    quant = [k for k in _quantization_fields() if getattr(c, k) != CandidateConfig.model_fields[k].default]
    if quant:
        raise ValueError(f"method prune does not quantize: drop {', '.join(quant)} (or compose with 'steps')")
    if c.sparsity is None:
        raise ValueError("method prune needs 'sparsity' (the fraction removed, e.g. 0.5)")
    if c.pattern != "unstructured":
        n, m = PRUNE_PATTERNS[c.pattern]
        if c.structure is not None:
            raise ValueError(f"pattern {c.pattern} is for single weights; leave it out with 'structure'")
        if not math.isclose(c.sparsity, 1 - n / m):
            raise ValueError(f"pattern {c.pattern} removes {1 - n / m:g} of the weights; leave 'sparsity' out")
    if c.structure is not None and c.prune == "sparsegpt":
        raise ValueError("structure: units are ranked by magnitude or wanda importance, not sparsegpt")


class QuantizationConfig(CandidateConfig):
    """The seed's single-candidate block; `verified_against` may sit here or in quality_gate."""

    verified_against: Reference | None = None


DEFAULT_CANDIDATES = (
    CandidateConfig(method="rtn", bits=8),
    CandidateConfig(method="rtn", bits=4, group_size=64),
    CandidateConfig(method="rtn", bits=3, group_size=64),
    CandidateConfig(method="rtn", bits=2, group_size=64),
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
    # Scored items are recorded in the store every this many items (what a killed run keeps).
    record_every: int = Field(128, ge=1)


class EconomicsConfig(Frozen):
    """How the engine's speed is measured, and what the hardware costs."""

    # The fixed request mix: `requests` prompts of `prompt_tokens` tokens (from the held-out
    # text), each generating `new_tokens` tokens greedily at batch 1.
    # False: quality only, no speed or memory measured (faster; the report says so).
    measure: bool = True
    requests: int = Field(4, ge=1, le=1024)
    prompt_tokens: int = Field(64, ge=1)
    new_tokens: int = Field(32, ge=2)
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
    seed: int = 0


class RunConfig(Frozen):
    model: ModelConfig = ModelConfig()
    quantization: QuantizationConfig | None = None
    candidates: tuple[CandidateConfig, ...] | None = None
    serving: ServingConfig = ServingConfig()
    quality_gate: QualityGateConfig = QualityGateConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    economics: EconomicsConfig = EconomicsConfig()
    # "all": every candidate is measured and the smallest that holds the gate is recommended.
    # "ladder": candidates are rungs in order of aggressiveness (as listed); the run stops at the
    # first that does not hold the gate and recommends the last that did.
    strategy: Literal["all", "ladder"] = "all"
    seed: int = 0
    results_dir: str = "quantgate-results"
    # Where runs are recorded: a SQLite file path or a URL (postgresql+psycopg://USER@HOST/DB);
    # None: <results_dir>/quantgate.db. $QUANTGATE_STORE and --store take precedence. Not part of
    # the run's settings: left out of model_dump and digest (a URL may carry a password).
    store: str | None = Field(None, exclude=True)

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
    engine = cfg.serving.engine
    if engine not in IMPLEMENTED_ENGINES:
        raise NotSupportedYet(f"serving.engine '{engine}'; available: {', '.join(IMPLEMENTED_ENGINES)}")
    for c in cfg.resolved_candidates:
        if c.serving is not None and c.serving.engine not in IMPLEMENTED_ENGINES:
            raise NotSupportedYet(f"candidate {c.label}: serving.engine '{c.serving.engine}'")
        if c.method not in IMPLEMENTED_METHODS:
            raise NotSupportedYet(
                f"method '{c.method}' (candidate {c.label}); available: {', '.join(IMPLEMENTED_METHODS)}"
            )
        if engine in ENGINE_METHODS and c.method not in ENGINE_METHODS[engine]:
            runs_on = [e for e, methods in ENGINE_METHODS.items() if c.method in methods]
            raise UserError(f"candidate {c.label}: method '{c.method}' runs on serving.engine "
                            f"{' or '.join(runs_on)}, not '{engine}' (there: {', '.join(ENGINE_METHODS[engine])})")
    if engine == "openai":
        missing = [c.label for c in cfg.resolved_candidates if c.serving is None or c.serving.engine != "openai"]
        if missing:
            raise UserError(f"candidates {', '.join(missing)}: with serving.engine openai each candidate names its "
                            "own server: serving: {engine: openai, base_url: ...}")
    if engine == "llamacpp":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError("serving.engine llamacpp needs llama-cpp-python: pip install 'quantgate[llamacpp]'") from None
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
    return f"{where}: {key}: {error_text(first)}"


def error_text(error: Mapping[str, Any]) -> str:
    """A pydantic error's message without the "Value error, " our own validators' messages get."""
    return str(error["msg"]).removeprefix("Value error, ")


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
