"""Quantization-aware recovery (method qat) against the PTQ it starts from, on the default model:
at int3 and int4 group 64, RTN, GPTQ with act-order, and qat (init GPTQ act-order). Quality on the
default suite (KLD and top-1 agreement on its held-out prose) and on PIQA items from
../shared/data; the wall time and peak memory (VmHWM, reset before each candidate) of making
each candidate, with the load average around it.

Run with `make bench-qat`. Prints a table and the issue's acceptance ratios; asserts nothing.
Calibration: the default offline prose pool (disjoint from the eval text), 128 × 256 tokens.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
from rich.console import Console
from rich.table import Table

from quantgate.evals.metrics import Comparison
from quantgate.methods.apply import make_candidate
from quantgate.methods.registry import MethodConfig, candidate

KINDS = ("rtn", "gptq", "qat")  # the rows of each scheme, in order


def candidates(bits: int, steps: int | None, e2e_steps: int | None, init: str) -> list[MethodConfig]:
    grid = {"bits": bits, "group_size": 64}
    qat = {"init": {"method": "gptq", "act_order": True} if init == "gptq" else {"method": init},
           **({"steps": steps} if steps is not None else {}),
           **({"e2e_steps": e2e_steps} if e2e_steps is not None else {})}
    return [candidate(method="rtn", **grid), candidate(method="gptq", act_order=True, **grid),
            candidate(method="qat", **qat, **grid)]


def peak_rss_mb() -> float:
    """This process's peak resident memory since the last reset_peak() (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Hand freed heap pages back (glibc keeps them, and a row after qat would report the
    pages qat freed as its own peak), then reset VmHWM to the current RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the RSS keeps what the allocator holds
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's since start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    harness.add_arguments(ap)
    ap.add_argument("--bits", type=int, nargs="*", default=[3, 4])
    ap.add_argument("--only", nargs="*", choices=KINDS, help="rows to run (default: all)")
    ap.add_argument("--steps", type=int, help="qat steps per block (default: the method's)")
    ap.add_argument("--e2e-steps", type=int, help="qat's end-to-end steps (default: the method's)")
    ap.add_argument("--init", choices=("gptq", "rtn", "awq"), default="gptq", help="qat's init (gptq: act-order)")
    args = ap.parse_args()
    bench = harness.setup(args)
    if bench is None:
        return 2

    rows = []
    for bits in args.bits:
        for kind, cand in zip(KINDS, candidates(bits, args.steps, args.e2e_steps, args.init)):
            if not args.only or kind in args.only:
                rows.append(measure(bench, bits, kind, cand))
                print(f"{cand.label}: {rows[-1].seconds:.0f} s", file=sys.stderr, flush=True)

    calib = bench.calib.windows
    table = Table(title=f"quantization-aware recovery vs PTQ on the default model ({calib.shape[0]} × "
                        f"{calib.shape[1]} calibration tokens, {torch.get_num_threads()} threads)")
    for col in ("candidate", "make s (cpu s)", "load avg", "peak RSS MB", "KLD mean [95%]", "KLD / GPTQ", "top-1",
                "recovery default [95%]", f"recovery piqa[{args.piqa}] [95%]", "flips default", "flips piqa"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    by = {(r.bits, r.kind): r.result for r in rows}
    for r in rows:
        d, q = r.result["default"], r.result["piqa"]
        gptq = by.get((r.bits, "gptq"))
        table.add_row(r.cand.label, f"{r.seconds:.0f} ({r.cpu:.0f})", f"{r.load[0]:.1f}→{r.load[1]:.1f}",
                      f"{r.peak_mb:.0f}", f"{d.kld.mean:.4f} [{d.kld.mean_ci[0]:.3f}, {d.kld.mean_ci[1]:.3f}]",
                      f"{d.kld.mean / gptq['default'].kld.mean:.2f}" if gptq else "—", f"{d.top1_agreement:.1%}",
                      _recovery(d), _recovery(q), f"{d.flips.rate:.1%}", f"{q.flips.rate:.1%}")
    Console(width=200).print(table)
    for bits in args.bits:
        if (bits, "gptq") in by and (bits, "qat") in by:
            print(acceptance(bits, by[(bits, "gptq")], by[(bits, "qat")]))
    return 0


@dataclass
class Row:
    bits: int
    kind: str
    cand: MethodConfig
    seconds: float  # wall time of make_candidate
    cpu: float  # process CPU time of it (both threads)
    peak_mb: float  # peak RSS while making it
    load: tuple[float, float]  # 1-minute load average before and after
    result: dict[str, Comparison]  # "default", "piqa"


def measure(bench: harness.Bench, bits: int, kind: str, cand: MethodConfig) -> Row:
    reset_peak()
    load, t0, cpu0 = os.getloadavg()[0], time.perf_counter(), time.process_time()
    made = make_candidate(bench.baseline.model, bench.baseline.arch, cand, bench.calib, seed=0)
    seconds, cpu, peak = time.perf_counter() - t0, time.process_time() - cpu0, peak_rss_mb()
    return Row(bits, kind, cand, seconds, cpu, peak, (load, os.getloadavg()[0]), harness.compare_model(bench, made.model))


def _recovery(c: Comparison) -> str:
    lo, hi = c.tasks["overall"].recovery_ci
    return f"{c.recovery:.4f} [{lo:.3f}, {hi:.3f}]"


def acceptance(bits: int, gptq: dict[str, Comparison], qat: dict[str, Comparison]) -> str:
    """The issue's acceptance at one scheme: qat's KLD / GPTQ act-order's (<= 0.7 asked at int3)
    and qat's recovery on each suite against GPTQ's."""
    ratio = qat["default"].kld.mean / gptq["default"].kld.mean
    recovery = "; ".join(f"recovery {s} {qat[s].recovery:.4f} vs {gptq[s].recovery:.4f} "
                         f"(>=: {'yes' if qat[s].recovery >= gptq[s].recovery else 'no'})" for s in ("default", "piqa"))
    return f"int{bits} g64: qat KLD / GPTQ act-order KLD = {ratio:.3f} (<= 0.7: {'yes' if ratio <= 0.7 else 'no'}); {recovery}"


if __name__ == "__main__":
    sys.exit(main())
