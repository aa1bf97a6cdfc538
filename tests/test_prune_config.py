"""Config of pruning candidates and of `steps` compositions: defaults, labels, errors that name
the file, line and key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from quantgate.methods.registry import candidate, parse_candidate
from quantgate.config import RunConfig, check_supported, load_config
from quantgate.errors import UserError


def _load(tmp_path, text: str) -> RunConfig:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return load_config(path)


def test_prune_candidates_parse_with_defaults_and_labels(tmp_path):
    cfg = _load(tmp_path, "candidates:\n"
                          "  - {prune: magnitude, sparsity: 0.5}\n"
                          "  - {method: prune, sparsity: 0.5}\n"
                          "  - {prune: sparsegpt, pattern: '2:4'}\n"
                          "  - {prune: wanda, sparsity: 0.25, structure: mlp}\n")
    check_supported(cfg)
    cands = cfg.resolved_candidates
    assert [c.label for c in cands] == ["magnitude-s50", "wanda-s50", "sparsegpt-2:4", "wanda-mlp25"]
    assert all(c.method == "prune" for c in cands)
    assert cands[2].sparsity == 0.5  # implied by 2:4
    assert [c.needs_calibration for c in cands] == [False, True, True, True]
    assert [c.quantized_bits for c in cands] == [None] * 4  # weights keep the baseline's precision


def test_steps_compose_with_the_quantize_step_last_and_round_trip(tmp_path):
    cfg = _load(tmp_path, "quantization:\n  steps:\n    - {prune: wanda, sparsity: 0.5}\n"
                          "    - {quantize: gptq, bits: 4, group_size: 64}\n")
    (cand,) = cfg.resolved_candidates
    assert cand.label == "wanda-s50+gptq-w4-g64"
    assert cand.method == "compose" and cand.quantizer.method == "gptq"
    assert (cand.quantized_bits, cand.group_size, cand.symmetric) == (4, 64, False)
    assert cand.needs_calibration and [s.method for s in cand.steps] == ["prune", "gptq"]
    assert parse_candidate(cand.model_dump()) == cand
    only_pruning = candidate(steps=[{"prune": "magnitude", "sparsity": 0.25, "structure": "mlp"},
                                    {"prune": "magnitude", "sparsity": 0.5}])
    assert only_pruning.quantizer is None and not only_pruning.needs_calibration
    assert only_pruning.quantized_bits is None
    assert parse_candidate(only_pruning.model_dump()) == only_pruning


@pytest.mark.parametrize("line,key,message", [
    ("  - {prune: wanda, sparsity: 1.5}", "candidates.0.sparsity", "less than 1"),
    ("  - {prune: wanda, sparsity: 0}", "candidates.0.sparsity", "greater than 0"),
    ("  - {prune: wanda, sparsity: 0.5, sparsty: 0.5}", "candidates.0.sparsty", "unknown key"),
    ("  - {prune: wanda}", "candidates.0", "needs 'sparsity'"),
    ("  - {prune: lottery, sparsity: 0.5}", "candidates.0.prune", "magnitude"),
    ("  - {prune: wanda, pattern: '2:4', sparsity: 0.6}", "candidates.0", "leave 'sparsity' out"),
    ("  - {prune: wanda, pattern: '1:4'}", "candidates.0.pattern", "unstructured"),
    ("  - {prune: sparsegpt, sparsity: 0.25, structure: mlp}", "candidates.0", "not sparsegpt"),
    ("  - {prune: wanda, sparsity: 0.5, structure: layers}", "candidates.0.structure", "mlp"),
    ("  - {prune: wanda, sparsity: 0.5, bits: 3}", "candidates.0.bits", "unknown key"),  # prune does not quantize
    ("  - {method: rtn, bits: 4, sparsity: 0.5}", "candidates.0.sparsity", "unknown key"),  # a prune field
    ("  - {method: rtn, quantize: gptq}", "candidates.0", "not both"),
    ("  - {steps: []}", "candidates.0", "'steps' is empty"),
    ("  - {steps: [{quantize: rtn}, {prune: wanda, sparsity: 0.5}]}", "candidates.0", "prune steps first"),
    ("  - {steps: [{prune: wanda, sparsity: 0.5}], bits: 3}", "candidates.0.bits", "unknown key"),  # in a step
    ("  - {steps: [{quantize: gguf, type: Q4_0}]}", "candidates.0.steps.0", "a step's method"),
    ("  - {method: magic, bits: 3}", "candidates.0", "method is one of rtn, gptq"),
    ("  - {steps: [{prune: wanda, sparsity: 0.5, name: x}]}", "candidates.0", "name the whole candidate"),
    ("  - {steps: [{prune: wanda, sparsity: 0.5, sparsty: 1}]}", "candidates.0.steps.0.sparsty", "unknown key"),
])
def test_bad_prune_config_is_a_user_error_naming_line_and_key(tmp_path, line, key, message):
    with pytest.raises(UserError, match=message) as err:
        _load(tmp_path, "seed: 0\ncandidates:\n" + line + "\n")
    assert f"c.yaml:3: {key}" in str(err.value) or f"c.yaml:3: unknown key '{key}'" in str(err.value)


def test_quantization_fields_keep_their_behaviour():
    assert candidate(method="gptq", bits=3, group_size=64).label == "gptq-w3-g64"
    assert candidate().symmetric is True and candidate(group_size=32).symmetric is False
    assert not candidate(method="rtn").needs_calibration
    with pytest.raises(ValidationError):
        candidate(method="w8a8", bits=4)
