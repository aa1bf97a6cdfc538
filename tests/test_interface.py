"""The interface people expect (issue 21): flags that write the same config as YAML, the candidate
shorthand read by each method's own config class, `quantgate check`, --version/-h/--json/--quiet,
line progress in logs, the Python API with its typed record, items.jsonl. Fast: the tiny Llama,
or no model at all; the real default model's CLI run is in test_cli_run.py (slow)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from conftest import single_thread
from fuzz_cli import quantgate

from quantgate.config import RunConfig, flag_overrides, load_config
from quantgate.methods import registry
from quantgate.methods.registry import METHODS, MethodSpec, RtnConfig, parse_candidate, shorthand

# -- the candidate shorthand -----------------------------------------------------------------------


@pytest.mark.parametrize("text, label", [
    ("rtn:8", "rtn-w8"), ("rtn:w4:g64", "rtn-w4-g64"), ("rtn:4:g64:sym", "rtn-w4-g64-sym"),
    ("gptq:4:g64", "gptq-w4-g64"), ("gptq:4:g128:actorder", "gptq-w4-g128-actorder"),
    ("gptq:4:damp=0.05", "gptq-w4-damp0.05"), ("awq:4:g128:grid=10", "awq-w4-g128-grid10"),
    ("smoothquant:0.8", "smoothquant-w8a8-a0.8"), ("w8a8", "w8a8-naive"),
    ("gguf:Q4_K_M:imatrix", "gguf-Q4_K_M-imatrix"), ("prune:wanda:0.5", "wanda-s50"),
    ("prune:magnitude:0.25:mlp", "magnitude-mlp25"), ("rtn:4:g32:accuracy_level=4", "rtn-w4-g32-acc4"),
])
def test_shorthand_is_the_yaml_candidate(text, label):
    assert parse_candidate(shorthand(text)).label == label


def test_a_new_method_gets_a_shorthand_from_its_own_config_class(monkeypatch):
    """shorthand() names no method: a registry entry whose config declares POSITIONAL/WORDS is
    written on the command line with no other change."""

    class TernaryConfig(registry.MethodConfig):
        method: Literal["ternary"] = "ternary"
        scale: float = 1.0
        per_row: bool = False
        POSITIONAL: ClassVar[tuple[str, ...]] = ("scale",)
        WORDS: ClassVar[dict] = {"rows": ("per_row", True)}

        def auto_label(self) -> str:
            return f"ternary-{self.scale:g}"

    monkeypatch.setitem(METHODS, "ternary", MethodSpec(TernaryConfig, None))
    assert shorthand("ternary:0.5:rows") == {"method": "ternary", "scale": 0.5, "per_row": True}
    with pytest.raises(ValueError, match="'g64' is not a setting of method ternary.*bare values: scale"):
        shorthand("ternary:0.5:g64")


def test_flags_override_the_file_and_void_the_other_form(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("quantization: {method: rtn, bits: 4, verified_against: baseline}\n"
                    f"quality_gate: {{eval_sets: [{{path: {tmp_path / 'a.jsonl'}}}], min_acceptable: 0.9}}\n"
                    "evaluation: {limit: 50, cloze_items: 9}\nseed: 3\n")
    (tmp_path / "b.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    flags = {"--candidate": ["rtn:8", "gptq:4:g64"], "--eval-set": str(tmp_path / "b.jsonl"), "--limit": 20,
             "--seed": 5, "--model": "smollm2-135m-instruct"}
    cfg = load_config(path, flag_overrides(flags, ["evaluation.cloze_items=4"]))
    assert cfg.quantization is None and [c.label for c in cfg.candidates] == ["rtn-w8", "gptq-w4-g64"]
    assert cfg.quality_gate.eval_sets is None and cfg.quality_gate.eval_set == str(tmp_path / "b.jsonl")
    assert cfg.quality_gate.min_acceptable == 0.9  # keys no flag set are the file's
    assert (cfg.evaluation.limit, cfg.evaluation.cloze_items, cfg.seed) == (20, 4, 5)
    # the same config written as YAML is the same RunConfig: one model, two ways to write it
    same = tmp_path / "same.yaml"
    same.write_text(json.dumps(cfg.model_dump(mode="json")))
    assert load_config(same).digest() == cfg.digest()


def test_flags_alone_are_a_config_and_nothing_is_the_packaged_run():
    alone = load_config(None, flag_overrides({"--candidate": ["rtn:8"]}))
    assert alone.serving.engine == RunConfig().serving.engine  # config.py's defaults, not the demo's
    assert [c.label for c in alone.resolved_candidates] == ["rtn-w8"]
    assert load_config(None).serving.engine == "onnxruntime"  # the packaged default run (make demo)


# -- the command line without a model ----------------------------------------------------------------


def test_version_and_short_help(capfd):
    from quantgate import __version__

    o = quantgate(capfd, "--version")
    assert o.code == 0 and o.out.strip() == f"quantgate {__version__}"
    o = quantgate(capfd, "-h")
    assert o.code == 0 and "check" in o.out and "runs" in o.out
    o = quantgate(capfd, "run", "-h")
    assert o.code == 0 and "--candidate" in o.out and "--json" in o.out


def test_check_plans_without_running_user_code(tmp_path, capfd, monkeypatch):
    """check validates and plans; a scorer is named with a warning and its module is not imported."""
    (tmp_path / "myscorer.py").write_text("open('IMPORTED', 'w').write('ran')\n"
                                          "def score(prediction, item):\n    return 1.0\n")
    (tmp_path / "qa.jsonl").write_text('{"context": "Q: 1 + 1?\\nA:", "answer": "2"}\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    o = quantgate(capfd, "check", "--eval-set", "none", "--set",
                  "quality_gate={eval_sets: [{path: qa.jsonl, scorer: 'myscorer:score', max_new_tokens: 8}]}",
                  "--candidate", "rtn:8", "--json")
    assert o.code == 0, o.err
    plan = json.loads(o.out)
    assert not (tmp_path / "IMPORTED").exists()  # nothing of the user's ran
    assert any("imports and runs your code" in w and "myscorer.py" in w for w in plan["warnings"])
    assert plan["tasks"] == {"qa": 1} and plan["generated_per_model"] == 8
    assert [c["name"] for c in plan["candidates"]] == ["rtn-w8"] and plan["estimated_seconds"] > 0
    o = quantgate(capfd, "check", "--eval-set", "none", "--candidate", "rtn:8")
    assert o.code == 0 and "load" in o.out and "torch" in o.out and "total" in o.out


def test_import_quantgate_imports_nothing_else():
    code = ("import sys, quantgate; heavy = [m for m in ('torch', 'transformers', 'numpy', 'pydantic', 'yaml', "
            "'quantgate.config', 'quantgate.run') if m in sys.modules]; print(heavy)\n"
            "from quantgate.run import execute; import quantgate.run as pipeline\n"
            "print(callable(quantgate.run), quantgate.run.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True quantgate"  # still the API function after the pipeline module is imported


def test_line_progress_when_not_a_terminal():
    from quantgate.report.progress import Feedback

    stream = io.StringIO()
    with Feedback(stream=stream) as feedback:
        step = feedback("baseline", 8)
        for _ in range(8):
            step(1)
        feedback.say("a note")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "quantgate: baseline: started (8 steps)"
    assert [ln.split(" (")[0] for ln in lines[1:5]] == [f"quantgate: baseline: {n}/8" for n in (2, 4, 6)] + [
        "quantgate: baseline: 8/8 done"]
    assert lines[-1] == "quantgate: a note" and "\r" not in stream.getvalue()
    quiet = io.StringIO()
    with Feedback(quiet=True, stream=quiet) as feedback:
        feedback("x", 2)(2)
        feedback.say("y")
    assert quiet.getvalue() == ""


# -- the Python API and the CLI on the tiny model --------------------------------------------------------


def tiny_config(tiny_dir: Path) -> dict:
    return {"model": {"base": str(tiny_dir)}, "candidates": [{"method": "rtn", "bits": 8},
                                                             {"method": "rtn", "bits": 2, "group_size": 32}],
            "evaluation": {"limit": 6, "cloze_items": 6, "ppl_windows": 2, "window_tokens": 32},
            "economics": {"measure": False}, "quality_gate": {"min_items": 4}}


@pytest.fixture(scope="module")
def api_run(tiny_dir, tmp_path_factory):
    """quantgate.run on the tiny model: (its record, its results root)."""
    import quantgate

    root = tmp_path_factory.mktemp("api") / "results"
    with single_thread():
        return quantgate.run(tiny_config(tiny_dir), results_dir=root), root


def test_python_api_returns_the_typed_record_and_writes_the_run(api_run):
    from quantgate.record import RunRecord, load_record

    record, root = api_run
    assert isinstance(record, RunRecord)
    assert [c.name for c in record.candidates] == ["rtn-w8", "rtn-w2-g32"]
    run_dir = root / record.run_id
    assert load_record(run_dir / "results.json") == record
    items = [json.loads(line) for line in (run_dir / "items.jsonl").read_text().splitlines()]
    assert len(items) == record.eval.items == 12
    assert all(set(i["models"]) == {"baseline", "rtn-w8", "rtn-w2-g32"} for i in items)
    first = items[0]["models"]["baseline"]
    assert len(first["option_ll"]) >= 2 and first["correct"] in (True, False)
    # every flipped item of the record is an item whose correctness differs in items.jsonl
    flipped = {(f.task, f.id) for c in record.candidates for f in c.flipped_items if f.direction != "output changed"}
    differ = {(i["task"], i["id"]) for i in items for name in ("rtn-w8", "rtn-w2-g32")
              if i["models"][name]["correct"] != i["models"]["baseline"]["correct"]}
    assert flipped == differ
    assert sorted(p.name for p in run_dir.iterdir()) == ["items.jsonl", "report.html", "results.json", "summary.md"]


def test_cli_run_json_summary_from_flags_and_a_file(tiny_dir, tmp_path, capfd):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(tiny_config(tiny_dir)))
    with single_thread():
        o = quantgate(capfd, "run", str(config), "--candidate", "rtn:4:g32", "--limit", "4", "--output",
                      str(tmp_path / "out"), "--json")
    assert o.code in (0, 1), o.err
    summary = json.loads(o.out)
    assert [c["name"] for c in summary["candidates"]] == ["rtn-w4-g32"] and summary["items"] == 8
    results = Path(summary["files"]["results"])
    assert results.parent.parent == (tmp_path / "out").resolve()
    saved = json.loads(results.read_text())["config"]  # the merged config is what results.json holds
    assert saved["candidates"][0]["bits"] == 4 and saved["evaluation"]["limit"] == 4
    assert saved["evaluation"]["cloze_items"] == 6  # the file's
    assert "quantgate: baseline: started" in o.err and "\r" not in o.err  # line progress in a log
    o = quantgate(capfd, "runs", "--store", str(tmp_path / "out" / "quantgate.db"), "--json")
    assert [r["run_id"] for r in json.loads(o.out)] == [summary["run_id"]]
    assert isinstance(RtnConfig(bits=4), registry.MethodConfig)


def test_export_names_what_it_holds_states_its_loaders_and_narrates(api_run):
    from quantgate.export.build import export_candidate
    from quantgate.export.verify import verify
    from quantgate.report.progress import Feedback

    record, root = api_run
    said = io.StringIO()
    with single_thread(), Feedback(stream=said) as feedback:
        exported = export_candidate(root / record.run_id, "rtn-w8", "compressed-tensors", feedback=feedback)
    assert exported.directory.name == f"tiny-llama.rtn-w8.run-{record.run_id}-compressed-tensors"
    doc = json.loads(exported.manifest.read_text())
    assert doc["holds"] == {"model": record.model.base, "model_sha256": record.model.sha256, "candidate": "rtn-w8",
                            "scheme": record.candidate("rtn-w8").scheme, "format": "compressed-tensors",
                            "run_id": record.run_id}
    loaders = doc["loaders"]
    assert loaders["transformers"]["min_version"] == "4.45.0" and loaders["vllm"]["min_version"] == "0.5.0"
    assert loaders["transformers"]["verified_with"] == doc["versions"]["transformers"]
    steps = said.getvalue()
    assert "making rtn-w8 again" in steps and "writing compressed-tensors" in steps and "manifest" in steps
    said = io.StringIO()
    with single_thread(), Feedback(stream=said) as feedback:
        assert verify(exported.directory, feedback=feedback).ok
    assert "files of" in said.getvalue() and "re-measuring the baseline and rtn-w8" in said.getvalue()
