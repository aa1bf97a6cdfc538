"""The method registry: one entry per compression method, holding everything about it.

An entry (MethodSpec) names
  - its own config model (a frozen pydantic model; a candidate in the YAML is validated against
    the model its `method` names: a discriminated union, so an unknown method or a key that
    belongs to another method is an error, never a silent RTN);
  - what it produces (`artifact`): "model" (a changed copy of the PyTorch baseline), "gguf" (a
    llama.cpp file type made by llama.cpp's quantizer), "served" (a model someone else serves
    behind an HTTP API) or "baseline" (the baseline itself, served again: the A/A check, which
    every engine runs). A serving backend (engines/registry.py) says which of these it runs;
  - the function that applies it to a model ("module:function", imported on use, so reading a
    config never imports torch).
The statistics a method needs from calibration are declared by its config
(`calibration_needs()`); `needs_calibration`, engine checks and labels derive from the entry.

Adding a method: a config class and a MethodSpec here, its pure tensor function in its own
module, and a block/weight driver function in methods/apply.py.

This module imports pydantic only (no torch): config.py builds the run's config from it.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, TypeAdapter, field_serializer, model_validator

from quantgate.settings import ServingConfig

Artifact = Literal["model", "gguf", "served", "baseline"]
# Statistics the calibration driver (methods/calibrate.py) collects per group of linears,
# "imatrix" (each block linear's mean squared input per column, for llama.cpp's quantizer) and
# "blocks" (each block's own inputs, handed to the method: qat's reconstruction).
Statistic = Literal["hessian", "rows", "absmax", "imatrix", "blocks"]

# llama.cpp file types a gguf candidate may ask for -> nominal bits (K-quant mixes keep some
# tensors wider; the artifact's real size is measured).
GGUF_TYPE_BITS = {"Q8_0": 8, "Q6_K": 6, "Q5_K_M": 5, "Q4_K_M": 4, "Q4_0": 4, "Q3_K_M": 3, "Q2_K": 2, "IQ4_XS": 4}
# n:m patterns: keep n of every m consecutive input columns.
PRUNE_PATTERNS = {"2:4": (2, 4)}
# What a served candidate may declare it runs -> bits per weight (sizes it for "smallest passing").
SERVED_SCHEMES = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8, "w8a8": 8, "w8a16": 8,
                  "w4a16": 4, "int4": 4, "nf4": 4}


class MethodConfig(BaseModel):
    """What every candidate config has: its method, an optional name, and the derived facts."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str | None = None
    # Set by each subclass: its registry entry's artifact kind (see module docstring).
    artifact: ClassVar[Artifact] = "model"
    # Its command-line shorthand (`method:token:...`, see shorthand()): bare values fill
    # POSITIONAL's fields in order; <prefix><integer> sets the field PREFIXED names for the prefix;
    # a word of WORDS sets (field, value); key=value sets any field.
    POSITIONAL: ClassVar[tuple[str, ...]] = ()
    PREFIXED: ClassVar[dict[str, str]] = {}
    WORDS: ClassVar[dict[str, tuple[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _quantize_alias(cls, data: Any) -> Any:
        """`quantize: X` (in a composition's steps) means method X."""
        if isinstance(data, dict) and "quantize" in data:
            if "method" in data:
                raise ValueError("give 'quantize' or 'method', not both")
            data = {**{k: v for k, v in data.items() if k != "quantize"}, "method": data["quantize"]}
        return data

    def calibration_needs(self) -> frozenset[str]:
        """Statistics this candidate needs from the calibration text (empty: none)."""
        return frozenset()

    def training_tokens(self, samples: int, seq_len: int) -> int:
        """Tokens run through the model, in forward-pass equivalents, beyond the calibration
        passes every calibrated method makes (quantgate check's estimate); 0: none."""
        return 0

    def engine_settings(self) -> frozenset[str]:
        """Settings this candidate gives that only some engines use (accuracy_level); each
        backend entry says which it uses (engines/registry.py) and refuses the others."""
        return frozenset()

    # Whether making it changes tensors besides its target linears' weights (scales folded into
    # the norms or linears that feed them): then those weights alone, as an engine's artifact
    # stores them, do not rebuild the candidate (export makes it again instead).
    FOLDS_INTO_FEEDERS: ClassVar[bool] = False

    @property
    def weights_alone(self) -> bool:
        """Its linears' weights are everything it changed (see FOLDS_INTO_FEEDERS)."""
        return not self.FOLDS_INTO_FEEDERS

    @property
    def needs_calibration(self) -> bool:
        return bool(self.calibration_needs())

    @property
    def is_baseline(self) -> bool:
        """The baseline itself served again (the A/A check): measured like any candidate, never
        recommended."""
        return self.artifact == "baseline"

    @property
    def quantized_bits(self) -> int | None:
        """Bits per quantized weight; None when nothing is quantized (pruning alone)."""
        return None

    @property
    def quantizer(self) -> _Quantizer | None:
        """The config whose grid the PyTorch weights end on (a composition's quantize step);
        None when no weight is put on an integer grid in PyTorch."""
        return None

    @property
    def scheme(self) -> str:
        """What the weights become, in words (e.g. "int4 g64 asym"); the views' scheme column."""
        return "float (unquantized)"

    @property
    def label(self) -> str:
        return self.name or self.auto_label()

    def auto_label(self) -> str:
        raise NotImplementedError

    @classmethod
    def from_shorthand(cls, tokens: list[str]) -> dict[str, Any]:
        """The YAML fields a shorthand's tokens (after the method) stand for; ValueError for a
        token that is none of the forms (see POSITIONAL)."""
        fields: dict[str, Any] = {}
        positional = list(cls.POSITIONAL)
        for token in tokens:
            key, value = cls._token(token, positional)
            if key in fields:
                raise ValueError(f"'{token}' sets {key} a second time")
            fields[key] = value
        return fields

    @classmethod
    def _token(cls, token: str, positional: list[str]) -> tuple[str, Any]:
        key, eq, raw = token.partition("=")
        if eq:
            return key, _scalar(raw)
        if token in cls.WORDS:
            return cls.WORDS[token]
        for prefix, field in cls.PREFIXED.items():
            if token.startswith(prefix) and token[len(prefix):].isdigit():
                return field, int(token[len(prefix):])
        if positional and token:
            return positional.pop(0), _scalar(token)
        raise ValueError(f"'{token}' is not a setting of method {cls.model_fields['method'].default} "
                         f"({cls.shorthand_help()})")

    @classmethod
    def shorthand_help(cls) -> str:
        forms = [f"bare values: {', '.join(cls.POSITIONAL)}"] if cls.POSITIONAL else []
        forms += [f"{p}<N>: {f}" for p, f in cls.PREFIXED.items()]
        forms += [f"words: {', '.join(cls.WORDS)}"] if cls.WORDS else []
        return "; ".join([*forms, "key=value: any field"])


def _scalar(text: str) -> Any:
    """A shorthand value: an integer, a number, true/false, null, or else the text itself."""
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None, "none": None}.get(text.lower(), text)


def _extras(cfg: BaseModel, shown: dict[str, Callable[[Any], str]]) -> str:
    """Label suffixes for the fields in `shown` whose value is not their default, so that two
    candidates that differ in any setting get different labels."""
    fields = type(cfg).model_fields
    return "".join(fmt(getattr(cfg, k)) for k, fmt in shown.items() if getattr(cfg, k) != fields[k].default)


class _Quantizer(MethodConfig):
    """Integer weights on a grid: RTN, GPTQ, AWQ (and the W8A8 methods with bits fixed at 8)."""

    bits: int = Field(4, ge=2, le=8)
    # Columns per quantization group along the input dimension; None = one scale per output row.
    group_size: int | None = Field(None, ge=1)
    # None: symmetric when there is no group (per-channel), asymmetric with groups.
    symmetric: bool | None = None
    # Embeddings and lm_head stay at the baseline's precision unless asked for.
    quantize_embeddings: bool = False
    # Bits every block linear's input is fake-quantized to at run time (None: inputs stay float).
    activation_bits: ClassVar[int | None] = None
    # ONNX Runtime's MatMulNBits compute type: 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8
    # activations. None: the engine's default (0). Engines without it refuse it.
    accuracy_level: int | None = Field(None, ge=0, le=4, exclude_if=lambda v: v is None)
    ENGINE_SETTINGS: ClassVar[tuple[str, ...]] = ("accuracy_level",)
    POSITIONAL = ("bits",)  # rtn:4:g64:sym
    PREFIXED = {"w": "bits", "g": "group_size"}
    WORDS = {"sym": ("symmetric", True), "asym": ("symmetric", False), "emb": ("quantize_embeddings", True)}

    @model_validator(mode="after")
    def _symmetric_default(self) -> _Quantizer:
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.group_size is None)
        return self

    def engine_settings(self) -> frozenset[str]:
        return frozenset(k for k in self.ENGINE_SETTINGS if getattr(self, k) is not None)

    @property
    def quantized_bits(self) -> int:
        return self.bits

    @property
    def quantizer(self) -> _Quantizer:
        return self

    @property
    def scheme(self) -> str:
        group = f" g{self.group_size}" if self.group_size else " per-channel"
        return f"int{self.bits}{group} {'sym' if self.symmetric else 'asym'}"

    def _grid_label(self) -> str:
        group = f"-g{self.group_size}" if self.group_size else ""
        sym = "" if self.symmetric == (self.group_size is None) else ("-sym" if self.symmetric else "-asym")
        return f"{self.method}-w{self.bits}{group}{sym}" + _extras(self, {"quantize_embeddings": lambda v: "-emb",
                                                                          "accuracy_level": lambda v: f"-acc{v}"})


class RtnConfig(_Quantizer):
    """Round-to-nearest, per channel or per group (methods/rtn.py)."""

    method: Literal["rtn"] = "rtn"

    def auto_label(self) -> str:
        return self._grid_label()


class GptqConfig(_Quantizer):
    """GPTQ (methods/gptq.py): columns quantized in order, error compensated through H = XᵀX."""

    method: Literal["gptq"] = "gptq"
    # Process columns by descending Hessian diagonal; dampening as a fraction of its mean.
    act_order: bool = False
    damp: float = Field(0.01, gt=0.0, lt=1.0)
    WORDS = {**_Quantizer.WORDS, "actorder": ("act_order", True)}  # gptq:4:g128:actorder

    def calibration_needs(self) -> frozenset[str]:
        return frozenset({"hessian"})

    def auto_label(self) -> str:
        return self._grid_label() + _extras(self, {"act_order": lambda v: "-actorder",
                                                   "damp": lambda v: f"-damp{v:g}"})


class AwqConfig(_Quantizer):
    """AWQ (methods/awq.py): per-channel scales searched on sampled input rows, then clipping."""

    method: Literal["awq"] = "awq"
    # Points of the scale-exponent grid searched per group of linears.
    grid: int = Field(20, ge=1, le=100)
    FOLDS_INTO_FEEDERS = True

    def calibration_needs(self) -> frozenset[str]:
        return frozenset({"rows"})

    def auto_label(self) -> str:
        return self._grid_label() + _extras(self, {"grid": lambda v: f"-grid{v}"})


class _W8A8(_Quantizer):
    """Weights int8 per channel (symmetric) and every block linear's input int8 per token."""

    bits: Literal[8] = 8
    group_size: None = None
    symmetric: Literal[True] | None = None
    activation_bits: ClassVar[int | None] = 8
    POSITIONAL = ()  # w8a8, smoothquant:0.5
    PREFIXED = {}
    WORDS = {"emb": ("quantize_embeddings", True)}

    @model_validator(mode="before")
    @classmethod
    def _fixed_scheme(cls, data: Any) -> Any:
        if isinstance(data, dict) and (data.get("bits", 8) != 8 or data.get("group_size") is not None
                                       or data.get("symmetric") is False):
            raise ValueError(f"method {data.get('method')} is W8A8: int8 per-channel symmetric weights "
                             "(leave bits, group_size and symmetric out)")
        return data

    @property
    def scheme(self) -> str:
        return "W8A8 (int8 weights per channel, int8 activations per token)"


class SmoothQuantConfig(_W8A8):
    """SmoothQuant (methods/smoothquant.py): activation outliers migrated into the weights."""

    method: Literal["smoothquant"] = "smoothquant"
    FOLDS_INTO_FEEDERS = True
    # Migration strength (0: all difficulty stays on activations, 1: all on weights).
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    POSITIONAL = ("alpha",)

    def calibration_needs(self) -> frozenset[str]:
        return frozenset({"absmax"})

    def auto_label(self) -> str:
        return f"smoothquant-w8a8-a{self.alpha:g}" + _extras(self, {"quantize_embeddings": lambda v: "-emb"})


class W8A8Config(_W8A8):
    """Naive W8A8 (no smoothing): the baseline SmoothQuant's benefit is measured against."""

    method: Literal["w8a8"] = "w8a8"

    def auto_label(self) -> str:
        return "w8a8-naive" + _extras(self, {"quantize_embeddings": lambda v: "-emb"})


GgufType = Literal["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K", "IQ4_XS"]


class GgufConfig(MethodConfig):
    """A llama.cpp file type, made by llama.cpp's own quantizer (methods/gguf_quant.py)."""

    artifact: ClassVar[Artifact] = "gguf"
    method: Literal["gguf"] = "gguf"
    type: GgufType
    # An importance matrix from the calibration text guides llama.cpp's rounding.
    imatrix: bool = False
    POSITIONAL = ("type",)  # gguf:Q4_K_M:imatrix
    WORDS = {"imatrix": ("imatrix", True)}

    @model_validator(mode="before")
    @classmethod
    def _needs_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") not in GGUF_TYPE_BITS:
            raise ValueError(f"method gguf needs 'type', one of {', '.join(GGUF_TYPE_BITS)} (got {data.get('type')!r})")
        return data

    def calibration_needs(self) -> frozenset[str]:
        return frozenset({"imatrix"}) if self.imatrix else frozenset()

    @property
    def quantized_bits(self) -> int:
        return GGUF_TYPE_BITS[self.type]

    @property
    def scheme(self) -> str:
        return f"GGUF {self.type}" + (" + imatrix" if self.imatrix else "")

    def auto_label(self) -> str:
        return f"gguf-{self.type}" + ("-imatrix" if self.imatrix else "")


class PruneConfig(MethodConfig):
    """Pruning (methods/prune.py). The score picks the weights removed (magnitude: smallest |W|
    per matrix; wanda: smallest |W_ij|·‖X_j‖ per output row; sparsegpt: OBS sweep on H = XᵀX that
    also updates the weights kept)."""

    method: Literal["prune"] = "prune"
    prune: Literal["magnitude", "wanda", "sparsegpt"] = "wanda"
    # Fraction removed: of each weight matrix, or with `structure` of each block's units.
    sparsity: float | None = Field(None, gt=0.0, lt=1.0)
    # "2:4": in every 4 consecutive input columns keep 2 (implies sparsity 0.5).
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    # Remove whole units so shapes shrink, the same count in every block: "mlp" intermediate
    # neurons, "heads" KV groups (a key/value head with the query heads that share it).
    structure: Literal["mlp", "heads"] | None = None
    damp: float = Field(0.01, gt=0.0, lt=1.0)  # sparsegpt's dampening
    POSITIONAL = ("prune", "sparsity")  # prune:wanda:0.5, prune:magnitude:0.25:mlp
    WORDS = {"mlp": ("structure", "mlp"), "heads": ("structure", "heads")}

    @model_validator(mode="before")
    @classmethod
    def _pattern_sparsity(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sparsity") is None and data.get("pattern") in PRUNE_PATTERNS:
            n, m = PRUNE_PATTERNS[data["pattern"]]
            data = {**data, "sparsity": 1 - n / m}
        return data

    @model_validator(mode="after")
    def _check(self) -> PruneConfig:
        if self.sparsity is None:
            raise ValueError("method prune needs 'sparsity' (the fraction removed, e.g. 0.5)")
        if self.pattern != "unstructured":
            n, m = PRUNE_PATTERNS[self.pattern]
            if self.structure is not None:
                raise ValueError(f"pattern {self.pattern} is for single weights; leave it out with 'structure'")
            if not math.isclose(self.sparsity, 1 - n / m):
                raise ValueError(f"pattern {self.pattern} removes {1 - n / m:g} of the weights; leave 'sparsity' out")
        if self.structure is not None and self.prune == "sparsegpt":
            raise ValueError("structure: units are ranked by magnitude or wanda importance, not sparsegpt")
        return self

    def calibration_needs(self) -> frozenset[str]:
        return frozenset() if self.prune == "magnitude" else frozenset({"hessian"})

    @property
    def scheme(self) -> str:
        what = self.pattern if self.pattern != "unstructured" else f"{self.sparsity:.0%} {self.structure or 'unstructured'}"
        return f"pruned {what} ({self.prune}), float"

    def auto_label(self) -> str:
        damp = _extras(self, {"damp": lambda v: f"-damp{v:g}"})
        if self.pattern != "unstructured":
            return f"{self.prune}-{self.pattern}{damp}"
        return f"{self.prune}-{self.structure or 's'}{self.sparsity * 100:.4g}{damp}"


# Methods a qat candidate may start from: on-grid quantizers with a pass over one block.
InitQuantizer = Union[RtnConfig, GptqConfig, AwqConfig]
INIT_TYPES = {"rtn": RtnConfig, "gptq": GptqConfig, "awq": AwqConfig}
# The grid's keys: a qat candidate's own, given to its init (an init that sets them is refused).
GRID_KEYS = ("bits", "group_size", "symmetric", "quantize_embeddings", "accuracy_level", "name")


class QatConfig(_Quantizer):
    """Quantization-aware recovery (methods/qat.py): each block is first quantized by `init`
    (RTN, GPTQ or AWQ on this candidate's grid), then its quantization scales (and its norm
    weights; its rounding with rounding_lr > 0) are trained for `steps` Adam steps of `batch`
    calibration windows to reproduce the full-precision model's output of that block. The
    weights stay on the grid."""

    method: Literal["qat"] = "qat"
    # The starting candidate: a method name, or its settings without the grid
    # ({method: gptq, act_order: true}); it takes this candidate's bits, group_size, symmetric.
    init: InitQuantizer = Field(default_factory=lambda: GptqConfig(act_order=True))
    steps: int = Field(64, ge=0, le=100_000)  # per block
    batch: int = Field(2, ge=1)  # calibration windows per step
    lr: float = Field(0.01, gt=0.0, le=1.0)  # of the log scales (and the norm weights)
    # Rounding offsets (code units; 0: every code stays the init's, measured best here).
    rounding_lr: float = Field(0.0, ge=0.0, le=1.0)
    norms: bool = False  # train the block's float parameters (norm weights) too
    # Then, end to end: steps of one window each training every block's scales to the baseline's
    # next-token distribution (KL), at e2e_lr (0 steps: the blocks' fit is the candidate).
    e2e_steps: int = Field(64, ge=0, le=100_000)
    e2e_lr: float = Field(0.001, gt=0.0, le=1.0)

    @model_validator(mode="before")
    @classmethod
    def _init_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "init" not in data:
            return data
        init = data["init"]
        if isinstance(init, str):
            init = {"method": init}
        if isinstance(init, dict):
            if init.get("method") not in INIT_TYPES:
                raise ValueError(f"init: method is one of {', '.join(INIT_TYPES)} (got {init.get('method')!r})")
            grid = sorted(k for k in GRID_KEYS if k in init)
            if grid:
                raise ValueError(f"init: leave out {', '.join(grid)} (the init takes the qat candidate's grid)")
            init = INIT_TYPES[init["method"]].model_validate(init)
        return {**data, "init": init}

    @model_validator(mode="after")
    def _init_on_grid(self) -> QatConfig:
        grid = {k: getattr(self, k) for k in GRID_KEYS if k != "name"}
        object.__setattr__(self, "init", type(self.init).model_validate(
            {**self.init.model_dump(exclude=set(GRID_KEYS)), **grid}))
        return self

    @field_serializer("init")
    def _init_settings(self, init: InitQuantizer) -> dict[str, Any]:
        """The init's own settings only (its grid is this candidate's)."""
        return init.model_dump(exclude=set(GRID_KEYS), exclude_defaults=True) | {"method": init.method}

    def calibration_needs(self) -> frozenset[str]:
        return self.init.calibration_needs() | {"blocks"}

    # Probe windows the loss per block is measured on, before and after training (end to end:
    # fewer, each a whole-model pass with the vocabulary's logits).
    PROBE_WINDOWS: ClassVar[int] = 8
    E2E_PROBE_WINDOWS: ClassVar[int] = 2

    def training_tokens(self, samples: int, seq_len: int) -> int:
        """Per block (so per whole model, summed over blocks): the float block over every
        window (the targets), `steps` steps of `batch` windows forward and backward (a backward
        about 2 forwards), the probe before and after; then end to end, each step and probe window
        a forward of the baseline and of the candidate (and the step a backward)."""
        probes = 2 * min(self.PROBE_WINDOWS, samples)
        e2e = 4 * self.e2e_steps + 2 * 2 * min(self.E2E_PROBE_WINDOWS, samples) if self.e2e_steps else 0
        return (samples + 3 * self.steps * self.batch + probes + e2e) * seq_len

    @property
    def weights_alone(self) -> bool:
        """An AWQ init folds into the feeders, and norms: true trains the norm weights."""
        return self.init.weights_alone and not self.norms

    def auto_label(self) -> str:
        default = type(self).model_fields["init"].default_factory()
        init_extras = self.init.label[len(self.init._grid_label()):]
        shown = "" if self._init_settings(self.init) == self._init_settings(default) else f"-{self.init.method}{init_extras}"
        return self._grid_label() + shown + _extras(self, {
            "steps": lambda v: f"-steps{v}", "batch": lambda v: f"-batch{v}", "lr": lambda v: f"-lr{v:g}",
            "rounding_lr": lambda v: f"-round{v:g}", "norms": lambda v: "-norms", "e2e_steps": lambda v: f"-e2e{v}",
            "e2e_lr": lambda v: f"-e2elr{v:g}"})


# Quantizers a composition may end with (a pruned zero stays 0 on their grids).
StepQuantizer = Union[RtnConfig, GptqConfig, AwqConfig, SmoothQuantConfig, W8A8Config]


def _step_tag(data: Any) -> str | None:
    if isinstance(data, dict):
        method = data.get("method", data.get("quantize"))
        return method if method is not None else "prune" if "prune" in data else None
    return getattr(data, "method", None)


STEP_TYPES = {"prune": PruneConfig, "rtn": RtnConfig, "gptq": GptqConfig, "awq": AwqConfig,
              "smoothquant": SmoothQuantConfig, "w8a8": W8A8Config}
Step = Annotated[Union[tuple(Annotated[t, Tag(k)] for k, t in STEP_TYPES.items())],  # noqa: UP007
                 Discriminator(_step_tag, custom_error_type="step_method",
                               custom_error_message=f"a step's method (or quantize) is one of {', '.join(STEP_TYPES)}")]


class ComposeConfig(MethodConfig):
    """A composition applied in order on one copy: prune steps, then at most one quantize step
    (which keeps the pruned zeros exactly zero)."""

    method: Literal["compose"] = "compose"
    steps: tuple[Step, ...]

    @model_validator(mode="after")
    def _check(self) -> ComposeConfig:
        if not self.steps:
            raise ValueError("'steps' is empty: list at least one")
        if any(s.name is not None for s in self.steps):
            raise ValueError("a step has no 'name' (name the whole candidate)")
        quantize = [i for i, s in enumerate(self.steps) if not isinstance(s, PruneConfig)]
        if len(quantize) > 1 or (quantize and quantize[0] != len(self.steps) - 1):
            raise ValueError("steps: prune steps first, then at most one quantize step")
        return self

    @property
    def quantizer(self) -> _Quantizer | None:
        last = self.steps[-1]
        return None if isinstance(last, PruneConfig) else last

    def calibration_needs(self) -> frozenset[str]:
        return frozenset().union(*(s.calibration_needs() for s in self.steps))

    def engine_settings(self) -> frozenset[str]:
        return frozenset().union(*(s.engine_settings() for s in self.steps))

    @property
    def weights_alone(self) -> bool:
        return all(s.weights_alone for s in self.steps)

    @property
    def quantized_bits(self) -> int | None:
        return self.quantizer and self.quantizer.bits

    @property
    def group_size(self) -> int | None:
        return self.quantizer and self.quantizer.group_size

    @property
    def symmetric(self) -> bool | None:
        return self.quantizer and self.quantizer.symmetric

    @property
    def scheme(self) -> str:
        return " then ".join(s.scheme for s in self.steps)

    def auto_label(self) -> str:
        return "+".join(s.label for s in self.steps)


class ServedConfig(MethodConfig):
    """A model someone else compressed and serves (vLLM, llama.cpp's server, ...): quantgate
    sees no weights, so the candidate declares what the server runs, which sizes it."""

    artifact: ClassVar[Artifact] = "served"
    method: Literal["served"] = "served"
    serving: ServingConfig  # the server (its backend checks the keys it needs)
    # What the server runs: one of SERVED_SCHEMES, and/or its bits per weight.
    scheme_name: str | None = Field(None, alias="scheme")
    bits: int | None = Field(None, ge=1, le=32)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True,
                              serialize_by_alias=True)

    @model_validator(mode="after")
    def _declared(self) -> ServedConfig:
        if self.scheme_name is None and self.bits is None:
            raise ValueError("a served candidate declares what its server runs: scheme "
                             f"({', '.join(SERVED_SCHEMES)}) or bits (quantgate cannot see its weights)")
        if self.scheme_name is not None and self.scheme_name not in SERVED_SCHEMES:
            raise ValueError(f"scheme '{self.scheme_name}': one of {', '.join(SERVED_SCHEMES)} (or give bits)")
        if self.scheme_name is not None and self.bits is None:
            object.__setattr__(self, "bits", SERVED_SCHEMES[self.scheme_name])
        return self

    @property
    def quantized_bits(self) -> int:
        return self.bits

    @property
    def scheme(self) -> str:
        return f"{self.scheme_name or f'{self.bits}-bit'} (declared, served)"

    def auto_label(self) -> str:
        return f"served-{self.scheme_name or f'w{self.bits}'}"


class NoneConfig(MethodConfig):
    """No compression: the baseline itself, served again the same way on the same engine. Its
    ratios to the baseline must contain 1 (an A/A check of the measurement): how wide they are is
    the run's noise. It is scored and measured like any candidate and never recommended."""

    artifact: ClassVar[Artifact] = "baseline"
    method: Literal["none"] = "none"

    @property
    def scheme(self) -> str:
        return "the baseline again (A/A check)"

    def auto_label(self) -> str:
        return "none"


@dataclass(frozen=True)
class MethodSpec:
    """One method: its config model, and the driver function ("module:function") that applies
    it in place to a PyTorch model: f(model, arch, cfg, calib, seed, on_block, keep_zeros) ->
    (linears changed, {id of each quantized weight: its QuantSpec}). None: the method is not
    applied to a PyTorch model (its backend makes the artifact)."""

    config: type[MethodConfig]
    apply: str | None
    # Its pass over one block ("module:function" of f(cfg, arch, the model's config) ->
    # BlockMethod), for methods a qat candidate may start from; None for the others.
    block_pass: str | None = None

    @property
    def name(self) -> str:
        return self.config.model_fields["method"].default

    @property
    def artifact(self) -> Artifact:
        return self.config.artifact

    def driver(self) -> Callable[..., tuple[int, dict[int, Any]]]:
        if self.apply is None:
            raise ValueError(f"method {self.name} is not applied to a PyTorch model")
        return _imported(self.apply)

    def block_method(self) -> Callable[..., Any]:
        if self.block_pass is None:
            raise ValueError(f"method {self.name} has no pass over one block")
        return _imported(self.block_pass)


def _imported(where: str) -> Callable[..., Any]:
    """The function at "module:function" (imported on use)."""
    module, function = where.split(":")
    return getattr(importlib.import_module(module), function)


_APPLY = "quantgate.methods.apply"
METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec(RtnConfig, f"{_APPLY}:apply_rtn", f"{_APPLY}:rtn_block"),
    MethodSpec(GptqConfig, f"{_APPLY}:apply_gptq", f"{_APPLY}:gptq_block"),
    MethodSpec(AwqConfig, f"{_APPLY}:apply_awq", f"{_APPLY}:awq_block"),
    MethodSpec(SmoothQuantConfig, f"{_APPLY}:apply_smoothquant"),
    MethodSpec(W8A8Config, f"{_APPLY}:apply_w8a8"),
    MethodSpec(PruneConfig, f"{_APPLY}:apply_prune"),
    MethodSpec(ComposeConfig, f"{_APPLY}:apply_compose"),
    MethodSpec(QatConfig, f"{_APPLY}:apply_qat"),
    MethodSpec(GgufConfig, None),
    MethodSpec(ServedConfig, None),
    MethodSpec(NoneConfig, None),
)}


def _method_tag(data: Any) -> str | None:
    """The registry entry a candidate's raw data names: `method` (or `quantize`); a composition
    when it has `steps`; pruning when it names a `prune` score; RTN when it names nothing."""
    if not isinstance(data, dict):
        return getattr(data, "method", None)
    if "method" in data or "quantize" in data:
        return data.get("method", data.get("quantize"))
    return "compose" if "steps" in data else "prune" if "prune" in data else "rtn"


Candidate = Annotated[
    Union[tuple(Annotated[s.config, Tag(name)] for name, s in METHODS.items())],  # noqa: UP007
    Discriminator(_method_tag, custom_error_type="unknown_method",
                  custom_error_message=f"method is one of {', '.join(METHODS)}"),
]
_CANDIDATE: TypeAdapter[MethodConfig] = TypeAdapter(Candidate)


def candidate(**fields: Any) -> MethodConfig:
    """A candidate config from its YAML fields (the method decides which model validates them)."""
    return _CANDIDATE.validate_python(fields)


def shorthand(text: str) -> dict[str, Any]:
    """A candidate as written on the command line, `method:token:...` (`rtn:8`, `gptq:4:g64`,
    `gguf:Q4_K_M:imatrix`, `smoothquant:0.8`, `prune:wanda:0.5`, `awq:4:g128:grid=10`), as the
    YAML fields it stands for: each method's config class reads its own tokens (its POSITIONAL,
    PREFIXED and WORDS), so a new method needs no change here. ValueError for an unknown method or
    token; the fields themselves are validated with the rest of the config."""
    method, *tokens = text.strip().split(":")
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown method '{method}' (one of {', '.join(METHODS)}; write it as method:setting:...)")
    return {"method": method, **spec.config.from_shorthand(tokens)}


def parse_candidate(data: Any) -> MethodConfig:
    return _CANDIDATE.validate_python(data)


def spec_of_method(cfg: MethodConfig) -> MethodSpec:
    return METHODS[cfg.method]


def upgrade_candidate(data: dict[str, Any]) -> dict[str, Any]:
    """A candidate as results.json files of schema 0 stored it (one flat model: every field of
    every method, at its default where unused) in the per-method shape: only the fields its
    method has. Fields at their default are dropped; anything else is kept, so that a setting
    the new shape cannot hold still fails validation loudly."""
    if data.get("steps"):
        return {"method": "compose", **({"name": data["name"]} if data.get("name") else {}),
                "steps": [upgrade_candidate({**s, "name": None}) for s in data["steps"]]}
    old_defaults = {"bits": 4, "group_size": None, "symmetric": None, "quantize_embeddings": False, "name": None,
                    "act_order": False, "damp": 0.01, "grid": 20, "alpha": 0.5, "type": None, "imatrix": False,
                    "prune": None, "sparsity": None, "pattern": "unstructured", "structure": None, "steps": None,
                    "serving": None}
    method = data.get("method", "rtn")
    fields = METHODS[method].config.model_fields if method in METHODS else {}
    out = {"method": method}
    for key, value in data.items():
        if key == "method" or (key not in fields and value == old_defaults.get(key, object())):
            continue
        if key in ("bits", "symmetric") and method in ("smoothquant", "w8a8", "gguf"):
            continue  # fixed by the method (or the gguf type) in schema 0's dump
        out[key] = value
    return out
