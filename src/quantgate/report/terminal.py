"""The results table, the recommendation and what accuracy alone would hide, in a terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from quantgate.run import ModelResult, RunResult

# A passing candidate beyond either line gets a "silent loss" callout below the table.
FLIP_CALLOUT = 0.05
TOP1_CALLOUT = 0.90


def render(result: RunResult, console: Console) -> None:
    cfg = result.config
    gate = cfg.quality_gate
    suite = result.prepared.suite
    tasks = ", ".join(f"{t} {n}" for t, n in suite.tasks.items())
    console.print(f"[bold]model[/] {result.model_description}  [dim]({result.model_source})[/]")
    console.print(
        f"[bold]eval set[/] {suite.name}: {len(suite.items)} items ({tasks}); "
        f"{result.prepared.n_window_tokens} held-out tokens for perplexity / KLD"
    )
    console.print(table(result))
    verdicts = {v.name: v for v in result.decision.verdicts}
    for c in result.candidates:
        if verdicts[c.name].passed:
            note = silent_loss(c)
            if note:
                console.print(f"[yellow]![/] {note}")
    rec = result.decision.recommended
    floor = f"{gate.metric} recovery >= {gate.min_acceptable}"
    if rec:
        console.print(f"[bold green]recommendation:[/] {rec} — {result.decision.reason} ({floor})")
    else:
        console.print(f"[bold red]no candidate recommended:[/] {result.decision.reason} ({floor})")


def table(result: RunResult) -> Table:
    t = Table(title=f"quantgate: candidates vs baseline ({result.config.quality_gate.metric})")
    for col in ("model", "bits", "weights MB", "accuracy", "recovery", "c→w / w→c",
                "flip rate", "KLD mean", "KLD p99", "top-1 agree", "perplexity", "gate"):
        t.add_column(col, justify="left" if col in ("model", "gate") else "right", no_wrap=col == "model")
    metric = result.config.quality_gate.metric
    t.add_row(*_row(result.baseline, metric, None))
    verdicts = {v.name: v for v in result.decision.verdicts}
    for c in result.candidates:
        passed = verdicts[c.name].passed
        mark = "[green]pass[/]" if passed else "[red]fail[/]"
        if c.name == result.decision.recommended:
            mark += " ★"
        t.add_row(*_row(c, metric, mark))
    return t


def _row(m: ModelResult, metric: str, gate: str | None) -> list[str]:
    cells = [m.name, str(m.candidate.bits) if m.candidate else "32", f"{m.weight_bytes / 1e6:.1f}",
             f"{m.metrics.metric(metric):.4f}"]
    c = m.comparison
    if c is None:
        return cells + ["1.0000", "—", "—", "—", "—", "—", f"{m.metrics.perplexity:.2f}", "reference"]
    return cells + [
        f"{c.recovery:.4f}",
        f"{c.flips.correct_to_wrong} / {c.flips.wrong_to_correct}",
        f"{c.flips.rate:.1%}",
        f"{c.kld_mean:.4f}",
        f"{c.kld_p99:.3f}",
        f"{c.top1_agreement:.1%}",
        f"{m.metrics.perplexity:.2f}",
        gate or "",
    ]


def silent_loss(c: ModelResult) -> str | None:
    """What a gate on accuracy alone would ship without noticing, if anything."""
    cmp = c.comparison
    if cmp.flips.rate < FLIP_CALLOUT and cmp.top1_agreement >= TOP1_CALLOUT:
        return None
    return (
        f"{c.name} keeps {cmp.recovery:.1%} of the baseline's accuracy, yet {cmp.flips.rate:.1%} of answers "
        f"flipped ({cmp.flips.correct_to_wrong} correct→wrong, {cmp.flips.wrong_to_correct} wrong→correct) "
        f"and it agrees with the baseline's top-1 next token only {cmp.top1_agreement:.1%} of the time "
        f"(KLD mean {cmp.kld_mean:.3f}): accuracy alone hides this."
    )
