"""The results in a terminal: candidates table, per-task statistics, the gate's reasons, the
recommendation, and what accuracy alone would hide."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from quantgate.evals.metrics import OVERALL, TaskComparison
from quantgate.gate import CandidateVerdict, RuleResult
from quantgate.run import ModelResult, RunResult

# A candidate whose accuracy recovery holds but which is beyond either line gets a
# "silent loss" callout below the table.
FLIP_CALLOUT = 0.05
TOP1_CALLOUT = 0.90
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
    if len(suite.tasks) > 0 and result.candidates and result.candidates[0].comparison.tasks:
        console.print(task_table(result))
    verdicts = {v.name: v for v in result.decision.verdicts}
    for c in result.candidates:
        console.print(reasons(verdicts[c.name]))
    for c in result.candidates:
        note = silent_loss(c, result.config.quality_gate.min_acceptable)
        if note:
            console.print(f"[yellow]![/] {note}")
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
        m.name, str(m.candidate.bits), f"{m.weight_bytes / 1e6:.1f}", f"{m.metrics.metric(metric):.4f}",
        recovery, f"{c.flips.correct_to_wrong} / {c.flips.wrong_to_correct}", flip,
        f"{c.kld.mean:.4f}", f"{c.kld.quantile:.3f}", f"{c.top1_agreement:.1%}",
        f"{m.metrics.perplexity:.2f}", mark,
    ]


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
    """What a gate on accuracy alone would ship without noticing, if anything."""
    cmp = c.comparison
    if cmp.recovery < min_acceptable:
        return None
    if cmp.flips.rate < FLIP_CALLOUT and cmp.top1_agreement >= TOP1_CALLOUT:
        return None
    return (
        f"{c.name} keeps {cmp.recovery:.1%} of the baseline's accuracy, yet {cmp.flips.rate:.1%} of answers "
        f"flipped ({cmp.flips.correct_to_wrong} correct→wrong, {cmp.flips.wrong_to_correct} wrong→correct) "
        f"and it agrees with the baseline's top-1 next token only {cmp.top1_agreement:.1%} of the time "
        f"(KLD mean {cmp.kld.mean:.3f}): a gate on accuracy alone would ship it."
    )
