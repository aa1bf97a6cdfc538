"""How many threads should a serving engine use on this machine, now? The default model's decode
speed on ONNX Runtime (fp32 and int8 weights with int8 activations) and, when installed,
llama.cpp (Q8_0), each engine at every thread count from 1 to the cores this process may use, all
measured in interleaved rounds of fresh engine processes (economics.interleaved, the path
`quantgate run` measures with). For each engine the ratio of each thread count to 1 thread, with
its bootstrap interval and what the interval allows saying, beside the load average before and
during: the evidence for serving.threads' default (economics.serving_threads).

Run with `make bench-threads`. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantgate import economics as ec
from quantgate.config import DEFAULT_ROUNDS
from quantgate.engines import onnxruntime as qo
from quantgate.engines.process import EngineProcess
from quantgate.evals.datasets import default_suite
from quantgate.evals.tasks import make_windows
from quantgate.methods.apply import make_candidate
from quantgate.methods.registry import candidate
from quantgate.models.load import load_baseline
from quantgate.report.view import NO_DIFFERENCE


def engines(logs: Path, new_tokens: int) -> dict[str, tuple[str, dict]]:
    """name -> (engine process kind, its options), for the default model."""
    baseline = load_baseline("smollm2-135m-instruct")
    base = qo.float_graph(baseline, logs / "builder.log")
    cand = candidate(method="rtn", bits=8, accuracy_level=4)
    made = make_candidate(baseline.model, baseline.arch, cand)
    w8 = qo.candidate_graph(base, qo.candidate_weights(made.model, baseline.arch, cand), baseline.arch.blocks, 4)
    out = {"ORT fp32": ("onnxruntime", {"path": str(base)}), "ORT rtn-w8-acc4": ("onnxruntime", {"path": str(w8)})}
    if importlib.util.find_spec("llama_cpp") is not None:
        from quantgate.methods.gguf_quant import quantized_gguf

        out["llama.cpp Q8_0"] = ("llamacpp", {"path": str(quantized_gguf(baseline, "Q8_0")),
                                              "n_ctx": 64 + new_tokens + 1, "logits_all": False})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    ap.add_argument("--requests", type=int, default=4, help="64-token prompts per round")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-threads", type=int, default=ec.cores_available())
    ap.add_argument("--boot", type=int, default=2000, help="bootstrap replicates")
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    baseline = load_baseline("smollm2-135m-instruct")
    windows = make_windows(baseline.tokenizer, default_suite(limit=1, cloze_items=0, seed=0).perplexity_text, 256, 8)
    prompts = [w[:64] for w in windows[: args.requests]]
    del baseline
    counts = range(1, args.max_threads + 1)
    openers = {(name, n): (lambda _, kind=kind, opts=opts, n=n, name=name: EngineProcess(
        kind, label=f"{name}-{n}", log=logs / f"{name.replace(' ', '_')}-{n}.log", threads=n, **opts))
        for name, (kind, opts) in engines(logs, args.new_tokens).items() for n in counts}
    rounds = ec.interleaved({f"{name} / {n}": o for (name, n), o in openers.items()}, rounds=args.rounds, warm=False,
                            prompts=prompts, new_tokens=args.new_tokens, sizes=[1], threads=None,
                            on_round=lambda n: print(".", end="", file=sys.stderr, flush=True))
    print(file=sys.stderr)
    render(rounds, sorted({name for name, _ in openers}), counts, args)
    return 0


def render(rounds: ec.Rounds, names: list[str], counts: range, args: argparse.Namespace) -> None:
    boot = ec.Bootstrap(0.95, args.boot, 0)
    table = Table(title=f"decode tokens/s by thread count: batch 1, {args.requests} 64-token prompts, "
                        f"{args.new_tokens} new tokens, {args.rounds} interleaved rounds of fresh processes; "
                        "medians [95% bootstrap intervals]")
    for col in ("engine", "threads", "decode tok/s", "vs 1 thread", "in words"):
        table.add_column(col, justify="left" if col in ("engine", "in words") else "right")
    for name in names:
        labels = [f"{name} / {n}" for n in counts if f"{name} / {n}" in rounds.samples]
        summaries = ec.summarize({k: rounds.samples[k] for k in labels}, f"{name} / 1", boot)
        for label in labels:
            s = summaries[label]
            d, r = s.throughput.decode_tokens_per_s, s.vs_baseline
            how = "" if r is None else r.decode.compared()
            words = {"better": "faster", "worse": "slower", "same": NO_DIFFERENCE}.get(how, "")
            table.add_row(name, label.rsplit(" / ", 1)[1], f"{d.value:.1f} [{d.ci[0]:.1f}, {d.ci[1]:.1f}]",
                          "reference" if r is None else f"×{r.decode.value:.2f} [{r.decode.ci[0]:.2f}, "
                                                        f"{r.decode.ci[1]:.2f}]", words)
    console = Console(width=200)
    console.print(table)
    c = rounds.conditions
    console.print(f"{c.cpu}, {c.cores} cores; load average before {', '.join(f'{x:.2f}' for x in c.load_before)}; "
                  f"after each round {', '.join(f'{x:.2f}' for x in c.load_during)}")
    for label, error in rounds.failed.items():
        console.print(f"{label}: engine failed: {error}")


if __name__ == "__main__":
    sys.exit(main())
