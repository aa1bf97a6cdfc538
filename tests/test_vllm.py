"""serving.engine vllm: config checks, checkpoint facts, the noise floor on a top-k basis, and
quantgate's launcher (start, health, one server at a time, stop by process group on success,
error, timeout and Ctrl-C).

The launcher tests start tests/fake_vllm.py in vLLM's place (vLLM's command line, the tiny Llama
loaded by plain transformers, vLLM's answer layout): they test quantgate's side, not vLLM. The
real vLLM runs in tests/test_vllm_live.py (`make test-vllm`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import build_tiny_llama, single_thread
from fake_vllm import wrapper
from test_export import char_tokenizer_files

from quantgate.config import RunConfig, check_supported, flag_overrides, load_config
from quantgate.engines.openai import OpenAIBackend
from quantgate.engines.process import EngineCrashed
from quantgate.engines.registry import BACKENDS
from quantgate.engines.topk import fill_row
from quantgate.engines.vllm import describe_quantization, read_checkpoint, tensor_bytes
from quantgate.errors import UserError
from quantgate.evals.tasks import kl_divergence
from quantgate.plan import make_plan
from quantgate.record import build_record, load_record
from quantgate.report import view
from quantgate.run import execute
from quantgate.settings import LaunchConfig

FAKE = Path(__file__).parent / "fake_vllm.py"
SEED = Path(__file__).parent / "data" / "seed_config.yaml"
SMALL = {"evaluation": {"limit": 6, "cloze_items": 6, "ppl_windows": 2, "window_tokens": 32},
         "calibration": {"samples": 4, "seq_len": 32}, "economics": {"measure": False},
         "quality_gate": {"min_items": 4}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny Llama and its character tokenizer as a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_llama().save_pretrained(directory)
    char_tokenizer_files(directory)
    return directory


def launched(tiny_dir: Path, pids: Path, candidates: list[dict], **launch) -> RunConfig:
    env = {"FAKE_VLLM_PIDS": str(pids), **launch.pop("env", {})}
    return RunConfig.model_validate({
        "model": {"base": str(tiny_dir)}, "candidates": candidates, **SMALL,
        "serving": {"engine": "vllm", "kv_cache": "paged", "max_concurrency": 2,
                    "launch": {"command": [sys.executable, str(FAKE)], "env": env, **launch}},
    })


def started(pids: Path) -> list[int]:
    return [int(p) for line in pids.read_text().splitlines() for p in line.split() if p.isdigit()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) is gone for our purposes
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text() if Path(f"/proc/{pid}").exists() else False


# -- config ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("serving, candidates, fragment", [
    ({"engine": "vllm", "base_url": "http://h:1/v1", "launch": {"command": ["python"]}}, [], "not both"),
    ({"engine": "vllm", "base_url": "http://h:1/v1"}, [{"method": "rtn", "bits": 4, "group_size": 32}],
     "give serving.launch instead of base_url"),
    ({"engine": "vllm", "launch": {"command": ["python"]}}, [{"method": "rtn", "bits": 3, "group_size": 32}],
     "not 3-bit"),
    ({"engine": "vllm", "launch": {"command": ["python"]}},
     [{"method": "rtn", "bits": 4, "group_size": 32, "quantize_embeddings": True}], "embeddings"),
    ({"engine": "vllm", "launch": {"command": ["/no/such/python"]}}, [], "/no/such/python not found"),
    ({"engine": "torch", "kv_cache": "paged"}, [], "serving.kv_cache paged: an option of serving.engine vllm; "
                                                   "torch has no such option"),
    ({"engine": "onnxruntime", "kv_cache": "paged"}, [], "onnxruntime has no such option"),
    ({"engine": "torch", "launch": {"command": ["python"]}}, [], "serving.launch: an option of serving.engine vllm"),
])
def test_config_refusals(serving, candidates, fragment):
    cfg = RunConfig.model_validate({"serving": serving, "candidates": candidates or [{"method": "rtn", "bits": 8}]})
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        check_supported(cfg)


def test_engine_vllm_alone_launches_with_vllms_interpreter(monkeypatch):
    """`engine: vllm` with no base_url means quantgate starts vLLM: its interpreter comes from
    $QUANTGATE_VLLM_PYTHON when the config names none."""
    cfg = RunConfig.model_validate({"serving": {"engine": "vllm", "kv_cache": "paged"},
                                    "candidates": [{"method": "gptq", "bits": 4, "group_size": 32}]})
    monkeypatch.delenv("QUANTGATE_VLLM_PYTHON", raising=False)
    with pytest.raises(UserError, match="name vLLM's interpreter"):
        check_supported(cfg)
    monkeypatch.setenv("QUANTGATE_VLLM_PYTHON", sys.executable)
    check_supported(cfg)
    assert BACKENDS["vllm"].options == {"kv_cache", "launch"}


def test_task_accuracy_and_a_named_eval_set(tmp_path, monkeypatch):
    """A bare name is looked up as NAME.jsonl / NAME.txt in the config's folder, its evals/
    folder, then $QUANTGATE_EVAL_PATH; a name found nowhere says where it looked."""
    path = tmp_path / "c.yaml"
    path.write_text("quality_gate: {eval_set: holdout, metric: task_accuracy}\n")
    with pytest.raises(UserError, match=f"no holdout.jsonl or .txt in {tmp_path}, {tmp_path / 'evals'}"):
        load_config(path)
    elsewhere = tmp_path / "shared-sets"
    elsewhere.mkdir()
    (elsewhere / "holdout.jsonl").write_text("")
    monkeypatch.setenv("QUANTGATE_EVAL_PATH", str(elsewhere))
    assert load_config(path).quality_gate.eval_set == str(elsewhere / "holdout.jsonl")
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "holdout.jsonl").write_text("")  # the config's own folders come first
    cfg = load_config(path)
    assert cfg.quality_gate.eval_set == str(tmp_path / "evals" / "holdout.jsonl")
    assert cfg.quality_gate.metric == "task_accuracy"


def test_the_seeds_nested_candidate(tmp_path):
    """model.quantization is the seed's place for its one candidate; errors inside it name it."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  quantization:\n    method: awq\n    bits: 4\n    verified_against: baseline\n")
    cfg = load_config(path)
    assert [c.label for c in cfg.resolved_candidates] == ["awq-w4"] and cfg.reference == "baseline"
    path.write_text("model:\n  quantization:\n    method: awq\n    bits: 12\n")
    with pytest.raises(UserError, match=rf"{path}:4: model.quantization.bits"):
        load_config(path)
    path.write_text("model:\n  quantization: {method: awq}\nquantization: {method: rtn}\n")
    with pytest.raises(UserError, match="both name a candidate"):
        load_config(path)


def test_flags_over_the_seeds_nested_candidate(tmp_path):
    """Command-line flags over model.quantization: --candidate replaces it, --set reaches into it
    (its errors name the flag and model.quantization.KEY), --model keeps it."""
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  quantization:\n    method: awq\n    bits: 4\n    verified_against: baseline\n")

    def labels(flags, sets=()):
        return [c.label for c in load_config(path, flag_overrides(flags, sets)).resolved_candidates]

    assert labels({"--candidate": ["rtn:8"]}) == ["rtn-w8"]
    assert labels({}, ["model.quantization.bits=8"]) == ["awq-w8"]
    assert labels({"--model": "elsewhere"}) == ["awq-w4"]
    with pytest.raises(UserError, match=r"^--set model.quantization.bits=12: model.quantization.bits: "):
        load_config(path, flag_overrides({}, ["model.quantization.bits=12"]))
    with pytest.raises(UserError, match=r"^--set model.quantization.foo=1: unknown key 'model.quantization.foo'"):
        load_config(path, flag_overrides({}, ["model.quantization.foo=1"]))


def test_the_seeds_config_verbatim_validates_with_every_key(tmp_path):
    shutil.copy(SEED, tmp_path / "seed.yaml")
    with pytest.raises(UserError, match="'production_holdout_2000': no production_holdout_2000.jsonl or .txt in"):
        load_config(tmp_path / "seed.yaml")
    (tmp_path / "production_holdout_2000.jsonl").write_text("")  # the eval set supplied
    cfg = load_config(tmp_path / "seed.yaml")
    assert cfg.quality_gate.eval_set == str(tmp_path / "production_holdout_2000.jsonl")
    seed = yaml.safe_load(SEED.read_text())
    assert cfg.serving.kv_cache == "paged" and cfg.quality_gate.metric == "task_accuracy"
    assert [c.label for c in cfg.resolved_candidates] == ["awq-w4"] and cfg.reference == "bf16"
    launch = cfg.serving.model_copy(update={"launch": LaunchConfig(command=(sys.executable,))})
    check_supported(cfg.model_copy(update={"serving": launch}))  # vLLM serves a bf16 baseline in bfloat16
    float16 = launch.model_copy(update={"launch": LaunchConfig(command=(sys.executable,), dtype="float16")})
    with pytest.raises(UserError, match="serving.launch.dtype float16: the baseline is verified against bf16 "
                                        r"\(bf16\), so its servers compute in bfloat16; leave dtype out"):
        check_supported(cfg.model_copy(update={"serving": float16}))
    dumped = cfg.model_dump(mode="json")
    for section, keys in seed.items():
        for key in keys:
            if key != "quantization":
                assert key in dumped[section], (section, key)
    assert dumped["quantization"]["method"] == "awq" and dumped["quality_gate"]["verified_against"] == "bf16"


def test_check_plans_a_server_start_for_each_model_it_serves(tiny_dir, tmp_path):
    """`quantgate check` on vllm: a server start (its stated time) before the baseline and each
    candidate quantgate makes; none when the run names running servers."""
    items = tmp_path / "set.jsonl"
    items.write_text("".join(json.dumps({"id": f"q{i}", "query": "a", "choices": [" b", " c"], "gold": 0}) + "\n"
                             for i in range(3)))
    base = {"model": {"base": str(tiny_dir)}, "quality_gate": {"eval_set": str(items)}, "economics": {"measure": False}}
    cfg = RunConfig.model_validate({**base, "candidates": [{"method": "rtn", "bits": 8}],
                                    "serving": {"engine": "vllm", "launch": {"command": [sys.executable]}}})
    starts = [s for s in make_plan(cfg, tmp_path / "out").steps if s.what.startswith("start a vllm server")]
    assert [(s.what, s.seconds) for s in starts] == [
        ("start a vllm server for the baseline (one at a time)", BACKENDS["vllm"].startup),
        ("start a vllm server for rtn-w8 (one at a time)", BACKENDS["vllm"].startup)]
    simulate = RunConfig.model_validate({**base, "candidates": [{"method": "rtn", "bits": 3, "group_size": 32}],
                                         "serving": {"engine": "vllm", "unservable": "simulate",
                                                     "launch": {"command": [sys.executable]}}})
    steps = [s.what for s in make_plan(simulate, tmp_path / "out").steps]  # 3-bit: made and scored on torch only
    assert [s for s in steps if s.startswith("start")] == ["start a vllm server for the baseline (one at a time)"]
    assert "score rtn-w3-g32 on torch, not servable on vllm" in [s.split(":")[0] for s in steps]
    bf16 = cfg.model_copy(update={"quality_gate": cfg.quality_gate.model_copy(update={"verified_against": "bf16"})})
    assert [s.what.split(":")[0] for s in make_plan(bf16, tmp_path / "out").steps if "float32" in s.what] == [
        "load the checkpoint again in float32", "start a vllm server for the float32 checkpoint beside the bf16 "
        "baseline (one at a time)", "score the float32 checkpoint"]
    url = "http://127.0.0.1:9/v1"
    served = {"method": "served", "bits": 4, "name": "q4", "serving": {"engine": "vllm", "base_url": url}}
    cfg = RunConfig.model_validate({**base, "candidates": [served], "serving": {"engine": "vllm", "base_url": url}})
    assert not [s for s in make_plan(cfg, tmp_path / "out").steps if s.what.startswith("start")]
    bf16 = cfg.model_copy(update={"quality_gate": cfg.quality_gate.model_copy(update={"verified_against": "bf16"})})
    assert bf16.precision == "bf16" and not [s for s in make_plan(bf16, tmp_path / "out").steps if "float32" in s.what]


# -- what a checkpoint is ---------------------------------------------------------------------------


def test_checkpoint_facts_come_from_its_files(tiny_dir):
    facts = read_checkpoint(tiny_dir)
    params = sum(p.numel() for p in build_tiny_llama().parameters())
    assert facts.weight_bytes == params * 4 and facts.scheme == "unquantized float32 checkpoint"
    assert tensor_bytes(tiny_dir / "model.safetensors") == params * 4
    q = {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 64, "symmetric": False}}}}
    assert describe_quantization(q, "float16") == "compressed-tensors pack-quantized: W4A16: int4 g64 asym"
    q["config_groups"]["group_0"] = {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}}
    assert describe_quantization(q, None) == ("compressed-tensors pack-quantized: W8A8: int8 channel sym, inputs "
                                              "int8 dynamic per token")
    assert describe_quantization({"quant_method": "gptq", "bits": 4, "group_size": 128}, None) == \
        "gptq (bits 4, group_size 128)"
    with pytest.raises(UserError, match="config.json: missing"):
        read_checkpoint(tiny_dir.parent)


# -- the noise floor on a top-k basis ------------------------------------------------------------------


def test_noise_floor_compares_like_with_like_and_reports_the_truncation_apart():
    """A server that reports exactly the reference's top-k: its floor is 0 on the same top-k
    basis; the naive full-vocabulary KL is all truncation, and equals floor + truncation."""
    g = torch.Generator().manual_seed(0)
    full = torch.log_softmax(torch.randn(12, 576, generator=g) * 3, -1)  # [T, V], V the awkward 576
    nxt = torch.randint(0, 576, (12,), generator=g)
    rows = []
    for t in range(12):
        top = full[t].topk(20)
        known = {int(i): float(v) for v, i in zip(top.values, top.indices)}
        known[int(nxt[t])] = float(full[t, nxt[t]])
        rows.append(fill_row(known, 576))
    served = torch.stack(rows)
    backend = OpenAIBackend(BACKENDS["openai"])
    floor, truncation = backend.floor_divergence(full, served)
    naive = kl_divergence(full, served)
    assert floor.max() < 1e-6 and truncation.min() > 0.01  # (float32 rows: 1e-7 of rounding)
    np.testing.assert_allclose(naive, floor + truncation, rtol=1e-5, atol=1e-6)
    shifted = served + 0.01 * torch.randn(served.shape, generator=g)  # an engine that differs: seen
    assert backend.floor_divergence(full, torch.log_softmax(shifted, -1))[0].mean() > 1e-5


# -- the launcher, with the fake server ------------------------------------------------------------------


@pytest.mark.heavy
def test_launched_runs_match_torch_one_server_at_a_time(tiny_dir, tmp_path):
    """Baseline and two candidates (W4A16 asym, W8A8) each served from quantgate's own export,
    one server at a time, each stopped with its child; scores as on torch; the candidates'
    scheme and bytes read from the checkpoints served."""
    cands = [{"method": "rtn", "bits": 4, "group_size": 32}, {"method": "smoothquant"}]
    pids = tmp_path / "pids"
    with single_thread():
        served = execute(launched(tiny_dir, pids, cands), workdir=tmp_path / "work")
        torch_run = execute(RunConfig.model_validate({"model": {"base": str(tiny_dir)}, "candidates": cands, **SMALL}))
    lines = pids.read_text().splitlines()
    assert len(lines) == 3 and "OVERLAP" not in lines  # one server at a time
    assert not [p for p in started(pids) if alive(p)]  # every server and its child stopped
    assert {p.name for p in (tmp_path / "work" / "logs").iterdir()} >= {
        "vllm-baseline.log", "vllm-rtn-w4-g32.log", "vllm-smoothquant-w8a8-a0.5.log"}
    assert served.noise_floor.kld.mean() < 1e-6 and served.noise_floor.truncation_kld is not None
    floor = build_record(served).noise_floor
    assert floor.truncation_kld_mean > 0 and "the truncation itself" in view.noise_floor(build_record(served))
    for on_vllm, on_torch in zip(served.candidates, torch_run.candidates):
        assert on_vllm.metrics.accuracy == on_torch.metrics.accuracy
        assert np.array_equal(on_vllm.metrics.correct, on_torch.metrics.correct)  # the same flips
        export = tmp_path / "work" / "vllm" / on_vllm.name
        assert on_vllm.weight_bytes == tensor_bytes(export / "model.safetensors")
    w4, w8a8 = served.candidates
    assert w4.scheme == "compressed-tensors pack-quantized: W4A16: int4 g32 asym"
    assert w8a8.scheme.startswith("compressed-tensors int-quantized: W8A8: int8 channel sym, inputs int8 dynamic")
    assert served.baseline.scheme == "unquantized float32 checkpoint, served in float32"
    assert served.config.serving.kv_cache == "paged"


@pytest.mark.heavy
def test_a_bf16_baseline_is_served_in_bfloat16_beside_its_float32_checkpoint(tiny_dir, tmp_path):
    """verified_against: bf16 on vLLM started here: the baseline and the candidate are served in
    bfloat16, the checkpoint in float32 beside them (the fp32 row, one server at a time); the
    candidate is quantized from the float32 weights, so its export holds exactly the codes a
    float32 run makes (not ones rounded to bfloat16 first), dense tensors in bfloat16."""
    from quantgate.export.formats import load_torch_artifact, torch_scheme
    from quantgate.methods.apply import make_candidate
    from quantgate.models.load import load_baseline

    pids, cand = tmp_path / "pids", {"method": "rtn", "bits": 4, "group_size": 32}
    cfg = launched(tiny_dir, pids, [cand])
    cfg = cfg.model_copy(update={"quality_gate": cfg.quality_gate.model_copy(update={"verified_against": "bf16"})})
    with single_thread():
        result = execute(cfg, workdir=tmp_path / "work")
    logs = tmp_path / "work" / "logs"
    dtypes = {name: (logs / f"vllm-{name}.log").read_text().splitlines()[0].split("--dtype ")[1].split()[0]
              for name in ("baseline", "fp32", "rtn-w4-g32")}
    assert dtypes == {"baseline": "bfloat16", "fp32": "float32", "rtn-w4-g32": "bfloat16"}
    assert len(pids.read_text().splitlines()) == 3 and not [p for p in started(pids) if alive(p)]
    assert result.precision == "bf16" and result.baseline.scheme.endswith("served in bfloat16")
    full, _ = result.full_precision
    assert full.scheme.startswith("fp32 (unquantized float32 checkpoint served in float32")
    assert 0 < full.comparison.kld.mean < 0.05  # bfloat16 rounding is seen, and is small
    export = tmp_path / "work" / "vllm" / "rtn-w4-g32"
    header = json.loads((export / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (export / "model.safetensors").read_bytes()[:8], "little")])
    assert header["model.norm.weight"]["dtype"] == "BF16"
    assert header["model.layers.0.self_attn.q_proj.weight_scale"]["dtype"] == "F16"
    base32 = load_baseline(str(tiny_dir), "fp32")
    config = RunConfig.model_validate({"candidates": [cand]}).resolved_candidates[0]
    made = make_candidate(base32.model, base32.arch, config, None, seed=0).model
    names = [n for n, m in made.named_modules() if n.startswith("model.layers") and isinstance(m, torch.nn.Linear)]
    loaded = load_torch_artifact(export, torch_scheme(config, "compressed-tensors", "bfloat16", names, ["lm_head"]))
    for name in names:
        assert torch.equal(loaded.get_submodule(name).weight, made.get_submodule(name).weight), name


@pytest.mark.heavy
def test_an_export_of_a_run_gated_on_vllm_is_verified_on_vllm(tiny_dir, tmp_path):
    """quantgate verify re-measures a compressed-tensors export of a vLLM-gated run on vLLM
    started here (baseline, then the export), and loads it with plain transformers too."""
    from quantgate.export.build import export_candidate
    from quantgate.export.verify import verify
    from quantgate.record import build_record, dump_record

    pids = tmp_path / "pids"
    with single_thread():
        result = execute(launched(tiny_dir, pids, [{"method": "rtn", "bits": 4, "group_size": 32}]),
                         workdir=tmp_path / "work")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(dump_record(build_record(result)))
    with single_thread():
        exported = export_candidate(run_dir, "rtn-w4-g32", "compressed-tensors", tmp_path / "ct")
        checked = verify(exported.directory)
    assert checked.engine == "vllm" and checked.ok, [c for c in checked.checks if not c.ok]
    assert "loads with plain transformers (from_pretrained)" in {c.what for c in checked.checks}
    assert len(pids.read_text().splitlines()) == 4 and not [p for p in started(pids) if alive(p)]


@pytest.mark.parametrize("mode, fragment", [("crash", "exited .* before it was ready: RuntimeError: the fake"),
                                            ("hang", "did not answer .*/health within 4 s; stopped it")])
def test_a_server_that_fails_to_start_is_stopped_and_named(tiny_dir, tmp_path, mode, fragment):
    pids = tmp_path / "pids"
    cfg = launched(tiny_dir, pids, [{"method": "rtn", "bits": 8}], startup_timeout_s=4, env={"FAKE_VLLM": mode})
    t0 = time.monotonic()
    with pytest.raises(EngineCrashed, match=fragment), single_thread():
        execute(cfg, workdir=tmp_path / "work")
    assert time.monotonic() - t0 < 60
    assert started(pids) and not [p for p in started(pids) if alive(p)]


def test_ctrl_c_stops_the_server(tiny_dir, tmp_path):
    """SIGINT to `quantgate run` while a launched server is up: the run ends and so does the
    server with its child."""
    pids = tmp_path / "pids"
    cfg = launched(tiny_dir, pids, [{"method": "rtn", "bits": 8}])
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # Ctrl-C's SIGINT as a terminal delivers it: a test run in the background (`cmd &`) ignores SIGINT, and an
    # ignored signal stays ignored across exec, so quantgate would never see it.
    proc = subprocess.Popen([sys.executable, "-m", "quantgate.cli", "run", str(path), "--results-dir",
                             str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (pids.exists() and started(pids)) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert started(pids), proc.stderr.read() if proc.poll() is not None else "no server started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    assert proc.returncode == 130, (proc.returncode, proc.stderr.read()[-3000:])
    deadline = time.monotonic() + 40
    while [p for p in started(pids) if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in started(pids) if alive(p)]


@pytest.mark.heavy
@pytest.mark.slow  # (the seed's own settings: 128 calibration windows, a load sweep to 32 in flight)
def test_the_seeds_config_runs_with_its_model_and_eval_set(tiny_dir, tmp_path, monkeypatch):
    """The seed's config verbatim, with model.base naming a real model and its eval set present
    (as production_holdout_2000.jsonl beside it): it runs with a bf16 baseline on vLLM, and
    every key of it is in results.json."""
    folder = tmp_path / "seed"
    folder.mkdir()
    (folder / "config.yaml").write_text(SEED.read_text().replace("meta-llama/Llama-3.1-8B-Instruct", str(tiny_dir)))
    items = [{"id": f"q{i}", "task": "support", "query": f"Ticket {i}: the printer is",
              "choices": [" broken", " fine"], "gold": i % 2} for i in range(12)]
    (folder / "production_holdout_2000.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    monkeypatch.setenv("QUANTGATE_VLLM_PYTHON", str(wrapper(tmp_path)))
    monkeypatch.setenv("FAKE_VLLM_PIDS", str(tmp_path / "pids"))
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", "run", str(folder / "config.yaml"),
                           "--results-dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    record = load_record(next((tmp_path / "out").glob("*/results.json")))
    seed = yaml.safe_load(SEED.read_text())
    stored = {**record.config, "model": {**record.config["model"], "quantization": record.config["quantization"]}}
    stored["model"]["quantization"] = {**stored["model"]["quantization"],
                                       "verified_against": record.config["quality_gate"]["verified_against"]}
    for section, keys in seed.items():
        for key, value in keys.items():
            assert key in stored[section], (section, key)
            if isinstance(value, dict):
                assert all(k in stored[section][key] for k in value), (section, key)
    assert record.eval.metric == "task_accuracy" and record.eval.eval_set == "production_holdout_2000"
    assert record.model.precision == "bf16" and record.full_precision is not None
    assert [c.name for c in record.candidates] == ["awq-w4"] and record.candidates[0].scheme.startswith(
        "compressed-tensors pack-quantized: W4A16: int4 channel sym")
    assert not [p for p in started(tmp_path / "pids") if alive(p)]
    shutil.rmtree(tmp_path / "out")
