"""One run: config -> baseline -> candidates -> scores -> comparisons -> economics -> gate decision.

Stages, each returning plain data: `prepare_inputs` (every input read and checked, the eval suite
tokenized once, before any model work) and `measure`: quality (the baseline and each candidate on
the serving engine's backend, scored and compared), then economics (every served model measured in
interleaved rounds, which needs them all: `measure_economics`), then the gate. `execute` is both.
The CLI, the drift check, export and verify call these rather than re-implementing them. Nothing
here names an engine or a method: each is a registry entry (engines/registry.py,
methods/registry.py).
"""

from __future__ import annotations

import dataclasses
import gc
import platform
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.engine import Engine as Store

import quantgate
from quantgate import economics as econ_stage
from quantgate.config import MethodConfig, QualityGateConfig, RunConfig, check_supported
from quantgate.economics import Conditions, Economics, Estimate, Opener, cost_at_volume, memory_bandwidth
from quantgate.engines import registry as backends
from quantgate.engines.registry import Backend, Progress, RunContext, Served
from quantgate.errors import EngineFault
from quantgate.evals.datasets import EvalSuite, load_suite
from quantgate.evals.metrics import Comparison, ModelMetrics, compare, model_metrics
from quantgate.evals.tasks import ModelScores, PreparedSuite, evaluate, prepare
from quantgate.executors import registry as executors
from quantgate.executors.base import Executor
from quantgate.gate import (
    CandidateVerdict, Decision, RuleKind, check_tasks, decide, failing, judge, judge_economics, ladder_step,
)
from quantgate.methods.calibrate import CalibrationSet, calibration_set
from quantgate.models.arch import require_row
from quantgate.models.load import Baseline, load_baseline
from quantgate.resume import StoreCache, data_digest, settings_digest
from quantgate.store import ItemKey

__all__ = ["Progress"]  # (re-exported: drift.py and the CLI type their progress sinks with it)


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class ModelResult:
    name: str
    candidate: MethodConfig | None  # None for the baseline
    weight_bytes: int
    modules_changed: int
    metrics: ModelMetrics
    scores: ModelScores = field(repr=False)
    comparison: Comparison | None = None
    quantize_seconds: float = 0.0
    economics: Economics | None = None
    artifact: Path | None = None  # the file the engine evaluated (GGUF), when there is one
    scheme: str = ""  # what the weights are, in words (MethodConfig.scheme; the baseline's precision)
    bytes_counted: str = ""  # which bytes weight_bytes counts (see engines.registry.Served)
    unservable: str | None = None  # why the serving engine cannot serve it (then simulated)


@dataclass(frozen=True)
class NoiseFloor:
    """The baseline on the serving engine against the baseline on a reference path, over the
    same tokens: differences below this are the engines', not the compression's."""

    engine: str
    reference: str
    kld: np.ndarray  # float64 [tokens]
    top1_agree: np.ndarray  # bool [tokens]
    # float64 [tokens]: KL(reference || reference truncated as the served rows are), the bias a
    # full-vocabulary comparison with top-k rows would add; None when the rows are not truncated.
    truncation_kld: np.ndarray | None = None


@dataclass(frozen=True)
class FailedCandidate:
    name: str
    candidate: MethodConfig
    error: str


@dataclass
class RunResult:
    config: RunConfig
    started: datetime
    finished: datetime
    model_source: str
    model_digest: str
    model_description: str
    prepared: PreparedSuite
    baseline: ModelResult
    candidates: list[ModelResult]
    decision: Decision
    environment: dict[str, str]
    calibration: dict[str, object] | None = None  # source, sha256 of the token windows, shape
    noise_floor: NoiseFloor | None = None
    failed: list[FailedCandidate] = field(default_factory=list)  # candidates whose engine crashed
    memory_bandwidth: float | None = None  # bytes/s, measured when an engine's speed is
    notes: list[str] = field(default_factory=list)  # what the run could not do, and why
    conditions: Conditions | None = None  # what speed was measured on and beside (None: not measured)
    precision: str = "fp32"  # the baseline's evaluation precision (quality_gate.verified_against)
    # With a bf16/fp16 baseline: the checkpoint in float32 scored against it, and the gate's verdict
    # on it (a candidate-like row, never recommended).
    full_precision: tuple[ModelResult, CandidateVerdict] | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.decision.recommended else 1


def environment() -> dict[str, str]:
    import transformers

    return dict(quantgate=quantgate.__version__, python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__,
                machine=f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads")


@dataclass(frozen=True)
class Inputs:
    """Everything a run reads before any model work, validated: the config, the baseline, the
    eval suite tokenized once by the baseline's tokenizer, and the calibration windows (None
    when no candidate needs them)."""

    cfg: RunConfig
    baseline: Baseline
    suite: EvalSuite
    prepared: PreparedSuite
    calib: CalibrationSet | None


def read_suite(cfg: RunConfig) -> EvalSuite:
    """The config's eval suite, read and checked against the gate's task names."""
    ev = cfg.evaluation
    suite = load_suite(cfg.quality_gate, limit=ev.limit, cloze_items=ev.cloze_items, seed=cfg.seed)
    check_tasks(cfg.quality_gate, suite.tasks)
    return suite


def tokenized_suite(cfg: RunConfig, tokenizer, suite: EvalSuite | None = None) -> PreparedSuite:
    """The config's eval suite tokenized (the same way for a run, its drift check, its export
    and its verification)."""
    ev = cfg.evaluation
    return prepare(suite or read_suite(cfg), tokenizer, window_tokens=ev.window_tokens, n_windows=ev.ppl_windows)


def prepare_inputs(cfg: RunConfig, baseline: Baseline | None = None) -> Inputs:
    """Stage 1: read and check every input (config, eval set, calibration text) and load the
    baseline; nothing is quantized or scored yet."""
    check_supported(cfg)
    torch.manual_seed(cfg.seed)
    suite = read_suite(cfg)  # (before the model loads: a bad eval set answers at once)
    baseline = baseline or load_baseline(cfg.model.base, cfg.precision)
    if cfg.needs_calibration:  # before any model work: calibrated methods need the architecture's row
        require_row(baseline.arch, baseline.model_type, "calibrated candidates")
    prepared = tokenized_suite(cfg, baseline.tokenizer, suite)
    calib = calibration_set(baseline.tokenizer, cfg.calibration, suite.texts()) if cfg.needs_calibration else None
    return Inputs(cfg, baseline, suite, prepared, calib)


def execute(cfg: RunConfig, progress: Progress = _no_progress, workdir: Path | None = None,
            store: Store | None = None, resume: bool = False) -> RunResult:
    """Run the whole job: prepare_inputs, then measure. Engine processes write their logs under
    `workdir` (a temporary folder when None). With a `store`, every model's items are recorded
    as they are scored; with resume=True, items (and whole candidates) already recorded there
    are reused."""
    started = datetime.now(timezone.utc)
    return measure(prepare_inputs(cfg), progress, workdir, store, resume, started=started)


def measure(inputs: Inputs, progress: Progress = _no_progress, workdir: Path | None = None,
            store: Store | None = None, resume: bool = False, *, started: datetime | None = None) -> RunResult:
    """Stage 2: the baseline and every candidate on the serving engine's backend, over the same
    tokens, each compared with the baseline; then their economics in interleaved rounds; then
    the gate."""
    started = started or datetime.now(timezone.utc)
    cfg, gate = inputs.cfg, inputs.cfg.quality_gate
    backend = backends.entry(cfg.serving.engine).load()
    with _workdir(workdir) as work, backend, executors.entry(cfg.executor).open(cfg.executor) as executor:
        ctx = RunContext(cfg, inputs.baseline, inputs.calib, work, progress,
                         bench_prompts(cfg, inputs.prepared), memory_bandwidth())
        prepared, notes = backend.prepare(ctx, inputs.prepared)
        runner = _Runner(ctx, backend, executor, store, resume, data_digest(prepared))
        base, prepared, reference = runner.baseline(prepared)
        floor = noise_floor(backend, ctx, prepared, reference)
        full = None
        if inputs.baseline.precision != "fp32":  # what the baseline's own precision costs
            full = runner.full_precision(prepared, base, reference)
            full = full and (full, judge(full.name, full.weight_bytes, full.comparison, gate))
        if cfg.strategy == "all":  # every candidate will be measured: an executor may run them at once
            runner.start(cfg.resolved_candidates, prepared, reference)
        results, failed, verdicts = [], [], []
        last: tuple[str, bool] | None = None  # a ladder's last measured rung: (scheme, held)
        for cand in cfg.resolved_candidates:
            step = ladder_step(last, cand.scheme) if cfg.strategy == "ladder" else "run"
            if step == "stop":
                break  # the rung where quality broke: the more aggressive ones are not measured
            if step == "skip":
                continue  # a cheaper method already holds this scheme
            try:
                result = runner.candidate(cand, prepared, base, reference)
            except EngineFault as e:  # a crash, or NaN scores: this candidate fails, the run goes on
                failed.append(FailedCandidate(cand.label, cand, str(e)))
                verdicts.append(_crashed_verdict(cand.label, str(e)))
            else:
                results.append(result)
                verdict = judge(cand.label, result.weight_bytes, result.comparison, gate)
                verdicts.append(dataclasses.replace(_servable(verdict, backend.name, result.unservable),
                                                    shippable=not cand.is_baseline))
                gc.collect()
            last = (cand.scheme, verdicts[-1].passed)
        conditions, broke = measure_economics(backend, ctx, base, results, runner.to_measure)
        with_costs(cfg, base, results)
    verdicts = [_economics_verdict(v, results, broke, gate) for v in verdicts]
    if conditions is not None and (warning := conditions.warning()):
        notes.append(warning)
    notes += [f"{name}: its serving engine failed while its speed was measured ({error})"
              for name, error in broke.items()]
    calib = inputs.calib
    return RunResult(
        config=cfg, started=started, finished=datetime.now(timezone.utc),
        model_source=inputs.baseline.source, model_digest=inputs.baseline.digest,
        model_description=inputs.baseline.description, prepared=prepared, baseline=base, candidates=results,
        calibration=calib and {"source": calib.source, "sha256": calib.digest,
                               "samples": int(calib.windows.shape[0]), "seq_len": int(calib.windows.shape[1])},
        decision=decide(verdicts, eval_items=len(inputs.suite.items), min_items=gate.min_items,
                        ladder=cfg.strategy == "ladder", cheapest=gate.economics_rules),
        environment=environment(), noise_floor=floor, failed=failed, memory_bandwidth=ctx.bandwidth, notes=notes,
        conditions=conditions, precision=inputs.baseline.precision, full_precision=full,
    )


def _economics_verdict(verdict: CandidateVerdict, results: list[ModelResult], broke: dict[str, str],
                       gate: QualityGateConfig) -> CandidateVerdict:
    """The verdict with the gate's economics rules, and failed when its serving engine broke."""
    m = next((r for r in results if r.name == verdict.name), None)
    if m is None:  # its engine crashed while it was scored
        return verdict
    verdict = judge_economics(verdict, m.economics, gate)
    if m.name in broke:
        rule = failing(RuleKind.ENGINE, f"engine served its economics rounds ({broke[m.name]})")
        verdict = dataclasses.replace(verdict, rules=(*verdict.rules, rule))
    return verdict


@dataclass(frozen=True)
class ToMeasure:
    """A scored model as the economics stage needs it: how to open it as served (None: its speed
    is not measured: fake quantization, an unservable candidate), what its file weighs, and the
    bytes read per generated token (the roofline's)."""

    label: str
    opener: Opener | None
    artifact_bytes: int | None
    weight_bytes: int


def measure_economics(backend: Backend, ctx: RunContext, base: ModelResult, results: list[ModelResult],
                      models: list[ToMeasure]) -> tuple[Conditions | None, dict[str, str]]:
    """Stage 3: every served model in interleaved rounds (economics.interleaved: baseline, A, B,
    baseline, A, B, ...), then each model's medians and ratios to the baseline with intervals
    (economics.summarize), set on each ModelResult. Returns the measuring conditions (None when
    nothing was timed) and the models whose serving engine failed (label -> why)."""
    cfg, econ = ctx.cfg, ctx.cfg.economics
    by_label = {m.name: m for m in [base, *results]}
    openers = {m.label: m.opener for m in models if m.opener is not None and m.label in by_label}
    timed = econ.measure and base.name in openers
    rounds = econ_stage.interleaved(
        openers, rounds=econ.rounds, warm=backend.warm, prompts=ctx.bench_prompts, new_tokens=econ.new_tokens,
        sizes=econ_stage.batch_sizes(cfg.serving.max_batch_size),
        threads=econ_stage.serving_threads(cfg.serving.threads) if backend.uses_threads else None,
        interleave=backend.interleaves(ctx),
        on_round=ctx.progress("economics", econ.rounds * len(openers))) if timed else None
    gate = cfg.quality_gate
    summaries = econ_stage.summarize(rounds.samples, base.name, econ_stage.Bootstrap(
        gate.confidence, gate.bootstrap_samples, cfg.seed)) if rounds else {}
    for m in models:
        if m.label not in by_label:
            continue
        s = summaries.get(m.label)
        simulated = econ.measure and m.opener is None
        by_label[m.label].economics = Economics(backend.name, simulated, m.artifact_bytes, None, None, None) \
            if s is None else Economics(
                backend.name, False, m.artifact_bytes, s.peak_rss_bytes, s.throughput,
                ctx.bandwidth and econ_stage.roofline_fraction(s.throughput.decode_tokens_per_s.value,
                                                              m.weight_bytes, ctx.bandwidth),
                s.load, None, s.vs_baseline, s.rounds)
    return (rounds.conditions, rounds.failed) if rounds else (None, {})


@contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="quantgate-") as tmp:
        yield Path(tmp)


def bench_prompts(cfg: RunConfig, prepared: PreparedSuite) -> list[list[int]]:
    """`requests` prompts of `prompt_tokens` tokens, cut from the held-out text windows in turn."""
    econ = cfg.economics
    text = [t for w in prepared.windows[: prepared.n_text_windows] for t in w]
    n = min(econ.requests, len(text) // econ.prompt_tokens)
    return [text[i * econ.prompt_tokens : (i + 1) * econ.prompt_tokens] for i in range(n)]


@dataclass
class _Runner:
    """Scores served models through one backend on one executor, recording (and on resume
    reusing) their items."""

    ctx: RunContext
    backend: Backend
    executor: Executor
    store: Store | None
    resume: bool
    data_digest: str
    caches: dict[str | None, StoreCache] = field(default_factory=dict)  # by candidate label (None: baseline)
    to_measure: list[ToMeasure] = field(default_factory=list)  # every scored model, for the economics stage

    def served(self, served: Served) -> None:
        """Keep what the economics stage needs of a scored model (not the model: a torch
        candidate's opener holds its weights)."""
        measure = self.ctx.cfg.economics.measure
        self.to_measure.append(ToMeasure(served.label, self.backend.serving(self.ctx, served) if measure else None,
                                         self.backend.artifact_bytes(served), served.weight_bytes))

    def cache(self, cand: MethodConfig | None, prepared: PreparedSuite) -> StoreCache | None:
        """The model's records in the store (one object per model for the whole run)."""
        which = cand.label if cand else None
        if self.store is None or which in self.caches:
            return self.caches.get(which)
        ctx = self.ctx
        calibration = ctx.calib.digest if ctx.calib is not None and cand is not None else None
        key = ItemKey(ctx.baseline.digest, settings_digest(ctx.cfg, cand, calibration), self.data_digest)
        self.caches[which] = StoreCache(self.store, key, prepared, ctx.cfg.evaluation.record_every,
                                        which or "baseline", self.resume)
        return self.caches[which]

    def baseline(self, prepared: PreparedSuite) -> tuple[ModelResult, PreparedSuite, list[torch.Tensor]]:
        """The baseline's scores, the suite extended with its responses to prompt items, and
        its log-probs over every window (text and responses): the reference of every candidate."""
        ctx = self.ctx
        served, scores, prepared, reference = self.executor.baseline(self.backend, ctx, prepared,
                                                                     self.cache(None, prepared))
        metrics = model_metrics(scores, prepared, ctx.cfg.quality_gate.metric, ctx.baseline.tokenizer)
        self.served(served)
        return _result(served, None, metrics, scores, None), prepared, reference

    def start(self, cands: tuple[MethodConfig, ...], prepared: PreparedSuite, reference: list[torch.Tensor]) -> None:
        """Let the executor begin every candidate that is not already recorded whole."""
        for cand in cands:
            cache = self.cache(cand, prepared)
            if cache is None or not cache.complete():
                self.executor.start(self.backend, self.ctx, cand, prepared, reference, cache)

    def candidate(self, cand: MethodConfig, prepared: PreparedSuite, base: ModelResult,
                  reference: list[torch.Tensor]) -> ModelResult:
        ctx, cache = self.ctx, self.cache(cand, prepared)
        if cache is not None and cache.complete():  # a resumed run: nothing of this candidate is left to do
            served = self.backend.serve(ctx, cand, cache.meta())
            scores, _ = evaluate(None, prepared, reference, cache=cache, on_step=ctx.progress(cand.label, 2),
                                 model=cand.label)
        else:
            served, scores = self.executor.candidate(self.backend, ctx, cand, prepared, reference, cache)
        if cache is not None:
            cache.record_meta(served.meta())
        self.served(served)
        return self._compared(served, cand, scores, prepared, base)

    def full_precision(self, prepared: PreparedSuite, base: ModelResult,
                       reference: list[torch.Tensor]) -> ModelResult | None:
        """The checkpoint in float32 scored against a lower-precision baseline like a candidate:
        what evaluating in bf16/fp16 costs (not a candidate: never recommended; its speed is not
        measured); None when the engine cannot serve it (Backend.full_precision)."""
        served = self.backend.full_precision(self.ctx)
        if served is None:
            return None
        return self._compared(served, None, self._scored(served, prepared, reference, None), prepared, base)

    def _scored(self, served: Served, prepared: PreparedSuite, reference: list[torch.Tensor],
                cache: StoreCache | None) -> ModelScores:
        with served.open() as engine:
            scores, _ = evaluate(engine, prepared, reference, cache=cache,
                                 on_step=served.step or self.ctx.progress(served.label, 2))
        return scores

    def _compared(self, served: Served, cand: MethodConfig | None, scores: ModelScores, prepared: PreparedSuite,
                  base: ModelResult) -> ModelResult:
        """The model's metrics and its comparison with the baseline."""
        gate = self.ctx.cfg.quality_gate
        metrics = model_metrics(scores, prepared, gate.metric, self.ctx.baseline.tokenizer)
        comparison = compare(base.metrics, metrics, scores, prepared, confidence=gate.confidence,
                             n_boot=gate.bootstrap_samples, seed=self.ctx.cfg.seed)
        return _result(served, cand, metrics, scores, comparison)


def _result(served: Served, cand: MethodConfig | None, metrics: ModelMetrics, scores: ModelScores,
            comparison: Comparison | None) -> ModelResult:
    """A scored model; its economics come from the economics stage."""
    return ModelResult(served.label, cand, served.weight_bytes, served.modules_changed, metrics, scores, comparison,
                       served.make_seconds, None, served.artifact, served.scheme, served.bytes_counted,
                       served.unservable)


def with_costs(cfg: RunConfig, base: ModelResult, candidates: list[ModelResult]) -> None:
    """Cost at volume for every model whose speed was measured, against the baseline's, with the
    throughput's interval carried through (in place). Simulated candidates run at the baseline's
    speed: their cost is the baseline's."""
    econ, ref = cfg.economics, base.economics
    if econ.hardware_cost_per_hour is None or econ.tokens_per_month is None or ref is None or not ref.load:
        return
    base_tps = ref.tokens_per_s_under_load
    for m in [base, *candidates]:
        e = m.economics
        simulated = e is None or e.simulated or not e.load
        tps = base_tps if simulated else e.tokens_per_s_under_load
        ratio = None if m is base else Estimate(1.0, (1.0, 1.0)) if simulated else _under_load(e, base_tps)
        cost = cost_at_volume(tps, base_tps, ratio, cost_per_hour=econ.hardware_cost_per_hour,
                              tokens_per_month=econ.tokens_per_month, min_saving=econ.min_monthly_saving)
        if m.unservable:
            cost = dataclasses.replace(cost, worth_it=False, note=f"not servable on {cfg.serving.engine}: "
                                       f"{m.unservable}; its quality is fake quantization's, its speed unmeasured")
        elif simulated and m is not base:
            cost = dataclasses.replace(cost, worth_it=False, note="simulated: fake quantization runs at the "
                                       "baseline's speed, so no saving is measured; serve it on an engine with "
                                       "integer kernels to price it")
        m.economics = dataclasses.replace(e or Economics(cfg.serving.engine, True, None, None, None, None), cost=cost)


def _under_load(e: Economics, base_tps: Estimate) -> Estimate:
    """The paired throughput ratio at the largest batch size; without pairs (rounds lost), the
    ratio of medians with no interval (the saving is then "can't tell")."""
    if e.vs_baseline is not None and e.vs_baseline.under_load is not None:
        return e.vs_baseline.under_load
    nan = float("nan")
    return Estimate(e.tokens_per_s_under_load.value / base_tps.value, (nan, nan))


def noise_floor(backend: Backend, ctx: RunContext, prepared: PreparedSuite,
                reference: list[torch.Tensor]) -> NoiseFloor | None:
    """The baseline on the serving engine against the backend's second path over the text
    windows (see Backend.noise_reference)."""
    windows = prepared.windows[: prepared.n_text_windows]
    if not windows:  # e.g. a server without prompt log-probabilities
        return None
    other, what = backend.noise_reference(ctx)
    kld, agree, truncation = [], [], []
    for ref, lp in zip(reference, other.token_logprobs(windows)):
        divergence, bias = backend.floor_divergence(lp, ref)
        kld.append(divergence)
        truncation.append(bias)
        agree.append((ref.argmax(-1) == lp.argmax(-1)).numpy())
    bias = None if any(b is None for b in truncation) else np.concatenate(truncation)
    return NoiseFloor(backend.name, what, np.concatenate(kld), np.concatenate(agree), bias)


def _servable(verdict: CandidateVerdict, engine: str, unservable: str | None) -> CandidateVerdict:
    """The verdict, failed when the serving engine cannot serve the candidate as evaluated."""
    if unservable is None:
        return verdict
    return dataclasses.replace(verdict, rules=(*verdict.rules, failing(RuleKind.SERVABLE, f"served by {engine} "
                                                                       f"({unservable})")))


def _crashed_verdict(name: str, error: str) -> CandidateVerdict:
    return CandidateVerdict(name, 0, (failing(RuleKind.ENGINE, f"engine ran to completion ({error})"),))
