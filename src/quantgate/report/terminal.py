"""A run's record in a terminal: the same view cells as the HTML and Markdown reports (candidates,
economics, load, per-task statistics, the gate's reasons), the recommendation, and what accuracy
alone would hide."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantgate.record import CandidateRecord, RunRecord
from quantgate.report import view

STATUS_STYLE = {"pass": "[green]pass[/]", "fail": "[red]fail[/]", "inconclusive": "[yellow]inconclusive[/]"}
ROW_STYLE = {"pass": "green", "fail": "red", "reference": "", "inconclusive": "yellow"}


def render(record: RunRecord, console: Console) -> None:
    ev = record.eval
    tasks = ", ".join(f"{t} {n}" for t, n in ev.tasks.items()) or "no items"
    console.print(f"[bold]model[/] {escape(view.model_line(record))}  [dim]({escape(record.model.source)})[/]")
    console.print(f"[bold]eval set[/] {escape(ev.eval_set)}: {ev.items} items ({tasks}); "
                  f"{ev.window_tokens} tokens for perplexity / KLD")
    if ev.duplicates:
        shown = ", ".join(f"{d.id} = {d.same_as}" for d in ev.duplicates[:5])
        console.print(f"[yellow]![/] {len(ev.duplicates)} duplicate items (same content): {escape(shown)}")
    level = record.quality_gate.confidence
    console.print(rich_table(view.candidates_table(record), f"quantgate: candidates vs baseline ({ev.metric}"
                             + (f"; intervals {level:.0%})" if level else ")"), status_col="gate"))
    _tables(console, record)
    console.print(view.noise_floor(record), soft_wrap=True)
    for note in record.notes:
        console.print(f"[yellow]![/] {escape(note)}")
    for f in record.failed_candidates:
        console.print(f"[red]✗[/] {escape(f.name)}: {escape(f.error)}")
    for c in record.candidates:
        console.print(reasons(c))
    for note in view.silent_losses(record).values():
        console.print(f"[yellow]![/] {escape(note)}")
    ladder = view.ladder_line(record)
    if ladder:
        console.print(ladder)
    rec = record.recommendation
    if rec.candidate:
        console.print(f"[bold green]recommendation:[/] {escape(rec.candidate)} — {escape(rec.reason)}")
    else:
        console.print(f"[bold red]no candidate recommended:[/] {escape(rec.reason)}")


def _tables(console: Console, record: RunRecord) -> None:
    """Economics (with its notes and assumptions), load and per-task tables, where the run has them."""
    econ = view.economics_table(record)
    if econ is not None:
        bandwidth = record.machine.memory_bandwidth_bytes_per_s
        where = f"; memory bandwidth {bandwidth / 1e9:.1f} GB/s" if bandwidth else ""
        console.print(rich_table(econ, f"economics on the serving engine (batch 1{where})"))
        if record.economics_config:
            console.print(f"[dim]{escape(view.economics_assumptions(record.economics_config))}[/]")
        for line in view.economics_notes(record):
            console.print(f"[yellow]![/] {escape(line)}")
    load = view.load_table(record)
    if load is not None:
        console.print(rich_table(load, "under load: the request mix at each batch size"))
    tasks = view.task_table(record)
    if tasks is not None:
        console.print(rich_table(tasks, "per task: paired statistics (McNemar p: is the candidate worse?)"))


def rich_table(t: view.Table, title: str, status_col: str | None = None) -> Table:
    """A view.Table as a rich Table; the cells of `status_col` are colored by the row's status."""
    out = Table(title=title)
    for h, numeric in zip(t.headers, t.numeric):
        out.add_column(h, justify="right" if numeric else "left", no_wrap=h == t.headers[0])
    for row in t.rows:
        out.add_row(*(_styled(cell, row.status) if h == status_col else escape(cell)
                      for h, cell in zip(t.headers, row.cells)))
    return out


def _styled(cell: str, status: str) -> str:
    style = ROW_STYLE.get(status, "")
    return f"[{style}]{escape(cell)}[/]" if style else escape(cell)


def reasons(c: CandidateRecord) -> str:
    """One line: whether the candidate holds the gate, and each rule with its value and interval."""
    head = f"[bold]{escape(c.name)}[/] {'holds the gate' if c.gate.passed else 'does not hold the gate'}: "
    return head + "; ".join(f"{STATUS_STYLE[r.status]} {escape(r.rule)}: {r.value} {r.interval}".rstrip()
                            for r in view.rules(c))
