"""Report files: find and read a stored results.json, write report.html and summary.md beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantgate.errors import UserError
from quantgate.report.html import render_html
from quantgate.report.markdown import render_markdown

RESULTS = "results.json"
HTML = "report.html"
MARKDOWN = "summary.md"
REQUIRED = ("baseline", "candidates", "recommendation")
REQUIRED_CANDIDATE = ("name", "weight_bytes", "vs_baseline", "gate")


def write_reports(results: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """Write report.html and summary.md into run_dir; returns {"html": path, "markdown": path}."""
    paths = {"html": run_dir / HTML, "markdown": run_dir / MARKDOWN}
    paths["html"].write_text(render_html(results), encoding="utf-8")
    paths["markdown"].write_text(render_markdown(results, HTML), encoding="utf-8")
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


def load_results(run_dir: Path) -> dict[str, Any]:
    """results.json of a run directory, checked to be a quantgate results object."""
    path = run_dir / RESULTS
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None
    if not isinstance(results, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(results).__name__}")
    missing = [k for k in REQUIRED if k not in results]
    if missing:
        raise UserError(f"{path}: missing key '{missing[0]}' (not a quantgate results file?)")
    if not isinstance(results["candidates"], list):
        raise UserError(f"{path}: 'candidates' must be a list")
    for i, c in enumerate(results["candidates"]):
        gone = [k for k in REQUIRED_CANDIDATE if not isinstance(c, dict) or k not in c]
        if gone:
            raise UserError(f"{path}: candidates[{i}] lacks key '{gone[0]}'")
    return results
