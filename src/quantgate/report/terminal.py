"""The results in a terminal: candidates table, per-task statistics, the gate's reasons, the
recommendation, and what accuracy alone would hide."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from quantgate.evals.metrics import OVERALL, TaskComparison
from quantgate.gate import CandidateVerdict, RuleResult
from quantgate.report.view import decode_cell, grouped_notes
from quantgate.run import ModelResult, RunResult

STATUS_STYLE = {"pass": "[green]pass[/]", "fail": "[red]fail[/]", "inconclusive": "[yellow]inconclusive[/]"}


def render(result: RunResult, console: Console) -> None:
    suite = result.prepared.suite
    tasks = ", ".join(f"{t} {n}" for t, n in suite.tasks.items()) or "no items"
    console.print(f"[bold]model[/] {result.model_description}  [dim]({result.model_source})[/]")
    console.print(f"[bold]eval set[/] {suite.name}: {len(suite.items)} items ({tasks}); "
                  f"{result.prepared.n_window_tokens} tokens for perplexity / KLD")
    if suite.duplicates:
        shown = ", ".join(f"{i} = {f}" for _, i, f in suite.duplicates[:5])
        console.print(f"[yellow]![/] {len(suite.duplicates)} duplicate items (same content): {shown}")
    console.print(table(result))
    console.print(economics_table(result))
    console.print(noise_floor_line(result))
    for note in result.notes:
        console.print(f"[yellow]![/] {note}")
    for f in result.failed:
        console.print(f"[red]✗[/] {f.name}: {f.error}")
    costs = [(m.name, m.economics.cost) for m in result.candidates if m.economics and m.economics.cost]
    for line in grouped_notes((name, c.note) for name, c in costs if not c.worth_it):
        console.print(f"[yellow]![/] {line}")
    if len(suite.tasks) > 0 and result.candidates and result.candidates[0].comparison.tasks:
        console.print(task_table(result))
    verdicts = {v.name: v for v in result.decision.verdicts}
    for c in result.candidates:
        console.print(reasons(verdicts[c.name]))
    for c in result.candidates:
        note = silent_loss(c, result.config.quality_gate.min_acceptable)
        if note:
            console.print(f"[yellow]![/] {note}")
    if result.config.strategy == "ladder":
        console.print(ladder_line(result))
    rec = result.decision.recommended
    if rec:
        console.print(f"[bold green]recommendation:[/] {rec} — {result.decision.reason}")
    else:
        console.print(f"[bold red]no candidate recommended:[/] {result.decision.reason}")


def _ci(lo: float, hi: float, pct: bool = False) -> str:
    return f"[{lo:.1%}, {hi:.1%}]" if pct else f"[{lo:.3f}, {hi:.3f}]"


def table(result: RunResult) -> Table:
    gate = result.config.quality_gate
    level = f"{gate.confidence:.0%}"
    t = Table(title=f"quantgate: candidates vs baseline ({gate.metric}; intervals {level})")
    for col in ("model", "bits", "weights MB", gate.metric, "recovery", "c→w / w→c", "flip rate",
                "KLD mean", "KLD p99", "top-1 agree", "perplexity", "gate"):
        t.add_column(col, justify="left" if col in ("model", "gate") else "right", no_wrap=col == "model")
    base = result.baseline
    t.add_row(base.name, "32", f"{base.weight_bytes / 1e6:.1f}", f"{base.metrics.metric(gate.metric):.4f}",
              "1.0000", "—", "—", "—", "—", "—", f"{base.metrics.perplexity:.2f}", "reference")
    verdicts = {v.name: v for v in result.decision.verdicts}
    for c in result.candidates:
        t.add_row(*_row(c, gate.metric, verdicts[c.name], c.name == result.decision.recommended))
    return t


def _row(m: ModelResult, metric: str, verdict: CandidateVerdict, recommended: bool) -> list[str]:
    c = m.comparison
    overall = c.tasks.get(OVERALL)
    recovery = f"{c.recovery:.4f} {_ci(*overall.recovery_ci)}" if overall else "—"
    flip = f"{c.flips.rate:.1%} {_ci(*overall.flip_rate_ci, pct=True)}" if overall else "—"
    mark = STATUS_STYLE["pass" if verdict.passed else "fail"] + (" ★" if recommended else "")
    return [
        m.name, str(m.candidate.quantized_bits or "—"), f"{m.weight_bytes / 1e6:.1f}", f"{m.metrics.metric(metric):.4f}",
        recovery, f"{c.flips.correct_to_wrong} / {c.flips.wrong_to_correct}", flip,
        f"{c.kld.mean:.4f}", f"{c.kld.quantile:.3f}", f"{c.top1_agreement:.1%}",
        f"{m.metrics.perplexity:.2f}", mark,
    ]


def economics_table(result: RunResult) -> Table:
    """Speed and memory on the serving engine; fake-quantized candidates have none of their own."""
    bandwidth = f"memory bandwidth {result.memory_bandwidth / 1e9:.1f} GB/s" if result.memory_bandwidth else ""
    t = Table(title=f"economics on the serving engine, batch 1 ({bandwidth})")
    econ = result.config.economics
    priced = econ.hardware_cost_per_hour is not None and econ.tokens_per_month is not None
    load = f"tok/s at batch {result.config.serving.max_batch_size}"
    cost_cols = ("$ / 1M tok", f"$ / month at {econ.tokens_per_month:,.0f} tok", "saving / month") if priced else ()
    for col in ("model", "engine", "artifact MB", "peak RSS MB", "prefill tok/s", "decode tok/s (request range)", "decode vs baseline",
                "latency p50 / p95 / p99 s", "roofline", load, *cost_cols):
        t.add_column(col, justify="left" if col in ("model", "engine") else "right", no_wrap=col == "model")
    base = result.baseline.economics
    for m in [result.baseline, *result.candidates]:
        c = m.economics and m.economics.cost
        measured = c and not m.economics.simulated  # a simulated model's cost would be the baseline's speed
        costs = [f"{c.per_million_tokens:.4f}", f"{c.monthly:,.2f}", f"{c.monthly_saving:,.2f}"] if measured else ["—"] * 3
        t.add_row(m.name, *_economics_cells(m, base), *(costs if priced else []))
    return t


def _economics_cells(m: ModelResult, base) -> list[str]:
    e = m.economics
    if e is None or e.simulated or e.throughput is None:
        what = "simulated: quality only" if e is not None and e.simulated else "speed not measured"
        return [e.engine if e else "—", "—", "—", "—", what, "—", "—", "—", "—"]
    tp, mb = e.throughput, lambda b: f"{b / 1e6:.1f}" if b else "—"
    ratio = f"{tp.decode_tokens_per_s / base.throughput.decode_tokens_per_s:.2f}x" if base and base.throughput else "—"
    lat = tp.latency_s
    return [e.engine, mb(e.artifact_bytes), mb(e.peak_rss_bytes), f"{tp.prefill_tokens_per_s:.0f}",
            decode_cell(tp.decode_tokens_per_s, tp.decode_range), ratio, f"{lat['p50']:.2f} / {lat['p95']:.2f} / {lat['p99']:.2f}",
            f"{e.roofline_fraction:.0%}" if e.roofline_fraction is not None else "—",
            f"{e.tokens_per_s_under_load:.1f}" + ("" if e.load[-1].batched else " (queued)") if e.load else "—"]


def ladder_line(result: RunResult) -> str:
    from quantgate.report.data import ladder

    marks = {"pass": "[green]✓[/]", "fail": "[red]✗ quality broke here[/]", "not measured": "[dim]not measured[/]"}
    return "ladder: " + " → ".join(f"{r['name']} {marks[r['status']]}" for r in ladder(result))


def noise_floor_line(result: RunResult) -> str:
    f = result.noise_floor
    if f is None:
        return "engine noise floor: not measured"
    return (f"engine noise floor ({f.engine} vs {f.reference}, {f.kld.size} tokens): KLD mean {f.kld.mean():.2e}, "
            f"p99 {np.quantile(f.kld, 0.99):.2e}, top-1 agreement {f.top1_agree.mean():.2%} — "
            "smaller differences than this are the engines', not the compression's")


def task_table(result: RunResult) -> Table:
    gate = result.config.quality_gate
    t = Table(title="per task: paired statistics (McNemar p: is the candidate worse?)")
    for col in ("candidate", "task", "items", "baseline", "candidate ", "recovery", "c→w / w→c", "McNemar p",
                "detectable drop (80% power)"):
        t.add_column(col, justify="left" if col in ("candidate", "task") else "right")
    for c in result.candidates:
        for name, tc in c.comparison.tasks.items():
            if not tc.labeled:
                t.add_row(c.name, name, str(tc.n), "—", f"{tc.cand:.1%} same output", f"{tc.recovery:.3f}",
                          f"{tc.flips.changed} changed", "—", "—")
                continue
            small = " [yellow](set too small for the floor)[/]" if too_small(tc, gate.task_floors.get(name, gate.min_acceptable)) else ""
            t.add_row(c.name, name, str(tc.n), f"{tc.base:.3f}", f"{tc.cand:.3f}",
                      f"{tc.recovery:.3f} {_ci(*tc.recovery_ci)}",
                      f"{tc.flips.correct_to_wrong} / {tc.flips.wrong_to_correct}", f"{tc.mcnemar_p:.3g}",
                      f"{tc.min_detectable_drop:.3f}{small}" if tc.min_detectable_drop < 1 else "none at this flip rate")
    return t


def too_small(tc: TaskComparison, floor: float) -> bool:
    """The set cannot detect (80% power) a drop as large as the floor allows, at the observed
    discordance. When fewer items flipped than the floor allows, the drop is bounded by the flips
    and no power is needed."""
    allowed = (1.0 - floor) * tc.base
    return tc.flips.rate >= allowed and tc.min_detectable_drop > allowed


def _rule(r: RuleResult) -> str:
    pct = "flip" in r.rule
    value = f"{r.value:.1%}" if pct else f"{r.value:.4f}"
    return f"{STATUS_STYLE[r.status]} {r.rule}: {value} {_ci(*r.interval, pct=pct)}"


def reasons(v: CandidateVerdict) -> str:
    head = f"[bold]{v.name}[/] {'holds the gate' if v.passed else 'does not hold the gate'}: "
    return head + "; ".join(_rule(r) for r in v.rules)


def silent_loss(c: ModelResult, min_acceptable: float) -> str | None:
    """What a gate on accuracy alone would ship without noticing, if anything (the same note the
    HTML and Markdown reports show)."""
    from quantgate.report.data import comparison_dict
    from quantgate.report.view import silent_loss as note

    return note(c.name, comparison_dict(c), min_acceptable)
