"""The Markdown summary (CI job summary): verdict, a well-formed candidates table, the gate's rules,
the silent-loss callouts, economics when measured, and the engine noise floor."""

from __future__ import annotations

import re

from report_data import synthetic_record, synthetic_results

from quantgate.record import load_record

from quantgate.report import view
from quantgate.report.files import write_reports
from quantgate.report.markdown import render_markdown


def tables(md: str) -> list[list[str]]:
    """The Markdown tables: each a list of its lines."""
    out, current = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            out.append(current)
            current = []
    return out


def columns(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line)) - 1  # unescaped pipes delimit the cells


def test_summary_has_verdict_table_rules_and_noise_floor():
    results = synthetic_record()
    md = render_markdown(results, "report.html")
    rec = results.recommended
    assert md.startswith(f"## ✅ quantgate: Recommended: {rec}")
    cand_table, econ_table = tables(md)
    assert len(cand_table) == 2 + 1 + len(results.candidates)  # header, alignment, baseline, candidates
    assert len({columns(line) for line in cand_table}) == 1  # every row as wide as the header
    assert f"| **{rec}** |" in md
    for c in results.candidates:
        assert f"- **{c.name}** {'holds' if c.gate.passed else 'does not hold'} the gate" in md
    for note in view.silent_losses(results).values():
        assert note in md
    assert len({columns(line) for line in econ_table}) == 1
    assert view.SIMULATED in md
    assert f"the baseline on {results.noise_floor.engine} vs on {results.noise_floor.reference}" in md
    assert "[report.html](report.html)" in md


def test_summary_without_optional_parts_and_without_a_recommendation():
    results = synthetic_results(economics=False, noise_floor=False, kld_hist=False)
    results["recommendation"] = {"candidate": None, "reason": "no candidate holds every rule | see below"}
    md = render_markdown(load_record(results))
    assert md.startswith("## ❌ quantgate: No candidate recommended — no candidate holds every rule \\| see below")
    assert "### Economics" not in md and len(tables(md)) == 1
    assert "Engine noise floor: not measured" in md
    assert "report.html" not in md


def test_write_reports_writes_both_files_beside_each_other(tmp_path):
    results = synthetic_record()
    paths = write_reports(results, tmp_path)
    assert set(paths) == {"html", "markdown"}
    assert paths["html"].parent == paths["markdown"].parent == tmp_path
    assert paths["markdown"].read_text(encoding="utf-8") == render_markdown(results, paths["html"].name)
    assert results.run_id in paths["html"].read_text(encoding="utf-8")


def test_reports_without_a_price_say_costs_were_not_computed(tmp_path):
    results = synthetic_results()
    results["economics_config"] = {**results["economics_config"], "hardware_cost_per_hour": None,
                                   "tokens_per_month": None}
    results.pop("cost", None)
    results["baseline"].pop("cost", None)
    for m in [results["baseline"], *results["candidates"]]:
        if m.get("economics"):
            m["economics"]["cost"] = None
    paths = write_reports(load_record(results), tmp_path)
    assert "costs not computed" in paths["html"].read_text()
    assert paths["markdown"].read_text()
