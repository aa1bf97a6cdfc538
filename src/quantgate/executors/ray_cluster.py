"""The Ray executor: each model made and scored by a Ray actor of its own, on any node of a cluster.

What runs where:
  - here (the driver): reading and tokenizing the eval set and the calibration text, loading the
    baseline (its tokenizer, the noise floor, declared sizes), writing the store as records arrive,
    every statistic, the gate, economics and the reports;
  - in one actor per model (ModelWorker; `num_cpus`, `num_gpus`, `memory_gb` reserved on its
    node): loading the baseline from model.base on that node (its sha256 must equal the
    driver's), making the model through the serving backend (calibration, quantization, the
    engine's artifact), opening its engine, and scoring the pieces of the eval set it is sent
    (evals.tasks.item_chunks: the pieces the local executor scores) and the windows.

The baseline runs first; its log-probs over every window go into Ray's object store once and
every candidate's actor reads them from there (KL divergence and top-1 agreement are computed
next to the candidate). With strategy "all" every candidate starts at once and Ray runs as many
as the cluster's resources hold; a ladder runs its rungs one at a time. Each actor ends once its
answers are in, and a candidate is handed back only when every model in flight is done: economics
(measured here, after) never time a model while the run's own actors compute.

Each actor gets the same inputs and runs the same code on the same pieces as the local executor,
so the records, and everything computed from them, are the same number for number (on the same
kind of hardware: a different CPU or GPU kernel may change the low bits of any engine's output).

Ray carries Python objects between processes with its own serialization (pickle, within the
cluster): run it on a cluster you trust, as for any Ray job. Nothing quantgate loads from a file
goes through it: weights are still read from safetensors and GGUF files only.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import quantgate
from quantgate.engines import registry as backends
from quantgate.engines.process import EngineCrashed
from quantgate.engines.registry import RunContext
from quantgate.errors import BadEngineOutput, UserError
from quantgate.evals.tasks import (
    ItemOutput, WindowOutput, cached_windows, collect_scores, item_chunks, run_windows, score_items, split_finite,
    with_response_windows,
)

if TYPE_CHECKING:
    from quantgate.config import RunConfig
    from quantgate.engines.base import Engine
    from quantgate.engines.registry import Backend, Served
    from quantgate.evals.tasks import ModelScores, PreparedSuite, ScoreCache
    from quantgate.executors.base import Reference
    from quantgate.executors.registry import RayConfig
    from quantgate.methods.calibrate import CalibrationSet
    from quantgate.methods.registry import MethodConfig


@dataclass(frozen=True)
class Job:
    """What every model's actor is given once, through the object store."""

    cfg: RunConfig
    version: str  # quantgate's on the driver: every worker must run the same
    model_digest: str  # the baseline's sha256 as the driver loaded it
    calib: CalibrationSet | None
    work: str  # engine logs go under work/logs (on the actor's node)
    bench_prompts: list[list[int]]
    bandwidth: float | None


def _engine_seconds(engine: Engine) -> float:
    return sum(engine.timing.seconds.values())


def _work_folder(path: str) -> Path:
    """The run's work folder on this node; a temporary one where it cannot be made (its path
    is the driver's, on storage this node may not share)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
        return Path(path)
    except OSError:
        return Path(tempfile.mkdtemp(prefix="quantgate-"))


class ModelWorker:
    """One model on one Ray worker (made a Ray actor by RayExecutor): made by `make`, then
    scoring what it is sent. Methods run one at a time, in the order they were called."""

    def __init__(self, job: Job, prepared: PreparedSuite, cand: MethodConfig | None):
        self.job, self.prepared, self.cand = job, prepared, cand
        self.engine: Engine | None = None
        self.opened: Any = None
        self.kept: list[torch.Tensor] = []

    def make(self) -> dict[str, Any]:
        """Load the baseline on this node, make the model as the serving backend does, open its
        engine; what making it reported (Served.meta)."""
        from quantgate.models.load import load_baseline

        job, node = self.job, platform.node()
        if quantgate.__version__ != job.version:
            raise UserError(f"executor ray: node {node} runs quantgate {quantgate.__version__}, the driver "
                            f"{job.version}: install the same version on every node")
        torch.manual_seed(job.cfg.seed)
        baseline = load_baseline(job.cfg.model.base, job.cfg.precision)
        if baseline.digest != job.model_digest:
            raise UserError(f"model.base {job.cfg.model.base}: node {node} loads weights with sha256 "
                            f"{baseline.digest[:16]}…, the driver {job.model_digest[:16]}…: give every node the "
                            "same file")
        ctx = RunContext(job.cfg, baseline, job.calib, _work_folder(job.work), lambda what, total: lambda n: None,
                         job.bench_prompts, job.bandwidth)
        backend = backends.entry(job.cfg.serving.engine).load()
        served = backend.candidate(ctx, self.cand) if self.cand is not None else backend.baseline(ctx)
        self.opened = served.open()
        self.engine = self.opened.__enter__()
        return served.meta()

    @property
    def label(self) -> str:
        return self.cand.label if self.cand is not None else "baseline"

    def score(self, idx: list[int]) -> tuple[dict[int, ItemOutput], float, BadEngineOutput | None]:
        """The outputs of the suite's items `idx` that are log-probabilities, the engine seconds they
        took, and the error naming an item whose were NaN or +inf (None: none; evals.tasks.split_finite)."""
        before = _engine_seconds(self.engine)
        outputs, bad = split_finite(score_items(self.engine, self.prepared, idx), self.prepared, self.label,
                                    self.engine.name)
        return outputs, _engine_seconds(self.engine) - before, bad

    def windows(self, reference: list[np.ndarray] | None, keep: bool) -> tuple[WindowOutput, float]:
        """Every window of the suite, against the reference when given; keep=True keeps this
        model's log-probs for `reference`."""
        before = _engine_seconds(self.engine)
        ref = None if reference is None else [torch.from_numpy(np.array(r)) for r in reference]
        out, self.kept = run_windows(self.engine, self.prepared, ref, keep, self.label)
        return out, _engine_seconds(self.engine) - before

    def reference(self, extra: list[list[int]]) -> list[np.ndarray]:
        """The kept log-probs and those over the `extra` windows (the baseline's responses),
        float32 [T-1, vocab] each: the reference every candidate is compared with."""
        lps = self.kept + list(self.engine.token_logprobs(extra))
        self.kept = []
        return [lp.numpy() for lp in lps]

    def close(self) -> None:
        if self.opened is not None:
            self.opened.__exit__(None, None, None)
            self.opened = self.engine = None


def _worker_facts() -> tuple[str, str]:
    """Run on a worker: its quantgate and Python versions."""
    return quantgate.__version__, platform.python_version()


@dataclass
class _Model:
    """A model in flight on an actor, as the driver follows it."""

    label: str
    actor: Any  # None once ended
    cache: ScoreCache | None
    known: dict[int, ItemOutput]
    step: Callable[[int], None]
    scored: int = 0
    meta: dict[str, Any] | None = None
    windows: WindowOutput | None = None
    seconds: float = 0.0
    pending: set[Any] = field(default_factory=set)  # ObjectRefs not yet collected
    error: Exception | None = None

    def made(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.step(1)

    def items(self, answer: tuple[dict[int, ItemOutput], float, BadEngineOutput | None]) -> None:
        outputs, seconds, bad = answer
        if self.cache is not None:
            self.cache.record(outputs)  # as each piece arrives: what a killed run keeps
        self.known.update(outputs)
        self.seconds += seconds
        self.step(1)
        if bad is not None and self.error is None:
            self.error = bad  # raised when this model is waited for, like any of its errors

    def windowed(self, answer: tuple[WindowOutput, float]) -> None:
        self.windows, seconds = answer
        if self.cache is not None:
            self.cache.record_windows(self.windows)
        self.seconds += seconds
        self.step(1)


class RayExecutor:
    def __init__(self, cfg: RayConfig):
        import ray

        self.ray, self.cfg = ray, cfg
        self.started_ray = False
        self.models: dict[str | None, _Model] = {}  # by candidate label (None: the baseline)
        self.handlers: dict[Any, tuple[_Model, Callable[[Any], None]]] = {}  # ObjectRef -> its model, what next
        self.job: Any = None  # the Job's ObjectRef
        self.reference: Any = None  # the ObjectRef of the baseline's log-probs
        self.suite: tuple[PreparedSuite | None, Any] = (None, None)  # the suite last sent, its ObjectRef
        self.worker: Any = None  # ModelWorker as a Ray actor class
        self.engine = ""

    # -- the cluster ----------------------------------------------------------------------------

    def __enter__(self) -> RayExecutor:
        ray, cfg = self.ray, self.cfg
        if not ray.is_initialized():
            try:
                if cfg.address is None:  # a Ray instance of our own, on loopback
                    ray.init(num_cpus=cfg.local_cpus, object_store_memory=cfg.object_store_mb * 2**20,
                             include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
                else:
                    ray.init(address=cfg.address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = cfg.address or "a local instance"
                raise UserError(f"executor.address: cannot start or reach Ray at {where}: {_first_line(e)}") from None
            self.started_ray = True
        self.worker = ray.remote(max_restarts=0, max_task_retries=0)(ModelWorker)
        try:
            self._check_fits()
            self._check_workers()
        except BaseException:
            self.__exit__()  # a Ray instance started here is shut down
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for model in self.models.values():
            self._kill(model)
        if self.started_ray:
            self.ray.shutdown()

    def _check_fits(self) -> None:
        """Some node of the cluster can hold one model's actor (Ray would wait for one forever)."""
        want = {"CPU": self.cfg.num_cpus, "GPU": self.cfg.num_gpus, "memory": (self.cfg.memory_gb or 0) * 2**30}
        nodes = [n["Resources"] for n in self.ray.nodes() if n.get("Alive")]
        if any(all(res.get(k, 0) >= v for k, v in want.items()) for res in nodes):
            return
        offer = "; ".join(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs, {r.get('memory', 0) / 2**30:.1f} GB"
                          for r in nodes) or "no node"
        raise UserError(f"executor: no node of the Ray cluster holds one model's actor ({want['CPU']:g} CPUs, "
                        f"{want['GPU']:g} GPUs, {want['memory'] / 2**30:.1f} GB): its nodes offer {offer} "
                        "(start the nodes first, or ask for less: num_cpus, num_gpus, memory_gb)")

    def _check_workers(self) -> None:
        """A worker runs quantgate, the driver's version, under the driver's Python."""
        ray = self.ray
        try:
            theirs = ray.get(ray.remote(num_cpus=0)(_worker_facts).remote())
        except ray.exceptions.RayError as e:
            raise UserError(f"executor ray: a worker cannot run quantgate ({_first_line(e)}): install quantgate "
                            f"{quantgate.__version__} on every node") from None
        ours = (quantgate.__version__, platform.python_version())
        if tuple(theirs) != ours:
            raise UserError(f"executor ray: workers run quantgate {theirs[0]} on Python {theirs[1]}, the driver "
                            f"quantgate {ours[0]} on Python {ours[1]}: install the same on every node")

    # -- the Executor interface -----------------------------------------------------------------

    def baseline(self, backend: Backend, ctx: RunContext, prepared: PreparedSuite,
                 cache: ScoreCache | None) -> tuple[Served, ModelScores, PreparedSuite, Reference]:
        self.engine = ctx.cfg.serving.engine
        self.job = self.ray.put(Job(ctx.cfg, quantgate.__version__, ctx.baseline.digest, ctx.calib,
                                    str(ctx.work.resolve()), ctx.bench_prompts, ctx.bandwidth))
        model = self._launch(None, ctx, prepared, cache, keep=True, extra_steps=1)
        self._wait(model, close=False)
        scores = self._scores(model, prepared)
        extended = with_response_windows(prepared, scores.generations)
        self.reference = model.actor.reference.remote(extended.windows[len(prepared.windows):])
        reference = [torch.from_numpy(np.array(r)) for r in self._get(model, self.reference)]
        model.step(1)
        self._close(model)
        if model.error is not None:
            raise model.error
        return backend.baseline(ctx), scores, extended, reference

    def start(self, backend: Backend, ctx: RunContext, cand: MethodConfig, prepared: PreparedSuite,
              reference: Reference, cache: ScoreCache | None) -> None:
        if cand.label not in self.models:
            self._launch(cand, ctx, prepared, cache, keep=False)

    def candidate(self, backend: Backend, ctx: RunContext, cand: MethodConfig, prepared: PreparedSuite,
                  reference: Reference, cache: ScoreCache | None) -> tuple[Served, ModelScores]:
        """The candidate's scores once every model in flight is done (run.py times a model's
        speed after this returns: nothing of the run computes while it does)."""
        self.start(backend, ctx, cand, prepared, reference, cache)
        model = self.models[cand.label]
        self._wait(model, everyone=True)
        return backend.resumed(ctx, cand, model.meta), self._scores(model, prepared)

    # -- models on actors -----------------------------------------------------------------------

    def _launch(self, cand: MethodConfig | None, ctx: RunContext, prepared: PreparedSuite,
                cache: ScoreCache | None, keep: bool, extra_steps: int = 0) -> _Model:
        """An actor for the model, sent (in this order) make, every piece of the items left to
        score, and the windows unless the store has them."""
        known = dict(cache.known()) if cache else {}
        chunks = item_chunks(prepared, known, cache)
        stored = cached_windows(cache, keep)
        label = cand.label if cand else "baseline"
        if self.suite[0] is not prepared:  # once for the baseline, once for every candidate
            self.suite = (prepared, self.ray.put(prepared))
        actor = self.worker.options(**self.cfg.actor_options()).remote(self.job, self.suite[1], cand)
        step = ctx.progress(label, 1 + len(chunks) + (stored is None) + extra_steps)
        model = _Model(label, actor, cache, known, step, scored=sum(map(len, chunks)), windows=stored)
        self.models[cand.label if cand else None] = model
        self._expect(model, actor.make.remote(), model.made)
        for chunk in chunks:
            self._expect(model, actor.score.remote(chunk), model.items)
        if stored is None:
            self._expect(model, actor.windows.remote(None if cand is None else self.reference, keep), model.windowed)
        return model

    def _expect(self, model: _Model, ref: Any, then: Callable[[Any], None]) -> None:
        model.pending.add(ref)
        self.handlers[ref] = (model, then)

    def _wait(self, model: _Model, everyone: bool = False, close: bool = True) -> None:
        """Collect answers from every model in flight as they come (each recorded on arrival,
        each model's actor closed once its answers are in) until this model's are all in, or
        with everyone=True every model's. A model's error is raised when that model is waited for."""
        while (self.handlers if everyone else model.pending) and model.error is None:
            (ref,), _ = self.ray.wait(list(self.handlers), num_returns=1)
            owner, then = self.handlers.pop(ref)
            owner.pending.discard(ref)
            try:
                answer = self._get(owner, ref)
            except Exception as e:  # noqa: BLE001 - kept for the owner's turn (it may not be this model)
                owner.error = e
                self._kill(owner)
                continue
            then(answer)
            if not owner.pending and (close or owner is not model):
                self._close(owner)
        if model.error is not None:
            raise model.error

    def _get(self, model: _Model, ref: Any) -> Any:
        """An answer of the model's actor: its error re-raised as it was raised there, a dead
        actor as EngineCrashed (like an engine process that died)."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, Exception):
                raise e.cause from None
            raise EngineCrashed(f"{model.label}: {_first_line(e)}") from None
        except ray.exceptions.RayError as e:  # the actor died (out of memory, a lost node), an object was lost
            raise EngineCrashed(f"{model.label}: its Ray actor ended: {_first_line(e)}") from None

    def _scores(self, model: _Model, prepared: PreparedSuite) -> ModelScores:
        return collect_scores(prepared, model.known, model.windows, model.seconds, model.scored, self.engine)

    def _close(self, model: _Model) -> None:
        """Close the model's engine (and its engine process, if any), then end its actor; an
        error closing it is the model's."""
        try:
            self._get(model, model.actor.close.remote())
        except Exception as e:  # noqa: BLE001 - kept for the model's turn, like any of its errors
            model.error = e
        finally:
            self._kill(model)

    def _kill(self, model: _Model) -> None:
        for ref in model.pending:
            self.handlers.pop(ref, None)
        model.pending.clear()
        if model.actor is not None:
            self.ray.kill(model.actor)
            model.actor = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
