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

import numpy as np
import torch

import quantgate
from quantgate.config import CALIBRATED_METHODS, CandidateConfig, RunConfig, check_supported
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import load_suite
from quantgate.evals.metrics import Comparison, ModelMetrics, compare, model_metrics
from quantgate.evals.tasks import ModelScores, PreparedSuite, evaluate, prepare, with_response_windows
from quantgate.gate import Decision, check_tasks, decide, judge
from quantgate.methods.apply import make_candidate, weight_bytes
from quantgate.methods.calibrate import calibration_set
from quantgate.models.load import load_baseline

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


def suite_texts(suite) -> list[str]:
    """Every text the eval set shows a model (for the calibration overlap check)."""
    texts = [suite.perplexity_text or ""]
    for item in suite.items:
        texts += [str(v) for k, v in vars(item).items() if k not in ("id", "task", "gold") and isinstance(v, str)]
        texts += [" ".join(v) for v in vars(item).values() if isinstance(v, tuple)]
    return texts


def execute(cfg: RunConfig, progress: Progress = _no_progress) -> RunResult:
    """Run the whole job. Inputs are validated before any model work starts."""
    check_supported(cfg)
    started = datetime.now(timezone.utc)
    ev = cfg.evaluation
    torch.manual_seed(cfg.seed)
    gate = cfg.quality_gate
    suite = load_suite(gate, limit=ev.limit, cloze_items=ev.cloze_items, seed=cfg.seed)
    check_tasks(gate, suite.tasks)
    baseline = load_baseline(cfg.model.base)
    prepared = prepare(suite, baseline.tokenizer, window_tokens=ev.window_tokens, n_windows=ev.ppl_windows)
    metric = gate.metric

    def engine(model: torch.nn.Module) -> TorchEngine:
        return TorchEngine(model, max_batch_size=cfg.serving.max_batch_size, batch_tokens=ev.batch_tokens)

    base_engine = engine(baseline.model)
    base_scores, reference = evaluate(base_engine, prepared, keep=True, on_step=progress("baseline", 2))
    # Prompt items: candidates are also compared on the baseline's own responses.
    prepared = with_response_windows(prepared, base_scores.generations)
    reference += list(base_engine.token_logprobs(prepared.windows[len(reference):]))
    base = ModelResult(
        name="baseline", candidate=None, weight_bytes=weight_bytes(baseline.model)[0], modules_changed=0,
        metrics=model_metrics(base_scores, prepared, metric, baseline.tokenizer), scores=base_scores,
    )
    results, verdicts = [], []
    calib = None
    if any(c.method in CALIBRATED_METHODS for c in cfg.resolved_candidates):
        calib = calibration_set(baseline.tokenizer, cfg.calibration, suite_texts(prepared.suite))
    n_blocks = len(baseline.model.get_submodule(baseline.arch.blocks))
    for cand in cfg.resolved_candidates:
        calibrated = cand.method in CALIBRATED_METHODS
        step = progress(cand.label, 2 + (n_blocks if calibrated else 1))
        t0 = time.perf_counter()
        made = make_candidate(baseline.model, baseline.arch, cand, calib if calibrated else None,
                              seed=cfg.seed, on_block=lambda i: step(1))
        quantize_seconds = time.perf_counter() - t0
        if not calibrated:
            step(1)
        scores, _ = evaluate(engine(made.model), prepared, reference, on_step=step)
        metrics = model_metrics(scores, prepared, metric, baseline.tokenizer)
        comparison = compare(base.metrics, metrics, scores, prepared, confidence=gate.confidence,
                             n_boot=gate.bootstrap_samples, seed=cfg.seed)
        results.append(ModelResult(cand.label, cand, made.weight_bytes, made.modules_changed, metrics, scores,
                                   comparison, quantize_seconds))
        verdicts.append(judge(cand.label, made.weight_bytes, comparison, gate))
        del made
        gc.collect()
    return RunResult(
        config=cfg, started=started, finished=datetime.now(timezone.utc),
        model_source=baseline.source, model_digest=baseline.digest, model_description=baseline.description,
        prepared=prepared, baseline=base, candidates=results,
        decision=decide(verdicts, labeled_items=int((~np.isnan(base.metrics.score)).sum()), min_items=gate.min_items),
        environment=environment(),
    )
