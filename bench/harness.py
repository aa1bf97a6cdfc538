"""What the quality benches share: the default model, the default suite and PIQA items from
../shared/data, the calibration set (disjoint from both), the baseline's scores, and a
candidate's comparison with them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from quantgate.config import CalibrationConfig, QualityGateConfig
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import EvalSuite, load_suite
from quantgate.evals.metrics import Comparison, ModelMetrics, compare, model_metrics
from quantgate.evals.tasks import PreparedSuite, evaluate, prepare
from quantgate.methods.calibrate import CalibrationSet, calibration_set
from quantgate.models.load import Baseline, load_baseline

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = "smollm2-135m-instruct"


@dataclass
class Bench:
    baseline: Baseline
    suites: dict[str, EvalSuite]  # "default", "piqa"
    prepared: dict[str, PreparedSuite]
    calib: CalibrationSet
    base: dict[str, tuple[ModelMetrics, list[torch.Tensor]]]  # the baseline's metrics and log-probs


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--piqa", type=int, default=500)
    ap.add_argument("--default-items", type=int, help="items per task of the default suite (default: all, "
                    "with 200 cloze items; a smaller number is for smoke runs and takes as many cloze items)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)


def setup(args: argparse.Namespace) -> Bench | None:
    """Load and score the baseline; None (after saying why) without the shared data."""
    if not (DATA / "piqa.jsonl").is_file():
        print(f"bench needs {DATA / 'piqa.jsonl'} (the shared evaluation data)", file=sys.stderr)
        return None
    baseline = load_baseline(MODEL)
    tok = baseline.tokenizer
    suites = {
        "default": load_suite(QualityGateConfig(), limit=args.default_items,
                              cloze_items=200 if args.default_items is None else args.default_items, seed=0),
        "piqa": load_suite(QualityGateConfig(eval_set=str(DATA / "piqa.jsonl")), limit=args.piqa, cloze_items=0, seed=0),
    }
    prepared = {k: prepare(s, tok, window_tokens=256, n_windows=8) for k, s in suites.items()}
    calib = calibration_set(tok, CalibrationConfig(samples=args.samples, seq_len=args.seq_len),
                            [t for s in suites.values() for t in s.texts()])
    base = {}
    for k, p in prepared.items():
        scores, ref = evaluate(TorchEngine(baseline.model), p, keep=True)
        base[k] = (model_metrics(scores, p, "accuracy", tok), ref)
    return Bench(baseline, suites, prepared, calib, base)


def compare_model(bench: Bench, model: torch.nn.Module) -> dict[str, Comparison]:
    """A candidate model against the baseline on each suite."""
    result = {}
    for k, p in bench.prepared.items():
        scores, _ = evaluate(TorchEngine(model), p, bench.base[k][1])
        metrics = model_metrics(scores, p, "accuracy", bench.baseline.tokenizer)
        result[k] = compare(bench.base[k][0], metrics, scores, p, n_boot=500)
    return result
