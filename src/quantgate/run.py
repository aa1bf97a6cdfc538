"""One run: config -> baseline -> candidates -> scores -> comparisons -> gate decision.

Each stage returns plain data; the CLI only loads the config, calls `execute` and renders.
"""

from __future__ import annotations

import gc
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

import quantgate
from quantgate.config import CALIBRATED_METHODS, CandidateConfig, RunConfig, check_supported
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import load_suite
from quantgate.evals.metrics import Comparison, ModelMetrics, compare, model_metrics
from quantgate.evals.tasks import ModelScores, PreparedSuite, evaluate, prepare, with_response_windows
from quantgate.gate import Decision, check_tasks, decide, judge
from quantgate.methods.apply import make_candidate, weight_bytes
from quantgate.methods.calibrate import CalibrationSet, calibration_set
from quantgate.models.load import Baseline, load_baseline

# A progress sink: (description, total steps) -> a function that advances by n steps.
Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class ModelResult:
    name: str
    candidate: CandidateConfig | None  # None for the baseline
    weight_bytes: int
    modules_changed: int
    metrics: ModelMetrics
    scores: ModelScores = field(repr=False)
    comparison: Comparison | None = None
    quantize_seconds: float = 0.0


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

    @property
    def exit_code(self) -> int:
        return 0 if self.decision.recommended else 1


def environment() -> dict[str, str]:
    import transformers

    return {
        "quantgate": quantgate.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads",
    }


def execute(cfg: RunConfig, progress: Progress = _no_progress) -> RunResult:
    """Run the whole job. Inputs (config, eval set, calibration data) are validated before any
    model work starts."""
    check_supported(cfg)
    started = datetime.now(timezone.utc)
    ev, gate = cfg.evaluation, cfg.quality_gate
    torch.manual_seed(cfg.seed)
    suite = load_suite(gate, limit=ev.limit, cloze_items=ev.cloze_items, seed=cfg.seed)
    check_tasks(gate, suite.tasks)
    baseline = load_baseline(cfg.model.base)
    prepared = prepare(suite, baseline.tokenizer, window_tokens=ev.window_tokens, n_windows=ev.ppl_windows)
    calib = None
    if any(c.method in CALIBRATED_METHODS for c in cfg.resolved_candidates):
        calib = calibration_set(baseline.tokenizer, cfg.calibration, suite.texts())

    base, prepared, reference = _run_baseline(cfg, baseline, prepared, progress)
    results, verdicts = [], []
    for cand in cfg.resolved_candidates:
        result = _run_candidate(cfg, baseline, cand, calib, prepared, base, reference, progress)
        results.append(result)
        verdicts.append(judge(cand.label, result.weight_bytes, result.comparison, gate))
        gc.collect()
    return RunResult(
        config=cfg, started=started, finished=datetime.now(timezone.utc),
        model_source=baseline.source, model_digest=baseline.digest, model_description=baseline.description,
        prepared=prepared, baseline=base, candidates=results,
        calibration=calib and {"source": calib.source, "sha256": calib.digest,
                               "samples": int(calib.windows.shape[0]), "seq_len": int(calib.windows.shape[1])},
        decision=decide(verdicts, eval_items=len(suite.items), min_items=gate.min_items),
        environment=environment(),
    )


def _engine(cfg: RunConfig, model: torch.nn.Module) -> TorchEngine:
    return TorchEngine(model, max_batch_size=cfg.serving.max_batch_size, batch_tokens=cfg.evaluation.batch_tokens)


def _run_baseline(
    cfg: RunConfig, baseline: Baseline, prepared: PreparedSuite, progress: Progress
) -> tuple[ModelResult, PreparedSuite, list[torch.Tensor]]:
    """The baseline's scores, the suite extended with its responses to prompt items, and its
    per-window log-probs (the reference of every candidate)."""
    engine = _engine(cfg, baseline.model)
    scores, reference = evaluate(engine, prepared, keep=True, on_step=progress("baseline", 2))
    prepared = with_response_windows(prepared, scores.generations)
    reference += list(engine.token_logprobs(prepared.windows[len(reference):]))
    result = ModelResult(
        name="baseline", candidate=None, weight_bytes=weight_bytes(baseline.model)[0], modules_changed=0,
        metrics=model_metrics(scores, prepared, cfg.quality_gate.metric, baseline.tokenizer), scores=scores,
    )
    return result, prepared, reference


def _run_candidate(
    cfg: RunConfig, baseline: Baseline, cand: CandidateConfig, calib: CalibrationSet | None,
    prepared: PreparedSuite, base: ModelResult, reference: list[torch.Tensor], progress: Progress,
) -> ModelResult:
    calibrated = cand.method in CALIBRATED_METHODS
    n_blocks = len(baseline.model.get_submodule(baseline.arch.blocks)) if calibrated else 1
    step = progress(cand.label, 2 + n_blocks)
    t0 = time.perf_counter()
    made = make_candidate(baseline.model, baseline.arch, cand, calib if calibrated else None,
                          seed=cfg.seed, on_block=lambda i: step(1))
    quantize_seconds = time.perf_counter() - t0
    if not calibrated:
        step(1)
    scores, _ = evaluate(_engine(cfg, made.model), prepared, reference, on_step=step)
    gate = cfg.quality_gate
    metrics = model_metrics(scores, prepared, gate.metric, baseline.tokenizer)
    comparison = compare(base.metrics, metrics, scores, prepared, confidence=gate.confidence,
                         n_boot=gate.bootstrap_samples, seed=cfg.seed)
    return ModelResult(cand.label, cand, made.weight_bytes, made.modules_changed, metrics, scores,
                       comparison, quantize_seconds)
