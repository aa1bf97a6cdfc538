"""`quantgate history` in a terminal: runs and drift checks over time, one row each."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantgate.report import view
from quantgate.store import HistoryRow

OUTCOME_STYLE = {
    "recommended": "[green]recommended[/]", "none passed": "[red]none passed[/]",
    "pass": "[green]drift: pass[/]", "fail": "[red]drift: fail[/]",
    "inconclusive": "[yellow]drift: inconclusive[/]", "error": "[red]drift: error[/]",
}


def history_table(rows: Sequence[HistoryRow]) -> Table:
    """Oldest first: when (UTC), what (run or drift check), run id, model, the candidate (a run's
    recommended one, or the one checked), its recovery, flip rate and mean KLD (formatted as the
    reports format them: report/view.py), the outcome."""
    t = Table(title="quantgate history (runs and drift checks)")
    for col in ("date (UTC)", "run id", "model", "candidate", "recovery", "flip rate", "KLD mean", "outcome"):
        t.add_column(col, justify="right" if col in ("recovery", "flip rate", "KLD mean") else "left")
    for h in rows:
        t.add_row(
            f"{h.when:%Y-%m-%d %H:%M}", h.run_id or "—", f"{h.model_base} [dim]{h.model_sha256[:8]}[/]",
            h.candidate or "—", view.num(h.recovery), view.pct(h.flip_rate), view.sig(h.kld_mean),
            OUTCOME_STYLE.get(h.outcome, escape(h.outcome)) + (f" [dim]{escape(h.detail)}[/]" if h.detail else ""),
        )
    return t


def render_history(rows: Sequence[HistoryRow], console: Console, model: str | None = None) -> None:
    if not rows:
        console.print(f"no runs recorded{f' for model {model}' if model else ''}")
        return
    console.print(history_table(rows))
