"""quantgate export / verify: artifacts that load back to the evaluated candidate, manifests that
say what they are, and a verify that refuses a modified artifact and re-measures an intact one.

The fast tests run a real gate run (run.execute) on the tiny Llama saved as a Hugging Face
directory with a character-level tokenizer; the slow ones use the real default model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_tiny_llama, single_thread

from quantgate.config import RunConfig
from quantgate.errors import UserError
from quantgate.evals.tasks import kl_divergence
from quantgate.export import formats
from quantgate.export.build import export_candidate
from quantgate.export.codes import NotOnGrid, recover_codes
from quantgate.export.manifest import MANIFEST
from quantgate.export.stored import load_stored_run, prepared_suite
from quantgate.export.verify import verify
from quantgate.methods.apply import make_candidate, targets
from quantgate.methods.calibrate import calibration_set
from quantgate.methods.gptq import gptq_quantize
from quantgate.methods.rtn import QuantSpec, dequantize, quantize
from quantgate.models.load import file_sha256, load_baseline
from quantgate.record import build_record, dump_record, load_record
from quantgate.run import execute

ROUND_TRIP_KLD = 1e-4  # the acceptance bound: export -> load -> logits vs the evaluated candidate

CANDIDATES = {  # name -> settings: every method the torch engine exports
    "rtn-w4-g32": {"method": "rtn", "bits": 4, "group_size": 32},  # asymmetric (groups)
    "rtn-w8": {"method": "rtn", "bits": 8},  # per-channel symmetric
    "gptq-w4-g32-sym": {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True},
    "awq-w4-g32": {"method": "awq", "bits": 4, "group_size": 32},
    "smoothquant-w8a8-a0.5": {"method": "smoothquant"},
    "qat-w4-g32-steps4": {"method": "qat", "bits": 4, "group_size": 32, "steps": 4},  # trained scales, GPTQ's codes
}


def char_tokenizer_files(directory: Path) -> None:
    """A Hugging Face fast tokenizer, one token per printable ASCII character (ids 4..99, under
    the tiny Llama's 128), <pad> <s> </s> <unk> = 0..3, BOS prepended; saved into `directory`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = ["<pad>", "<s>", "</s>", "<unk>", "\n"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A gate run of every CANDIDATES entry on the tiny Llama; returns its run directory."""
    root = tmp_path_factory.mktemp("tiny-run")
    model_dir = root / "tiny-llama"
    build_tiny_llama().save_pretrained(model_dir)
    char_tokenizer_files(model_dir)
    cfg = RunConfig.model_validate({
        "model": {"base": str(model_dir)},
        "candidates": list(CANDIDATES.values()),
        "evaluation": {"limit": 8, "cloze_items": 8, "ppl_windows": 2, "window_tokens": 32},
        "calibration": {"samples": 4, "seq_len": 32},
        "economics": {"measure": False},
        "quality_gate": {"min_items": 4},
    })
    with single_thread():
        result = execute(cfg, workdir=root / "work")
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(dump_record(build_record(result)))
    return run_dir


@pytest.fixture(scope="module")
def remade(tiny_run):
    """name -> the candidate made independently of the export code (make_candidate on the run's
    config, seed and calibration windows), with some token ids to compare logits on."""
    run = load_stored_run(tiny_run)
    baseline = load_baseline(run.config.model.base)
    suite = prepared_suite(run.config, baseline.tokenizer).suite
    calib = calibration_set(baseline.tokenizer, run.config.calibration, suite.texts())
    with single_thread():
        made = {c.label: make_candidate(baseline.model, baseline.arch, c, calib, seed=run.config.seed)
                for c in run.config.resolved_candidates}
    ids = torch.tensor([baseline.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)])
    return made, baseline, ids


def mean_kld(a: torch.nn.Module, b: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad(), single_thread():
        ref, other = (torch.log_softmax(m(ids).logits[0].float(), -1) for m in (a, b))
    return float(kl_divergence(ref, other).mean())


# -- exact integer codes ------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [QuantSpec(4, 32, True), QuantSpec(4, 32, False), QuantSpec(8, None, True),
                                  QuantSpec(3, 64, False), QuantSpec(2, 100, False)])
def test_codes_are_recovered_exactly_from_rtn_and_gptq_weights(spec):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 320, generator=g) * 0.05  # 320 = 3 × 100 + 20: a shorter last group
    w[5, :64] = 0.0  # an all-zero group
    x = torch.randn(400, 320, generator=g)
    for q in (quantize(w, spec), gptq_quantize(w, x.T @ x / 400, spec)):
        fake = dequantize(q)
        got = recover_codes(fake, spec)
        assert torch.equal(dequantize(got), fake)  # bit for bit
        assert spec.qmin <= int(got.codes.min()) and int(got.codes.max()) <= spec.qmax
        assert got.scales.dtype == torch.float16 and got.scales.shape == q.scales.shape
        if got.zeros is not None:
            assert 0 <= int(got.zeros.min()) and int(got.zeros.max()) <= spec.qmax
    rtn = quantize(w, spec)
    assert torch.equal(recover_codes(dequantize(rtn), spec).scales, rtn.scales)  # RTN's own grid comes back


def test_weights_off_any_grid_are_refused():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(NotOnGrid):
        recover_codes(w, QuantSpec(4, 32, True))
    fake4 = dequantize(quantize(w, QuantSpec(4, 32, False)))
    with pytest.raises(NotOnGrid):  # 16 levels per group do not fit a 2-bit grid
        recover_codes(fake4, QuantSpec(2, 32, False))


# -- round trips: export -> load -> the evaluated candidate ---------------------------------------


@pytest.mark.parametrize("name", list(CANDIDATES))
@pytest.mark.parametrize("fmt", ["compressed-tensors", "hf"])
def test_export_loads_back_to_the_evaluated_candidate(tiny_run, remade, tmp_path, name, fmt):
    made, baseline, ids = remade
    w8a8 = name.startswith("smoothquant")
    with single_thread():
        exported = export_candidate(tiny_run, name, fmt, tmp_path / "out")
    scheme = json.loads(exported.manifest.read_text())["scheme"]
    loaded = formats.load_torch_artifact(exported.directory, scheme)
    candidate = made[name].model
    names = targets(candidate, baseline.arch, load_stored_run(tiny_run).candidate(name)[0])
    assert scheme["targets"] == names and len(names) == 2 * 7
    for n in names:  # the integer weights decompress to the evaluated float32 weights exactly
        assert torch.equal(loaded.get_submodule(n).weight, candidate.get_submodule(n).weight), n
    assert mean_kld(candidate, loaded, ids) < ROUND_TRIP_KLD
    assert exported.round_trip["kld_mean"] < ROUND_TRIP_KLD and exported.round_trip["quantized_weights_exact"]
    if fmt == "hf" and w8a8:  # dense weights alone are not the candidate: its inputs are int8 too
        plain = type(loaded).from_pretrained(exported.directory, dtype=torch.float32)
        assert mean_kld(candidate, plain, ids) > 10 * ROUND_TRIP_KLD


def test_packed_layout_is_what_vllm_reads(tiny_run, remade, tmp_path):
    """pack-quantized: 8 int4 codes per int32 word (signed codes + 8, low nibble first), float16
    scales [out, groups], zero points packed along the output dim; config.json says exactly that."""
    from safetensors.torch import load_file

    made, baseline, ids = remade
    with single_thread():
        exported = export_candidate(tiny_run, "rtn-w4-g32", "compressed-tensors", tmp_path / "ct")
    tensors = load_file(exported.directory / formats.WEIGHTS_FILE)
    name = "model.layers.0.mlp.down_proj"
    codes = recover_codes(made["rtn-w4-g32"].model.get_submodule(name).weight, QuantSpec(4, 32, False))
    packed = tensors[f"{name}.weight_packed"]
    assert packed.dtype == torch.int32 and packed.shape == (64, 96 // 8)
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(64, 96)
    assert torch.equal(nibbles, codes.codes.int())  # asymmetric codes 0..15 = signed code + 8
    assert torch.equal(tensors[f"{name}.weight_scale"], codes.scales)
    assert tensors[f"{name}.weight_zero_point"].shape == (64 // 8, 3)
    assert tensors["lm_head.weight"].dtype == torch.float16  # unquantized, stored in the export dtype
    q = json.loads((exported.directory / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert (q["quant_method"], q["format"], q["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (4, "group", 32, False)


@pytest.mark.parametrize("name", ["gptq-w4-g32-sym", "rtn-w4-g32", "awq-w4-g32"])
def test_plain_transformers_loads_a_packed_checkpoint(tiny_run, remade, tmp_path, name):
    """No quantgate code on the load path: transformers + compressed-tensors as any user has them,
    symmetric and asymmetric (packed zero points) alike; config.json has what older loaders read."""
    from transformers import AutoModelForCausalLM

    made, _, ids = remade
    with single_thread():
        exported = export_candidate(tiny_run, name, "compressed-tensors", tmp_path / "ct")
    plain = AutoModelForCausalLM.from_pretrained(exported.directory, dtype=torch.float32)
    assert mean_kld(made[name].model, plain, ids) < ROUND_TRIP_KLD
    config = json.loads((exported.directory / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # transformers 4.x reads only this
    trip = exported.round_trip["plain_transformers"]
    assert trip["loader"].startswith("transformers 5.24.0 + compressed-tensors") and trip["kld_mean"] < ROUND_TRIP_KLD


def test_verify_serves_the_export_in_vllm_when_it_is_installed(tiny_run, tmp_path, monkeypatch):
    """With vLLM's interpreter named, verify also serves a compressed-tensors export there (here
    the fake server of tests/fake_vllm.py) and compares it on the server's top-k basis."""
    from fake_vllm import wrapper

    monkeypatch.setenv("QUANTGATE_VLLM_PYTHON", str(wrapper(tmp_path)))
    with single_thread():
        exported = export_candidate(tiny_run, "rtn-w4-g32", "compressed-tensors", tmp_path / "ct")
        checked = verify(exported.directory)
    served = next(c for c in checked.checks if c.what.startswith("loads in vLLM"))
    assert checked.ok and served.ok and served.measured.startswith("KLD ")


def test_verify_fails_an_export_plain_transformers_cannot_load(tiny_run, tmp_path, monkeypatch):
    """The asymmetric W4A16 checkpoint as quantgate wrote it before (no dequantize key): loading
    it the way a user does fails (transformers 5.24 + compressed-tensors 0.20: zero-point size
    mismatch), so verify fails, even with every file's hash in order."""
    from quantgate.export.manifest import file_entries

    monkeypatch.delenv("QUANTGATE_VLLM_PYTHON", raising=False)  # (plain transformers is the check here)
    with single_thread():
        exported = export_candidate(tiny_run, "rtn-w4-g32", "compressed-tensors", tmp_path / "ct")
    config_path = exported.directory / "config.json"
    config = json.loads(config_path.read_text())
    del config["quantization_config"]["dequantize"]
    config_path.write_text(json.dumps(config))
    doc = json.loads(exported.manifest.read_text())
    doc["files"] = file_entries(exported.directory)  # a manifest that vouches for these bytes
    exported.manifest.write_text(json.dumps(doc))
    with single_thread():
        result = verify(exported.directory)
    failed = [c for c in result.checks if not c.ok]
    assert [c.what for c in failed] == ["loads with plain transformers (from_pretrained)"]
    assert "cannot load" in failed[0].measured and "size" in failed[0].measured


def test_w8a8_is_int_quantized_with_dynamic_per_token_inputs(tiny_run, tmp_path):
    with single_thread():
        exported = export_candidate(tiny_run, "smoothquant-w8a8-a0.5", "compressed-tensors", tmp_path / "ct")
    assert json.loads(exported.manifest.read_text())["scheme"]["dtype"] == "float32"  # formats.default_dtype
    group = json.loads((exported.directory / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "int-quantized"
    assert {k: group["weights"][k] for k in ("num_bits", "strategy", "symmetric")} == \
        {"num_bits": 8, "strategy": "channel", "symmetric": True}
    assert {k: group["input_activations"][k] for k in ("num_bits", "strategy", "dynamic", "symmetric")} == \
        {"num_bits": 8, "strategy": "token", "dynamic": True, "symmetric": True}


def test_float16_storage_that_changes_the_candidate_is_refused(tiny_run, tmp_path):
    """Asked for float16, a W8A8 candidate's per-token int8 activations amplify the rounding of its
    norms and embeddings (tiny model: mean KLD about 1e-3): the export says so and leaves nothing."""
    out = tmp_path / "ct16"
    with pytest.raises(UserError, match="--dtype float32"), single_thread():
        export_candidate(tiny_run, "smoothquant-w8a8-a0.5", "compressed-tensors", out, "float16")
    assert not out.exists()


# -- manifest --------------------------------------------------------------------------------------


def test_manifest_says_what_the_artifact_is(tiny_run, tmp_path):
    results = json.loads((tiny_run / "results.json").read_text())  # as written: the manifest copies its parts
    with single_thread():
        exported = export_candidate(tiny_run, "gptq-w4-g32-sym", "compressed-tensors", tmp_path / "ct")
    doc = json.loads(exported.manifest.read_text())
    assert set(doc["files"]) == {p.name for p in exported.directory.iterdir() if p.name != MANIFEST}
    for name, entry in doc["files"].items():
        assert entry["sha256"] == file_sha256(exported.directory / name)
    scheme = doc["scheme"]
    assert (scheme["method"], scheme["bits"], scheme["group_size"], scheme["symmetric"], scheme["format"]) == \
        ("gptq", 4, 32, True, "pack-quantized")
    assert doc["model"]["sha256"] == results["model"]["sha256"]
    assert (doc["config"], doc["config_digest"]) == (results["config"], results["config_digest"])
    assert doc["calibration"]["sha256"] == results["calibration"]["sha256"]
    assert doc["eval"]["sha256"] == results["eval"]["sha256"] and len(doc["eval"]["sha256"]) == 64
    assert {"quantgate", "torch", "transformers", "compressed-tensors", "llama_cpp"} <= set(doc["versions"])
    record = next(c for c in results["candidates"] if c["name"] == "gptq-w4-g32-sym")
    assert doc["gate"] == record["gate"] and doc["measured"]["vs_baseline"] == record["vs_baseline"]
    assert len(doc["measured"]["vs_baseline"]["kld_mean_ci"]) == 2  # results with their intervals
    assert doc["machine"]["run"] == results["environment"]["machine"]


def test_eval_digest_follows_items_labels_and_tokens(tiny_run):
    from dataclasses import replace

    from quantgate.evals.digest import eval_digest

    run = load_stored_run(tiny_run)
    tokenizer = load_baseline(run.config.model.base).tokenizer
    prepared = prepared_suite(run.config, tokenizer)
    digest = eval_digest(prepared)
    assert digest == eval_digest(prepared_suite(run.config, tokenizer)) == run.record.eval.sha256
    first = prepared.suite.items[0]
    relabeled = replace(prepared.suite, items=(replace(first, gold=(first.gold + 1) % len(first.continuations)),
                                                 *prepared.suite.items[1:]))
    assert eval_digest(replace(prepared, suite=relabeled)) != digest
    windows = [prepared.windows[0][:-1] + [0], *prepared.windows[1:]]
    assert eval_digest(replace(prepared, windows=windows)) != digest
    responses = replace(prepared, windows=prepared.windows + [[1, 2, 3]])  # baseline outputs are not eval data
    assert eval_digest(responses) == digest


# -- verify -----------------------------------------------------------------------------------------


def quantgate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.heavy
def test_cli_exports_verifies_and_refuses_a_flipped_byte(tiny_run, tmp_path):
    out = tmp_path / "hf"
    proc = quantgate("export", str(tiny_run), "--candidate", "awq-w4-g32", "--format", "hf", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / MANIFEST).is_file() and "round trip" in proc.stdout
    proc = quantgate("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "KL divergence from baseline" in proc.stdout and "verified" in proc.stdout
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    proc = quantgate("verify", str(weights))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "model.safetensors" in proc.stderr and "sha256 differs" in proc.stderr


def test_verify_remeasures_and_reports_a_mismatch(tiny_run, tmp_path):
    with single_thread():
        exported = export_candidate(tiny_run, "rtn-w4-g32", "compressed-tensors", tmp_path / "ct")
        ok = verify(exported.directory)
    assert ok.ok and {c.what for c in ok.checks} >= {"baseline accuracy", "candidate accuracy", "flipped items",
                                                    "KL divergence from baseline (mean)"}
    doc = json.loads(exported.manifest.read_text())  # the record, not the artifact: no hash covers it
    doc["measured"]["vs_baseline"]["kld_mean"] *= 1.5
    exported.manifest.write_text(json.dumps(doc))
    with single_thread():
        bad = verify(exported.directory)
    assert not bad.ok
    assert [c.what for c in bad.checks if not c.ok] == ["KL divergence from baseline (mean)"]


def test_a_trained_candidate_exports_and_verifies_like_a_ptq_one(tiny_run, tmp_path):
    with single_thread():
        exported = export_candidate(tiny_run, "qat-w4-g32-steps4", "compressed-tensors", tmp_path / "ct")
        result = verify(exported.directory)
    assert json.loads(exported.manifest.read_text())["scheme"]["method"] == "qat"
    assert result.ok, [c for c in result.checks if not c.ok]


V0 = Path(__file__).parent / "data" / "results_v0.json"  # a real results.json from before the typed record


def test_a_version_0_run_is_read_as_a_stored_run(tmp_path):
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    shutil.copy(V0, run_dir / "results.json")
    run = load_stored_run(tmp_path)  # the results root: its newest run
    assert run.path == run_dir / "results.json" and run.record == load_record(V0)
    cand, record = run.candidate("rtn-w4-g64")
    assert (cand.method, cand.quantized_bits, cand.group_size) == ("rtn", 4, 64)
    assert record.weight_bytes == 170_687_232 and record.artifact is None
    with pytest.raises(UserError, match="no evaluated candidate 'rtn-w2'"):
        run.candidate("rtn-w2")
    edited = json.loads(V0.read_text())
    edited["config"]["seed"] = 1
    (run_dir / "results.json").write_text(json.dumps(edited))
    with pytest.raises(UserError, match="does not match its config_digest"):
        load_stored_run(run_dir)


def test_export_refuses_what_it_cannot_reproduce(tiny_run, tmp_path):
    with pytest.raises(UserError, match="only the GGUF file"):
        export_candidate(tiny_run, "rtn-w8", "gguf", tmp_path / "a")
    with pytest.raises(UserError, match="evaluated on the torch engine; --format onnx exports the artifact the "
                                        "onnxruntime engine evaluated"):
        export_candidate(tiny_run, "rtn-w8", "onnx", tmp_path / "a")
    with pytest.raises(UserError, match="no evaluated candidate 'nope'.*rtn-w8"):
        export_candidate(tiny_run, "nope", "hf", tmp_path / "b")
    for key, path in (("model", "baseline"), ("calibration", "calibration")):
        edited = tmp_path / f"run-{key}"
        shutil.copytree(tiny_run, edited)
        results = json.loads((edited / "results.json").read_text())
        results[key]["sha256"] = "0" * 64
        (edited / "results.json").write_text(json.dumps(results))
        with pytest.raises(UserError, match="sha256|no longer match"), single_thread():
            export_candidate(edited, "gptq-w4-g32-sym", "hf", tmp_path / f"c-{path}")


# -- the real default model --------------------------------------------------------------------------


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.name != MANIFEST)


@pytest.mark.slow
@pytest.mark.heavy
def test_real_model_w4a16_checkpoint_is_a_quarter_of_float16(tmp_path):
    from safetensors import safe_open

    cfg = RunConfig.model_validate({
        "candidates": [{"method": "gptq", "bits": 4, "group_size": 64, "symmetric": True}],
        "evaluation": {"limit": 12, "cloze_items": 8, "ppl_windows": 1, "window_tokens": 64},
        "calibration": {"samples": 4, "seq_len": 64},
        "economics": {"measure": False},
        "quality_gate": {"min_items": 10},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(dump_record(build_record(execute(cfg, workdir=tmp_path / "work"))))
    packed = export_candidate(run_dir, "gptq-w4-g64-sym", "compressed-tensors", tmp_path / "ct")
    assert packed.round_trip["kld_mean"] < ROUND_TRIP_KLD and packed.round_trip["quantized_weights_exact"]
    dense16 = tmp_path / "float16"  # the default model as a float16 checkpoint
    baseline = load_baseline(cfg.model.base)
    baseline.model.to(torch.float16).save_pretrained(dense16)
    baseline.tokenizer.save_pretrained(dense16)
    whole, whole16 = directory_bytes(packed.directory), directory_bytes(dense16)
    scheme = json.loads(packed.manifest.read_text())["scheme"]
    with safe_open(str(packed.directory / formats.WEIGHTS_FILE), "pt") as f:
        linear = sum(f.get_tensor(k).nbytes for k in f.keys() if k.rsplit(".", 1)[0] in scheme["targets"])
    linear16 = sum(2 * baseline.model.get_submodule(n).weight.numel() for n in scheme["targets"])
    print(f"\nW4A16 g64 compressed-tensors: {whole:,} bytes vs float16 {whole16:,} ({whole / whole16:.3f}); "
          f"linear weights {linear:,} vs {linear16:,} ({linear / linear16:.3f})")
    assert linear / linear16 < 0.27  # 4-bit codes + a float16 scale per 64 weights: 0.266
    assert whole / whole16 < 0.45  # the tied 49152 x 576 embedding stays float16
    assert verify(packed.directory).ok


@pytest.mark.slow
@pytest.mark.heavy
def test_gguf_export_is_the_evaluated_file_and_verifies(tmp_path):
    pytest.importorskip("llama_cpp")
    cfg = RunConfig.model_validate({
        "serving": {"engine": "llamacpp"},
        "candidates": [{"method": "gguf", "type": "Q8_0"}],
        "evaluation": {"limit": 12, "cloze_items": 8, "ppl_windows": 1, "window_tokens": 64},
        "economics": {"measure": False},
        "quality_gate": {"min_items": 10},
    })
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    results = build_record(execute(cfg, workdir=tmp_path / "work"))
    (run_dir / "results.json").write_text(dump_record(results))
    exported = export_candidate(run_dir, "gguf-Q8_0", "gguf", tmp_path / "gguf")
    (name,) = exported.files
    artifact = results.candidates[0].artifact
    assert exported.files[name]["sha256"] == artifact.sha256
    assert (exported.directory / name).read_bytes() == Path(artifact.path).read_bytes()
    assert verify(exported.directory / name).ok
    data = bytearray((exported.directory / name).read_bytes())
    data[-1] ^= 0xFF
    (exported.directory / name).write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{name}: sha256 differs"):
        verify(exported.directory)
    assert np.isfinite(results.noise_floor.kld_mean)
