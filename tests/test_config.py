from __future__ import annotations

from pathlib import Path

import pytest

from quantgate.methods.registry import MethodConfig, candidate
from quantgate.config import (
    DEFAULT_CANDIDATES,
    MethodConfig,
    RunConfig,
    check_supported,
    default_config_path,
    load_config,
)
from quantgate.errors import NotSupportedYet, UserError


def test_packaged_default_config_is_the_issue_block():
    cfg = load_config(default_config_path())
    check_supported(cfg)
    labels = [c.label for c in cfg.resolved_candidates]
    # served on ONNX Runtime: 8 and 4 bits on its int8-activation kernels, 3 bits (no kernel)
    # measured by fake quantization and failed as not servable
    assert labels == ["rtn-w8-acc4", "rtn-w4-g64-acc4", "rtn-w3-g64"]
    assert (cfg.serving.engine, cfg.serving.unservable) == ("onnxruntime", "simulate")
    assert cfg.resolved_candidates[0].symmetric is True  # 8-bit per-channel symmetric
    assert all(c.symmetric is False for c in cfg.resolved_candidates[1:])  # grouped: asymmetric
    assert cfg.quality_gate.min_acceptable == 0.94 and cfg.quality_gate.max_flip_rate == 0.05
    # no candidates key -> the RTN ladder from 8 bits down to 2
    assert [c.label for c in DEFAULT_CANDIDATES] == ["rtn-w8", "rtn-w4-g64", "rtn-w3-g64", "rtn-w2-g64"]


def test_quantization_block_is_one_candidate(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("quantization: {method: rtn, bits: 4, group_size: 32, verified_against: baseline}\n")
    cfg = load_config(path)
    assert [c.label for c in cfg.resolved_candidates] == ["rtn-w4-g32"]
    assert cfg.reference == "baseline"


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(Exception):
        cfg.seed = 3  # type: ignore[misc]


def test_relative_eval_set_resolved_against_config_folder(tmp_path):
    (tmp_path / "set.jsonl").write_text("")
    path = tmp_path / "c.yaml"
    path.write_text("quality_gate: {eval_set: set.jsonl}\n")
    assert load_config(path).quality_gate.eval_set == str((tmp_path / "set.jsonl").resolve())


def test_digest_changes_with_settings():
    assert RunConfig().digest() == RunConfig().digest()
    assert RunConfig().digest() != RunConfig(seed=1).digest()


def test_reference_precision_is_the_engines_to_support():
    cfg = RunConfig(quality_gate={"verified_against": "bf16"}, serving={"engine": "onnxruntime"})
    with pytest.raises(NotSupportedYet, match="verified_against 'bf16' on serving.engine onnxruntime"):
        check_supported(cfg)
    torch_cfg = RunConfig(quality_gate={"verified_against": "bf16"}, serving={"engine": "torch"})
    check_supported(torch_cfg)  # torch evaluates bf16 baselines
    assert (torch_cfg.precision, RunConfig().precision) == ("bf16", "fp32")


def test_explicit_symmetric_kept():
    assert candidate(method="rtn", bits=4, group_size=64, symmetric=True).symmetric is True


def test_yaml_list_at_top_level_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(UserError, match=r"c\.yaml:1: config must be a mapping"):
        load_config(path)


def test_examples_parse():
    for path in sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")):
        check_supported(load_config(path))
