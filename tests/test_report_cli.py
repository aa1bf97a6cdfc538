"""`quantgate report DIR`: rebuild report.html and summary.md from a stored results.json, through
the real command line; bad input is one line on stderr and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from report_data import synthetic_results
from test_cli_errors import assert_one_line_error, quantgate

V0 = Path(__file__).parent / "data" / "results_v0.json"  # written by `quantgate run` before the typed record


def store_run(root: Path, run_id: str) -> Path:
    results = synthetic_results()
    results["run_id"] = run_id
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return run_dir


def test_report_from_a_run_directory(tmp_path):
    run_dir = store_run(tmp_path, "20260101T000000Z-aaaaaaaa")
    proc = quantgate("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"report: {run_dir / 'report.html'}", f"summary: {run_dir / 'summary.md'}"]
    assert "20260101T000000Z-aaaaaaaa" in (run_dir / "report.html").read_text(encoding="utf-8")
    assert (run_dir / "summary.md").read_text(encoding="utf-8").startswith("## ")


def test_report_from_the_results_root_takes_the_newest_run(tmp_path):
    old = store_run(tmp_path, "20260101T000000Z-aaaaaaaa")
    new = store_run(tmp_path, "20260301T120000Z-bbbbbbbb")
    (tmp_path / "engine-logs").mkdir()  # other directories without results are ignored
    proc = quantgate("report", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (new / "report.html").is_file() and not (old / "report.html").exists()


def test_missing_directory(tmp_path):
    assert_one_line_error(quantgate("report", str(tmp_path / "nope")), str(tmp_path / "nope"), "no such directory")


def test_directory_without_results(tmp_path):
    assert_one_line_error(quantgate("report", str(tmp_path)), str(tmp_path), "no results.json")


def test_malformed_json_names_file_and_line(tmp_path):
    run_dir = store_run(tmp_path, "20260101T000000Z-aaaaaaaa")
    (run_dir / "results.json").write_text('{\n  "baseline": {},\n  "candidates": [,]\n}\n', encoding="utf-8")
    assert_one_line_error(quantgate("report", str(run_dir)), f"{run_dir / 'results.json'}:3", "not valid JSON")


def test_json_that_is_not_a_results_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"baseline": {}, "candidates": []}', encoding="utf-8")
    assert_one_line_error(quantgate("report", str(run_dir)), "missing key 'recommendation'")
    (run_dir / "results.json").write_text('[1, 2]', encoding="utf-8")
    assert_one_line_error(quantgate("report", str(run_dir)), "expected a JSON object")
    results = synthetic_results()
    del results["candidates"][1]["gate"]
    (run_dir / "results.json").write_text(json.dumps(results), encoding="utf-8")
    assert_one_line_error(quantgate("report", str(run_dir)), "missing key 'candidates[1].gate'")
    results = synthetic_results()
    results["schema_version"] = 99
    (run_dir / "results.json").write_text(json.dumps(results), encoding="utf-8")
    assert_one_line_error(quantgate("report", str(run_dir)), "schema_version 99", "newer quantgate")


def test_report_from_a_real_version_0_results_file(tmp_path):
    run_dir = tmp_path / "20261204T062524Z-4510db6d"
    run_dir.mkdir()
    shutil.copy(V0, run_dir / "results.json")
    proc = quantgate("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    html, md = (run_dir / "report.html").read_text(encoding="utf-8"), (run_dir / "summary.md").read_text("utf-8")
    assert "20261204T062524Z-4510db6d" in html and "rtn-w4-g64" in html
    assert md.startswith("## ✅ quantgate: Recommended: rtn-w8")
    assert "| 0.00267 | 0.00955 |" in md  # KLD in significant digits, as the terminal shows it
