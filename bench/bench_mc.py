"""Multiple-choice scoring speed on the default model: quantgate's batched, prefix-sharing engine
against the plain one-request-at-a-time loop, on the same PIQA items, side by side.

Run with `make bench`. Prints a table; asserts nothing (targets live in the issue, numbers here).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from quantgate.engines.torch import TorchEngine, loglikelihood_reference
from quantgate.evals.datasets import EvalSuite, read_jsonl
from quantgate.evals.tasks import prepare
from quantgate.models.load import load_baseline

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def accuracy(option_ll: np.ndarray, offsets: np.ndarray, gold: np.ndarray) -> float:
    chosen = [int(np.argmax(option_ll[a:b])) for a, b in zip(offsets[:-1], offsets[1:])]
    return float(np.mean(np.array(chosen) == gold))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="piqa")
    ap.add_argument("--items", type=int, default=300)
    args = ap.parse_args()
    path = DATA / f"{args.task}.jsonl"
    if not path.is_file():
        print(f"bench needs {path} (the shared evaluation data)", file=sys.stderr)
        return 2
    baseline = load_baseline("smollm2-135m-instruct")
    items = read_jsonl(path)[: args.items]
    prepared = prepare(EvalSuite(args.task, tuple(items), None), baseline.tokenizer, window_tokens=16, n_windows=0)
    reqs = prepared.requests
    n_tokens = sum(len(c) + len(x) for c, x in reqs)
    engine = TorchEngine(baseline.model)
    mkl_engine = TorchEngine(baseline.model, onednn=False)  # packing and batching only
    scorers = (
        ("plain loop (1 request per forward)", lambda r: loglikelihood_reference(baseline.model, r)),
        ("TorchEngine, MKL sgemm (packing + batching)", mkl_engine.loglikelihood),
        ("quantgate TorchEngine (+ oneDNN GEMM)", engine.loglikelihood),
    )
    rows = []
    for name, fn in scorers:
        fn(reqs[:8])  # warm-up
        t0 = time.perf_counter()
        ll, _ = fn(reqs)  # (log-likelihood, greedy) per request
        rows.append((name, time.perf_counter() - t0, ll))
    (_, t_ref, ll_ref), _, (_, t_eng, ll_eng) = rows

    gold = np.array([item.gold for item in prepared.suite.items])
    table = Table(title=f"multiple-choice scoring, {len(items)} {args.task} items, {len(reqs)} options, "
                        f"{n_tokens} tokens, {torch.get_num_threads()} threads")
    for col in ("scorer", "seconds", "items/s", "tokens/s", "accuracy", "speed-up"):
        table.add_column(col, justify="left" if col == "scorer" else "right")
    for name, dt, ll in rows:
        acc = accuracy(ll, prepared.offsets, gold)
        table.add_row(name, f"{dt:.1f}", f"{len(items) / dt:.1f}", f"{n_tokens / dt:.0f}", f"{acc:.4f}",
                      f"{t_ref / dt:.2f}x")
    console = Console(width=130)
    console.print(table)
    same = accuracy(ll_ref, prepared.offsets, gold) == accuracy(ll_eng, prepared.offsets, gold)
    console.print(f"max |log-likelihood difference| = {np.max(np.abs(ll_ref - ll_eng)):.2e}; "
                  f"identical accuracy: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
