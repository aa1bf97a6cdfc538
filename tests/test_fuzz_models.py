"""Fuzzing model files: truncated or foreign GGUF files, safetensors with a garbage header, Hugging
Face directories with a broken or foreign config, models that need their own code. Each is checked
before transformers reads it (models/files.py): exit 2, one line naming the file, no traceback, no
run."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from fuzz_cli import no_run_left, quantgate, refused

SMALL = "evaluation: {limit: 5, cloze_items: 5, ppl_windows: 1, window_tokens: 32}\neconomics: {measure: false}\n"


@pytest.fixture(scope="module")
def packaged_gguf() -> Path:
    from quantgate.errors import UserError
    from quantgate.models.load import locate_packaged

    try:
        return locate_packaged("smollm2-135m-instruct")
    except UserError as e:
        pytest.skip(str(e))


def run_on(tmp: Path, base: Path, capfd) -> str:
    config = tmp / "config.yaml"
    config.write_text(f"model: {{base: {base}}}\nresults_dir: {tmp / 'results'}\n{SMALL}")
    return quantgate(capfd, "run", str(config))


def broken_copy(tiny_dir: Path, tmp: Path) -> Path:
    target = tmp / "model"
    shutil.copytree(tiny_dir, target)
    return target


# -- GGUF files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [3, 4, 24, 1000, 100_000, 2_000_000, "half", "all-but-10"])
def test_truncated_gguf(tmp_path, capfd, packaged_gguf, keep):
    data = packaged_gguf.read_bytes()
    n = {"half": len(data) // 2, "all-but-10": len(data) - 10}.get(keep, keep)
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[:n])
    fragment = "not a GGUF file" if n < 4 else "truncated or corrupt GGUF file"
    refused(run_on(tmp_path, path, capfd), str(path), fragment)
    no_run_left(tmp_path / "results")


@pytest.mark.parametrize("data", [b"", b"GGML" + bytes(100), b"\x00" * 4096, bytes(range(256)) * 64,
                                  b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", 2**62) * 2],
                         ids=["empty", "ggml-magic", "zeros", "noise", "absurd-counts"])
def test_foreign_or_garbage_gguf(tmp_path, capfd, data):
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    refused(run_on(tmp_path, path, capfd), str(path), "GGUF")
    no_run_left(tmp_path / "results")


def test_gguf_of_an_unknown_architecture(tmp_path, capfd):
    """A well-formed GGUF file whose architecture transformers cannot read."""
    import gguf
    import numpy as np

    path = tmp_path / "frob.gguf"
    writer = gguf.GGUFWriter(str(path), "frobnicator")
    writer.add_block_count(1)
    writer.add_tensor("blk.0.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    refused(run_on(tmp_path, path, capfd), str(path))
    no_run_left(tmp_path / "results")


# -- Hugging Face directories ---------------------------------------------------------------------

def _garbage_header(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\xff" * 64)


def _truncated_weights(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])


def _header_length_lies(d: Path) -> None:
    w = d / "model.safetensors"
    w.write_bytes(struct.pack("<Q", 2**40) + w.read_bytes()[8:])


def _header_not_json(d: Path) -> None:
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 8) + b"not json")


def _config_json(text: str):
    def write(d: Path) -> None:
        (d / "config.json").write_text(text)
    return write


def _config_update(**fields):
    def write(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, **fields}))
    return write


def _drop(name: str):
    def drop(d: Path) -> None:
        (d / name).unlink()
    return drop


def _remote_tokenizer(d: Path) -> None:
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_frob.FrobTokenizer", None]}
    (d / "tokenizer_config.json").write_text(json.dumps(config))


def _pickles_only(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


HF_CASES = [
    ("garbage-safetensors-header", _garbage_header, ["model.safetensors", "not a valid safetensors file"]),
    ("truncated-safetensors", _truncated_weights, ["model.safetensors", "not a valid safetensors file"]),
    ("header-length-lies", _header_length_lies, ["model.safetensors", "not a valid safetensors file"]),
    ("header-not-json", _header_not_json, ["model.safetensors", "not a valid safetensors file"]),
    ("unknown-model-type", _config_update(model_type="frobnicator"),
     ["config.json", "model_type 'frobnicator'", "no architecture transformers"]),
    ("no-model-type", _config_update(model_type=None), ["config.json", "no 'model_type'"]),
    ("model-type-list", _config_update(model_type=["llama"]), ["config.json", "no 'model_type'"]),
    ("trust-remote-code", _config_update(auto_map={"AutoModelForCausalLM": "modeling_frob.FrobForCausalLM"}),
     ["config.json", "does not run code shipped with a model"]),
    ("remote-tokenizer", _remote_tokenizer, ["tokenizer_config.json", "does not run code shipped with a model"]),
    ("config-not-json", _config_json("{model_type: llama"), ["config.json:1", "not valid JSON"]),
    ("config-list", _config_json("[1, 2]"), ["config.json", "expected a JSON object"]),
    ("config-latin1", _config_json('{"model_type": "llama", "name": "caf\udce9"}'), ["config.json"]),
    ("config-missing", _drop("config.json"), ["config.json", "not found"]),
    ("config-deep", _config_json("[" * 100_000 + "]" * 100_000), ["config.json:1", "nested too deeply"]),
    ("pickles-only", _pickles_only, ["pytorch_model.bin", "pickled weights are never loaded"]),
]


@pytest.mark.parametrize("name, breaks, fragments", HF_CASES, ids=[c[0] for c in HF_CASES])
def test_broken_hf_directory(tmp_path, capfd, tiny_dir, name, breaks, fragments):
    model = broken_copy(tiny_dir, tmp_path)
    if name == "config-latin1":  # a config.json whose bytes are Latin-1, not UTF-8
        (model / "config.json").write_bytes(b'{"model_type": "llama", "name": "caf\xe9"}')
    else:
        breaks(model)
    line = refused(run_on(tmp_path, model, capfd), *fragments)
    assert str(model) in line
    no_run_left(tmp_path / "results")


def test_a_plain_file_is_no_model(tmp_path, capfd):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    refused(run_on(tmp_path, path, capfd), "neither a directory nor a .gguf file")
