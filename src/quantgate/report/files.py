"""Report files: find and read a stored results.json, write report.html and summary.md beside it."""

from __future__ import annotations

from pathlib import Path

from quantgate.errors import UserError
from quantgate.record import RunRecord, load_record
from quantgate.report.html import render_html
from quantgate.report.markdown import render_markdown

RESULTS = "results.json"
ITEMS = "items.jsonl"  # every item's outcome for every model (record.ItemRecord per line)
HTML = "report.html"
MARKDOWN = "summary.md"


def write_reports(record: RunRecord, run_dir: Path) -> dict[str, Path]:
    """Write report.html and summary.md into run_dir; returns {"html": path, "markdown": path}."""
    paths = {"html": run_dir / HTML, "markdown": run_dir / MARKDOWN}
    paths["html"].write_text(render_html(record), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(record, HTML), encoding="utf-8")
    return paths


def find_run(path: Path) -> Path:
    """The run directory `path` names: itself when it holds results.json, else its newest run
    directory (run ids start with the UTC start time, so the greatest name is the newest)."""
    if not path.is_dir():
        raise UserError(f"{path}: {'not a directory' if path.exists() else 'no such directory'} "
                        f"(give a run directory holding {RESULTS}, or the results root)")
    if (path / RESULTS).is_file():
        return path
    runs = sorted(p.parent for p in path.glob(f"*/{RESULTS}"))
    if not runs:
        raise UserError(f"{path}: no {RESULTS} here or in a run directory below it")
    return runs[-1]


def load_results(run_dir: Path, *, check_config: bool = False) -> RunRecord:
    """results.json of a run directory as its record (any schema version; see record.load_record)."""
    return load_record(run_dir / RESULTS, check_config=check_config)
