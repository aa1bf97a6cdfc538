"""The run record (quantgate.record): results.json of every schema version loads through the one
migration function, a record written now round-trips, bad files are one-line errors naming the key,
and the terminal renders the same view cells as the HTML and Markdown reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from report_data import synthetic_results
from rich.console import Console

import quantgate.record
from quantgate.config import RunConfig
from quantgate.errors import UserError
from quantgate.gate import RuleKind
from quantgate.record import SCHEMA_VERSION, RunRecord, dump_record, load_record, upgrade
from quantgate.report import terminal, view

DATA = Path(__file__).parent / "data"
V0 = DATA / "results_v0.json"  # the last results.json before the record: `quantgate run`, default model
OLDER = DATA / "run_payload.json"  # older still: no noise floor, economics, rule kinds, eval digest


def test_the_last_version_0_file_loads():
    record = load_record(V0)
    assert record.schema_version == SCHEMA_VERSION == 2
    assert record.model.precision == "fp32" and record.full_precision is None  # every baseline was float32
    assert record.run_id == "20261204T062524Z-4510db6d" and record.recommended == "rtn-w8"
    assert [c.name for c in record.candidates] == ["rtn-w8", "rtn-w4-g64"]
    w4 = record.candidate("rtn-w4-g64")
    assert (w4.method, w4.bits, w4.group_size, w4.symmetric) == ("rtn", 4, 64, False)
    assert w4.vs_baseline.overall.min_detectable_drop is None  # inf, written as null
    assert w4.gate.rules[0].kind is RuleKind.RECOVERY and w4.gate.rules[0].status == "inconclusive"
    assert len(w4.flipped_items) == 5 and w4.vs_baseline.kld_hist is not None
    assert record.quality_gate.min_acceptable == 0.94 and record.seed == 0  # lifted out of the config
    assert record.noise_floor.tokens == 510 and record.economics_config.priced is False


def test_an_older_file_loads_with_its_missing_parts_empty():
    record = load_record(OLDER)
    assert record.noise_floor is None and record.economics_config is None and record.eval.sha256 is None
    assert record.baseline.economics is None and record.baseline.items_scored is None
    assert record.failed_candidates == () and record.strategy == "all" and record.ladder is None
    assert all(r.kind is RuleKind.RECOVERY for c in record.candidates for r in c.gate.rules)


def test_rule_kinds_of_version_0_files_come_from_the_rule_text():
    record = load_record(synthetic_results())
    kinds = [r.kind for r in record.candidates[0].gate.rules]
    assert kinds == [RuleKind.RECOVERY, RuleKind.FLIP_RATE]
    data = synthetic_results()
    rules = data["candidates"][0]["gate"]["rules"]
    for text in ("KLD mean <= 0.1", "KLD p99 <= 1", "default-mc recovery >= 0.9", "default-mc accuracy >= 0.5",
                 "prompts agreement with baseline >= 0.8"):
        rules.append({**rules[0], "rule": text})
    kinds = [r.kind for r in load_record(data).candidates[0].gate.rules[2:]]
    assert kinds == [RuleKind.KLD_MEAN, RuleKind.KLD_P99, RuleKind.TASK_RECOVERY, RuleKind.ABSOLUTE,
                     RuleKind.AGREEMENT]


def test_a_version_1_file_loads_with_a_float32_baseline():
    """Version 1 is version 2 without the baseline's precision and the full-precision row."""
    data = json.loads(dump_record(load_record(V0)))
    del data["full_precision"], data["model"]["precision"]
    record = load_record({**data, "schema_version": 1})
    assert record.model.precision == "fp32" and record.full_precision is None
    assert record == load_record(V0)
    assert view.model_line(record).endswith("· baseline in fp32")


def test_a_record_written_now_is_version_2_and_round_trips(tmp_path):
    record = load_record(V0)
    text = dump_record(record)
    written = json.loads(text)
    assert written["schema_version"] == 2
    path = tmp_path / "results.json"
    path.write_text(text, encoding="utf-8")
    assert load_record(path) == record
    assert dump_record(load_record(path)) == text


def test_numbers_that_are_not_finite_become_null():
    data = synthetic_results()
    data["candidates"][0]["vs_baseline"]["kld_mean"] = math.nan
    data["candidates"][0]["perplexity"] = math.inf
    record = load_record(data)
    assert record.candidates[0].vs_baseline.kld_mean is None and record.candidates[0].perplexity is None
    written = json.loads(dump_record(record))
    assert written["candidates"][0]["vs_baseline"]["kld_mean"] is None
    assert "NaN" not in dump_record(record) and "Infinity" not in dump_record(record)


@pytest.mark.parametrize("where, message", [
    (("candidates", 1, "vs_baseline", "kld_mean"), "missing key 'candidates[1].vs_baseline.kld_mean'"),
    (("model", "sha256"), "missing key 'model.sha256'"),
    (("recommendation",), "missing key 'recommendation' (not a quantgate results file?)"),
])
def test_a_missing_key_is_one_line_naming_the_file_and_the_key(tmp_path, where, message):
    data = json.loads(V0.read_text())
    parent = data
    for key in where[:-1]:
        parent = parent[key]
    del parent[where[-1]]
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        load_record(path)
    assert str(e.value) == f"{path}: {message}"


def test_malformed_values_and_newer_schemas_are_refused(tmp_path):
    data = load_record(V0).model_dump(mode="json")
    data["candidates"][0]["gate"]["rules"][0]["kind"] = "vibes"
    with pytest.raises(UserError, match=r"results: key 'candidates\[0\]\.gate\.rules\[0\]\.kind'"):
        load_record(data)
    data = load_record(V0).model_dump(mode="json")
    data["extra_part"] = 1
    with pytest.raises(UserError, match="unknown key 'extra_part'"):
        load_record(data)
    with pytest.raises(UserError, match="schema_version 3: written by a newer quantgate"):
        load_record({**data, "schema_version": 3})
    path = tmp_path / "results.json"
    path.write_text("[1]")
    with pytest.raises(UserError, match="expected a JSON object"):
        load_record(path)


def test_the_config_goes_through_config_upgrade_and_its_digest_is_checked_as_stored(monkeypatch):
    def upgrade_config(config: dict) -> dict:
        return {**config, "upgraded": True}

    monkeypatch.setattr(quantgate.record, "upgrade_config", upgrade_config)
    record = load_record(V0, check_config=True)  # the digest is of the config as stored
    assert record.config["upgraded"] is True
    assert upgrade(json.loads(V0.read_text()))["config"]["upgraded"] is True
    edited = json.loads(V0.read_text())
    edited["config"]["seed"] = 7
    with pytest.raises(UserError, match="does not match its config_digest"):
        load_record(edited, check_config=True)


def terminal_text(record: RunRecord) -> str:
    console = Console(record=True, width=250)
    terminal.render(record, console)
    return console.export_text()


def test_the_terminal_shows_the_view_cells_the_reports_show():
    record = load_record(V0)
    text = terminal_text(record)
    table = view.candidates_table(record)
    assert "scheme" in table.headers and " bits " not in text
    for row in table.rows:
        line = next(x for x in text.splitlines() if x.startswith(f"│ {row.cells[0]} "))
        assert [c.strip() for c in line.strip("│").split("│")] == list(row.cells)
    assert "0.00267" in text and "0.0027 " not in text  # KLD in significant digits, not 4 decimals
    assert view.noise_floor(record) in text.replace("\n", " ")
    assert "recommendation: rtn-w8" in text


SMALL_RUN = (
    "candidates:\n  - {method: rtn, bits: 8}\n  - {method: rtn, bits: 4, group_size: 64}\n"
    "evaluation: {limit: 30, cloze_items: 30, ppl_windows: 2}\n"
    "economics: {measure: false}\n"
    "quality_gate: {min_items: 10}\n"
)


@pytest.mark.slow
def test_a_real_run_writes_a_version_2_record(tmp_path):
    """`quantgate run` (the config results_v0.json was made with) writes a results.json that
    loads as the same record it was dumped from, the same numbers as the version-0 file."""
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_RUN)
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "run", str(config), "--results-dir",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    (path,) = (tmp_path / "out").glob("*/results.json")
    assert json.loads(path.read_text())["schema_version"] == 2
    record, old = load_record(path), load_record(V0)
    assert dump_record(load_record(json.loads(dump_record(record)))) == dump_record(record)
    assert [c.vs_baseline.flips for c in record.candidates] == [c.vs_baseline.flips for c in old.candidates]
    # the same settings: the old file's config, upgraded (new keys at their defaults), is the run's
    # (the digests differ: a digest covers every key, and the schema has grown since)
    assert record.eval.sha256 == old.eval.sha256
    assert RunConfig.model_validate(record.config) == RunConfig.model_validate(old.config)
