"""Fuzzing the files quantgate reads back: results.json (report, drift, export), an export's
manifest (verify), the store (history, runs). Every case: exit 2, one line naming the file and
the key, no traceback; `report --out` writes nothing into the run directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fuzz_cli import quantgate, refused

V0 = Path(__file__).parent / "data" / "results_v0.json"  # a real results.json of the default model


def _doc() -> dict:
    return json.loads(V0.read_text())


def _without(*path: str | int):
    def make() -> bytes:
        doc = _doc()
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        return json.dumps(doc).encode()
    return make


def _with(value, *path: str | int):
    def make() -> bytes:
        doc = _doc()
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return json.dumps(doc).encode()
    return make


# (id, the results.json bytes, fragments)
CASES = [
    ("invalid-utf8", lambda: b'{"run_id": "\xff"}', ["results.json:1", "not UTF-8"]),
    ("utf16", lambda: json.dumps(_doc()).encode("utf-16"), ["results.json", "UTF-16"]),
    ("nul", lambda: b"{\x00}", ["results.json:1", "NUL byte"]),
    ("deep", lambda: b"[" * 100_000 + b"]" * 100_000, ["results.json:1", "nested too deeply"]),
    ("truncated", lambda: V0.read_bytes()[:5000], ["results.json:", "not valid JSON"]),
    ("list", lambda: b"[1, 2]", ["results.json", "expected a JSON object"]),
    ("empty-object", lambda: b"{}", ["results.json", "missing key 'baseline'"]),
    ("only-required", lambda: b'{"baseline": {}, "candidates": [], "recommendation": {}}', ["results.json", "missing key"]),
    ("no-candidates", _without("candidates"), ["results.json", "missing key 'candidates'"]),
    ("no-candidate-gate", _without("candidates", 0, "gate"), ["results.json", "candidates[0].gate"]),
    ("no-vs-baseline", _without("candidates", 0, "vs_baseline"), ["results.json", "candidates[0].vs_baseline"]),
    ("no-run-id", _without("run_id"), ["results.json", "missing key 'run_id'"]),
    ("bad-started", _with("yesterday", "started"), ["results.json", "started"]),
    ("candidates-string", _with("rtn", "candidates"), ["results.json", "candidates"]),
    ("schema-from-the-future", _with(99, "schema_version"), ["results.json", "schema_version 99", "newer"]),
    ("schema-string", _with("one", "schema_version"), ["results.json", "schema_version 'one'"]),
    ("weight-bytes-string", _with("many", "baseline", "weight_bytes"), ["results.json", "baseline.weight_bytes"]),
    ("surrogate", lambda: V0.read_bytes().replace(b'"run_id": "', b'"run_id": "\\ud800', 1), ["results.json", "lone surrogate"]),
]


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "results" / "run"
    path.mkdir(parents=True)
    return path


@pytest.mark.parametrize("command", ["report", "drift", "export"])
@pytest.mark.parametrize("name, make, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_results_file_is_one_line(run_dir, capfd, command, name, make, fragments):
    (run_dir / "results.json").write_bytes(make())
    inputs = run_dir.parent / "inputs.jsonl"
    inputs.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    args = {"report": ["report", str(run_dir)],
            "drift": ["drift", str(run_dir), "--inputs", str(inputs)],
            "export": ["export", str(run_dir), "--candidate", "rtn-w8", "--format", "hf"]}[command]
    refused(quantgate(capfd, *args), *fragments)
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]  # nothing half-written beside it


def test_drift_on_an_edited_results_file(run_dir, capfd):
    doc = _doc()
    doc["config"]["seed"] = 7  # edited after the run: its digest no longer matches
    (run_dir / "results.json").write_text(json.dumps(doc))
    inputs = run_dir.parent / "inputs.jsonl"
    inputs.write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    refused(quantgate(capfd, "export", str(run_dir), "--candidate", "rtn-w8", "--format", "hf"), "config_digest")


@pytest.mark.parametrize("inputs, fragments", [
    (b'{"query": "caf\xe9", "choices": ["a", "b"], "gold": 0}\n', ["inputs.jsonl:1", "not UTF-8"]),
    (b'{"prompt": "\\udfff"}\n', ["inputs.jsonl:1", "lone surrogate"]),
    (b"", ["inputs.jsonl", "no items"]),
], ids=["latin1", "surrogate", "empty"])
def test_drift_with_bad_inputs_is_one_line(run_dir, capfd, inputs, fragments):
    shutil.copy(V0, run_dir / "results.json")
    path = run_dir.parent / "inputs.jsonl"
    path.write_bytes(inputs)
    refused(quantgate(capfd, "drift", str(run_dir), "--inputs", str(path)), *fragments)


def test_report_out_writes_elsewhere_and_refuses_a_file(run_dir, capfd):
    shutil.copy(V0, run_dir / "results.json")
    out = run_dir.parent / "elsewhere"
    o = quantgate(capfd, "report", str(run_dir), "--out", str(out))
    assert o.code == 0, o.err
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "summary.md"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["results.json"]  # the run's own files untouched
    a_file = run_dir.parent / "a-file"
    a_file.write_text("x")
    refused(quantgate(capfd, "report", str(run_dir), "--out", str(a_file)), "a-file is a file")


def test_report_on_a_directory_without_results(tmp_path, capfd):
    refused(quantgate(capfd, "report", str(tmp_path)), str(tmp_path), "no results.json")


# -- an export's manifest (quantgate verify) --------------------------------------------------------

MANIFEST_CASES = [
    ("invalid-utf8", b'{"format": "\xff"}', ["quantgate-manifest.json:1", "not UTF-8"]),
    ("list", b"[]", ["quantgate-manifest.json", "expected a JSON object"]),
    ("empty-object", b"{}", ["quantgate-manifest.json", "missing key 'manifest_version'"]),
    ("no-candidate", None, ["quantgate-manifest.json", "missing key 'candidate'"]),
    ("files-not-object", b"files", ["quantgate-manifest.json", "files"]),
    ("deep", b"[" * 100_000 + b"]" * 100_000, ["quantgate-manifest.json:1", "nested too deeply"]),
]


def _manifest() -> dict:
    return {"manifest_version": 1, "candidate": "rtn-w8", "format": "hf", "scheme": {}, "files": {},
            "config": {}, "config_digest": "0" * 64, "model": {"sha256": "0" * 64}, "eval": {"sha256": None},
            "measured": {}}


@pytest.mark.parametrize("name, data, fragments", MANIFEST_CASES, ids=[c[0] for c in MANIFEST_CASES])
def test_bad_manifest_is_one_line(tmp_path, capfd, name, data, fragments):
    if data is None:
        doc = _manifest()
        del doc["candidate"]
        data = json.dumps(doc).encode()
    elif data == b"files":
        data = json.dumps({**_manifest(), "files": ["model.safetensors"]}).encode()
    (tmp_path / "quantgate-manifest.json").write_bytes(data)
    refused(quantgate(capfd, "verify", str(tmp_path)), *fragments)


def test_verify_refuses_a_file_the_manifest_does_not_list(tmp_path, capfd):
    (tmp_path / "quantgate-manifest.json").write_text(json.dumps(_manifest()))
    (tmp_path / "extra.bin").write_bytes(b"x")
    refused(quantgate(capfd, "verify", str(tmp_path)), "extra.bin", "not listed in the manifest")


# -- the store ------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["history", "runs"])
@pytest.mark.parametrize("what", ["garbage-file", "missing", "directory"])
def test_a_bad_store_is_one_line(tmp_path, capfd, command, what):
    store = tmp_path / "quantgate.db"
    if what == "garbage-file":
        store.write_bytes(b"this is not a database" * 100)
    elif what == "directory":
        store.mkdir()
    refused(quantgate(capfd, command, "--store", str(store)), "store")


def test_runs_lists_a_run_where_nothing_passed_and_history_as_json(tmp_path, capfd):
    """A recorded run whose candidate fails its gate is listed by `runs` (and as JSON)."""
    from quantgate.record import load_record
    from quantgate.store import open_store, record_run

    record = load_record(V0)
    failing = record.model_copy(update={"recommendation": record.recommendation.model_copy(update={"candidate": None}),
                                        "exit_code": 1})
    store = open_store(tmp_path / "quantgate.db")
    record_run(store, failing)
    store.dispose()
    o = quantgate(capfd, "runs", "--store", str(tmp_path / "quantgate.db"), "--json")
    assert o.code == 0, o.err
    (row,) = json.loads(o.out)
    assert row["run_id"] == record.run_id and row["recommended"] is None and row["exit_code"] == 1
    assert row["candidates"] == len(record.candidates)
    o = quantgate(capfd, "runs", "--store", str(tmp_path / "quantgate.db"))
    assert record.run_id in o.out and ("none passed" in o.out or "none recommended" in o.out)
    o = quantgate(capfd, "history", "--store", str(tmp_path / "quantgate.db"), "--json")
    (h,) = json.loads(o.out)
    assert h["run_id"] == record.run_id and h["outcome"] == "none passed"
