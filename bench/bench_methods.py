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

import harness
import torch
from rich.console import Console
from rich.table import Table

from quantgate.methods.registry import candidate
from quantgate.methods.apply import make_candidate

CANDIDATES = (
    candidate(method="rtn", bits=4, group_size=64),
    candidate(method="gptq", bits=4, group_size=64),
    candidate(method="gptq", bits=4, group_size=64, act_order=True),
    candidate(method="awq", bits=4, group_size=64),
    candidate(method="rtn", bits=3, group_size=64),
    candidate(method="gptq", bits=3, group_size=64),
    candidate(method="gptq", bits=3, group_size=64, act_order=True),
    candidate(method="awq", bits=3, group_size=64),
    candidate(method="w8a8"),
    candidate(method="smoothquant", alpha=0.5),
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    harness.add_arguments(ap)
    ap.add_argument("--only", nargs="*", help="candidate labels to run (default: all); the first of "
                    "each bit width is the reference of the KLD ratio, so include it")
    args = ap.parse_args()
    bench = harness.setup(args)
    if bench is None:
        return 2
    calib = bench.calib

    rows = []
    for cand in [c for c in CANDIDATES if not args.only or c.label in args.only]:
        t0 = time.perf_counter()
        made = make_candidate(bench.baseline.model, bench.baseline.arch, cand, calib, seed=0)
        seconds = time.perf_counter() - t0
        result = harness.compare_model(bench, made.model)
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
