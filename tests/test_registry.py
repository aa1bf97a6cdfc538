"""The method and backend registries (issue 14): every method and engine fact comes from one
entry, and the defects the flat config and the engine switches produced stay fixed."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import torch

from conftest import build_tiny_llama, single_thread
from quantgate.config import RunConfig, check_supported, load_config
from quantgate.engines import registry as backends
from quantgate.errors import UserError
from quantgate.methods.registry import METHODS, candidate, parse_candidate, upgrade_candidate

SRC = Path(__file__).parent.parent / "src" / "quantgate"


def _load(tmp_path: Path, text: str) -> RunConfig:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def test_run_py_names_no_engine_and_no_method():
    """The pipeline is engine- and method-agnostic: the names live in their registry entries."""
    text = (SRC / "run.py").read_text()
    assert not re.findall(r"\"(torch|llamacpp|openai|onnxruntime|vllm)\"", text)
    assert not re.findall(r"\"(rtn|gptq|awq|smoothquant|w8a8|gguf|prune|compose|served)\"", text)


def test_every_method_has_one_entry_and_an_engine_that_runs_it():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert backends.engines_for(spec.artifact), f"no engine runs {name}'s {spec.artifact} artifacts"
        if spec.artifact == "model":
            assert callable(spec.driver())


@pytest.mark.parametrize("settings,label", [
    ({"method": "rtn", "bits": 4, "group_size": 64}, "rtn-w4-g64"),  # default: asymmetric with groups
    ({"method": "rtn", "bits": 4, "group_size": 64, "symmetric": True}, "rtn-w4-g64-sym"),
    ({"method": "rtn", "bits": 8}, "rtn-w8"),  # default: symmetric per channel
    ({"method": "rtn", "bits": 8, "symmetric": False}, "rtn-w8-asym"),
    ({"method": "rtn", "bits": 4, "group_size": 64, "quantize_embeddings": True}, "rtn-w4-g64-emb"),
    ({"method": "gptq", "bits": 4, "group_size": 64, "damp": 0.05}, "gptq-w4-g64-damp0.05"),
    ({"method": "awq", "bits": 4, "group_size": 64, "grid": 10}, "awq-w4-g64-grid10"),
    ({"prune": "sparsegpt", "sparsity": 0.5, "damp": 0.1}, "sparsegpt-s50-damp0.1"),
])
def test_labels_say_what_differs(settings, label):
    assert candidate(**settings).label == label


def test_candidates_differing_only_in_symmetry_get_two_labels(tmp_path):
    cfg = _load(tmp_path, "candidates:\n  - {method: rtn, bits: 4, group_size: 64}\n"
                          "  - {method: rtn, bits: 4, group_size: 64, symmetric: true}\n")
    assert [c.label for c in cfg.resolved_candidates] == ["rtn-w4-g64", "rtn-w4-g64-sym"]


def test_an_unknown_method_is_an_error_never_rtn(tmp_path):
    with pytest.raises(UserError, match=r"c.yaml:2: candidates.0: method is one of rtn, gptq"):
        _load(tmp_path, "candidates:\n  - {method: hqq, bits: 4}\n")


SERVER = "{engine: openai, base_url: 'http://127.0.0.1:9/v1'}"


def test_a_served_candidate_without_a_declared_scheme_is_refused_at_config_time(tmp_path):
    with pytest.raises(UserError, match=r"c.yaml:3: candidates.0: a served candidate declares what its server "
                                        r"runs: scheme \(fp32, bf16, fp16, fp8"):
        _load(tmp_path, f"serving: {SERVER}\ncandidates:\n  - {{method: served, serving: {SERVER}}}\n")
    # the old way to write it (a method quantgate would have to apply itself) is refused, not relabelled
    cfg = _load(tmp_path, f"serving: {SERVER}\ncandidates:\n  - {{method: rtn, bits: 4}}\n")
    with pytest.raises(UserError, match="method 'rtn' runs on serving.engine torch or vllm or onnxruntime, not 'openai'"):
        check_supported(cfg)
    with pytest.raises(UserError, match=r"candidates.0.serving'"):
        _load(tmp_path, f"serving: {SERVER}\ncandidates:\n  - {{method: rtn, bits: 4, serving: {SERVER}}}\n")


def test_a_served_candidate_is_sized_from_what_it_declares(tiny_llama, char_tokenizer):
    from quantgate.engines.openai import OpenAIBackend

    cfg = RunConfig.model_validate({"serving": json.loads('{"engine": "openai", "base_url": "http://127.0.0.1:9/v1"}'),
                                    "candidates": [
                                        {"method": "served", "scheme": "fp8", "serving": {"engine": "openai",
                                                                                          "base_url": "http://a/v1"}},
                                        {"method": "served", "bits": 4, "serving": {"engine": "openai",
                                                                                    "base_url": "http://b/v1"}},
                                        {"method": "served", "scheme": "bf16", "name": "unquantized",
                                         "serving": {"engine": "openai", "base_url": "http://c/v1"}}]})
    check_supported(cfg)
    baseline = types.SimpleNamespace(model=tiny_llama, tokenizer=char_tokenizer)
    ctx = backends.RunContext(cfg, baseline, None, Path("."), lambda d, n: lambda k: None, [], None)
    backend = backends.entry("openai").load()
    params = sum(p.numel() for p in tiny_llama.parameters())
    served = [backend.candidate(ctx, c) for c in cfg.resolved_candidates]
    assert [s.label for s in served] == ["served-fp8", "served-w4", "unquantized"]
    assert [s.weight_bytes for s in served] == [params, params // 2, params * 2]
    assert "declared" in served[0].bytes_counted and served[0].scheme == "fp8 (declared, served)"


def test_a_served_candidate_needs_its_server(tmp_path):
    cfg = _load(tmp_path, f"serving: {SERVER}\ncandidates:\n  - {{method: served, bits: 4, serving: {{engine: openai}}}}\n")
    with pytest.raises(UserError, match="candidate served-w4: serving needs base_url"):
        check_supported(cfg)


def test_engines_not_built_and_not_registered(tmp_path):
    with pytest.raises(UserError, match="not supported yet: serving.engine 'tgi'"):
        check_supported(_load(tmp_path, "serving: {engine: tgi}\n"))
    with pytest.raises(UserError, match="serving.engine 'tensorrt': one of torch, llamacpp, openai"):
        check_supported(_load(tmp_path, "serving: {engine: tensorrt}\n"))


def test_schema0_candidates_upgrade_to_their_method_shape():
    """results.json files written before the registry dumped every field of the flat model."""
    flat = {"method": "rtn", "bits": 4, "group_size": 64, "symmetric": False, "quantize_embeddings": False,
            "name": None, "act_order": False, "damp": 0.01, "grid": 20, "alpha": 0.5, "type": None,
            "imatrix": False, "prune": None, "sparsity": None, "pattern": "unstructured", "structure": None,
            "steps": None, "serving": None}
    assert parse_candidate(upgrade_candidate(flat)) == candidate(method="rtn", bits=4, group_size=64)
    gguf = {**flat, "method": "gguf", "type": "Q4_K_M", "bits": 4, "group_size": None, "symmetric": True}
    assert parse_candidate(upgrade_candidate(gguf)).label == "gguf-Q4_K_M"
    pruned = {**flat, "method": "prune", "prune": "magnitude", "sparsity": 0.5, "symmetric": None, "group_size": None}
    assert parse_candidate(upgrade_candidate(pruned)).label == "magnitude-s50"
    steps = {**flat, "method": "gptq", "steps": [{**pruned}, {**flat, "method": "gptq"}]}
    assert parse_candidate(upgrade_candidate(steps)).label == "magnitude-s50+gptq-w4-g64"
    smooth = {**flat, "method": "smoothquant", "bits": 8, "group_size": None, "symmetric": True, "alpha": 0.7}
    assert parse_candidate(upgrade_candidate(smooth)).label == "smoothquant-w8a8-a0.7"


def test_a_magnitude_pruned_candidate_exports_from_a_run_without_calibration(tmp_path):
    """Magnitude pruning needs no calibration text: the run made none, and the export must not
    make one either (it used to, then refused on the sha256 it did not match)."""
    from test_export import char_tokenizer_files

    from quantgate.export.build import export_candidate
    from quantgate.record import build_record, dump_record
    from quantgate.run import execute

    model_dir = tmp_path / "tiny-llama"
    build_tiny_llama().save_pretrained(model_dir)
    char_tokenizer_files(model_dir)
    cfg = RunConfig.model_validate({
        "model": {"base": str(model_dir)},
        "candidates": [{"prune": "magnitude", "sparsity": 0.5}],
        "evaluation": {"limit": 8, "cloze_items": 8, "ppl_windows": 2, "window_tokens": 32},
        "economics": {"measure": False}, "quality_gate": {"min_items": 4},
    })
    with single_thread():
        result = execute(cfg, workdir=tmp_path / "work")
    assert result.calibration is None
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(dump_record(build_record(result)))
    with single_thread():
        exported = export_candidate(run_dir, "magnitude-s50", "hf", tmp_path / "out")
    assert exported.manifest is not None
    from safetensors.torch import load_file

    state = load_file(next((tmp_path / "out").glob("*.safetensors")))
    w = state["model.layers.0.mlp.up_proj.weight"]
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01  # the pruned half, as evaluated
    assert torch.is_tensor(w)
