"""Calibrated PTQ against round-to-nearest on the default model, side by side: GPTQ and AWQ vs RTN
at int4 / int3 group 64, SmoothQuant W8A8 vs naive W8A8. Quality on the default suite (with KLD
on its held-out prose) and on PIQA items from ../shared/data; wall time of each method.

Run with `make bench-methods`. Prints a table; asserts nothing.
Calibration: the default offline prose pool (disjoint from the eval text), 128 sequences of 256
tokens — the pool holds ~45k tokens, too few for 128 × 512.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantgate.config import CalibrationConfig, CandidateConfig, QualityGateConfig
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import load_suite
from quantgate.evals.metrics import compare, model_metrics
from quantgate.evals.tasks import evaluate, prepare
from quantgate.methods.apply import make_candidate
from quantgate.methods.calibrate import calibration_set
from quantgate.models.load import load_baseline

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CANDIDATES = (
    CandidateConfig(method="rtn", bits=4, group_size=64),
    CandidateConfig(method="gptq", bits=4, group_size=64),
    CandidateConfig(method="gptq", bits=4, group_size=64, act_order=True),
    CandidateConfig(method="awq", bits=4, group_size=64),
    CandidateConfig(method="rtn", bits=3, group_size=64),
    CandidateConfig(method="gptq", bits=3, group_size=64),
    CandidateConfig(method="gptq", bits=3, group_size=64, act_order=True),
    CandidateConfig(method="awq", bits=3, group_size=64),
    CandidateConfig(method="w8a8"),
    CandidateConfig(method="smoothquant", alpha=0.5),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--piqa", type=int, default=500)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--only", nargs="*", help="candidate labels to run (default: all); the first of "
                    "each bit width is the reference of the KLD ratio, so include it")
    args = ap.parse_args()
    if not (DATA / "piqa.jsonl").is_file():
        print(f"bench needs {DATA / 'piqa.jsonl'} (the shared evaluation data)", file=sys.stderr)
        return 2
    baseline = load_baseline("smollm2-135m-instruct")
    tok = baseline.tokenizer
    suites = {
        "default": load_suite(QualityGateConfig(), limit=None, cloze_items=200, seed=0),
        "piqa": load_suite(QualityGateConfig(eval_set=str(DATA / "piqa.jsonl")), limit=args.piqa, cloze_items=0, seed=0),
    }
    prepared = {k: prepare(s, tok, window_tokens=256, n_windows=8) for k, s in suites.items()}
    calib = calibration_set(tok, CalibrationConfig(samples=args.samples, seq_len=args.seq_len),
                            [t for s in suites.values() for t in s.texts()])
    base = {}
    for k, p in prepared.items():
        scores, ref = evaluate(TorchEngine(baseline.model), p, keep=True)
        base[k] = (model_metrics(scores, p, "accuracy", tok), ref)

    rows = []
    for cand in [c for c in CANDIDATES if not args.only or c.label in args.only]:
        t0 = time.perf_counter()
        made = make_candidate(baseline.model, baseline.arch, cand, calib, seed=0)
        seconds = time.perf_counter() - t0
        result = {}
        for k, p in prepared.items():
            scores, _ = evaluate(TorchEngine(made.model), p, base[k][1])
            metrics = model_metrics(scores, p, "accuracy", tok)
            result[k] = compare(base[k][0], metrics, scores, p, n_boot=500)
        rows.append((cand, seconds, result))
        print(f"{cand.label}: {seconds:.0f} s", file=sys.stderr, flush=True)

    table = Table(title=f"calibrated PTQ vs RTN on the default model ({calib.windows.shape[0]} × "
                        f"{calib.windows.shape[1]} calibration tokens, {torch.get_num_threads()} threads)")
    for col in ("candidate", "method s", "KLD mean", "KLD / RTN", "top-1", "recovery default",
                f"recovery piqa[{args.piqa}]", "flips default", "flips piqa"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    reference = {}
    for cand, seconds, result in rows:
        d, q = result["default"], result["piqa"]
        key = (cand.bits, cand.method in ("smoothquant", "w8a8"))
        reference.setdefault(key, d.kld.mean)  # the first of each bit width is the RTN / naive one
        table.add_row(cand.label, f"{seconds:.0f}", f"{d.kld.mean:.4f}", f"{d.kld.mean / reference[key]:.2f}",
                      f"{d.top1_agreement:.1%}", f"{d.recovery:.4f}", f"{q.recovery:.4f}",
                      f"{d.flips.rate:.1%}", f"{q.flips.rate:.1%}")
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
