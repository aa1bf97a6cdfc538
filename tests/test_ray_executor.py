"""executor: {kind: ray} (issue 20): each model made and scored by a Ray actor, per-item records
back to the driver, every statistic computed there. Results equal the local executor's number for
number; a run killed under one executor resumes from the store under either.

The Ray tests share one Ray instance started here on loopback (2 CPUs, a small object store, no
dashboard), shut down after the module. The run under test reuses it (address: none); a CLI run
in a child process reaches it by its address, as a user's run reaches a cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sqlalchemy import create_engine, text

from conftest import build_tiny_llama, single_thread
from quantgate.config import RunConfig, load_config
from quantgate.errors import UserError
from quantgate.methods.registry import candidate
from quantgate.record import build_record, dump_record
from quantgate.store import open_store
from test_export import char_tokenizer_files
from test_resume import run_killed, run_resumed

SRC = Path(__file__).parent.parent / "src" / "quantgate"
# What differs between two runs of one config besides the quality numbers: when and where it ran,
# how long things took, how many items were reused from the store, and the config's executor block
# (with the digest and run id derived from it).
NOT_QUALITY = {"run_id", "started", "finished", "config", "config_digest", "environment", "machine",
               "quantize_seconds", "eval_seconds", "economics", "items_scored", "items_reused"}


def quality(record: dict) -> dict:
    """results.json without what is not a quality number (NOT_QUALITY keys, at any depth)."""
    if isinstance(record, dict):
        return {k: quality(v) for k, v in record.items() if k not in NOT_QUALITY}
    if isinstance(record, list):
        return [quality(v) for v in record]
    return record


def results_of(result) -> dict:
    return json.loads(dump_record(build_record(result)))


def _yaml(tmp_path: Path, body: str) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(body)
    return load_config(path)


# ---------------------------------------------------------------------------------------------
# Config and installation (no Ray started).


def test_run_py_names_no_executor():
    assert not re.findall(r"\"(local|ray)\"", (SRC / "run.py").read_text())


@pytest.mark.parametrize("body,message", [
    ("executor: {kind: ray, nun_cpus: 2}\n", r"run.yaml:1: unknown key 'executor.nun_cpus'"),
    ("executor: {kind: local, address: auto}\n", r"run.yaml:1: unknown key 'executor.address'"),
    ("executor: {kind: spark}\n", r"run.yaml:1: executor: executor kind is one of local, ray"),
    ("executor: {kind: ray, address: auto, object_store_mb: 100}\n",
     r"object_store_mb sizes a Ray instance started here; with an address the cluster has its own"),
    ("executor:\n  kind: ray\n  num_gpus: -1\n",
     r"run.yaml:3: executor.num_gpus: Input should be greater than or equal to 0"),
])
def test_bad_executor_blocks_are_one_line_errors(tmp_path, body, message):
    with pytest.raises(UserError, match=message):
        _yaml(tmp_path, body)


def test_executor_defaults_to_local(tmp_path):
    assert _yaml(tmp_path, "seed: 1\n").executor.kind == "local"
    cfg = _yaml(tmp_path, "executor: {kind: ray, num_cpus: 2, memory_gb: 1.5}\n")
    assert cfg.executor.actor_options() == {"num_cpus": 2.0, "num_gpus": 0.0, "memory": int(1.5 * 2**30)}


def test_quantgate_imports_without_ray_and_says_how_to_get_it(tmp_path):
    """Nothing imports Ray until a Ray run starts; without it, `executor: ray` is refused in
    one line (exit 2) naming the extra to install."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text("executor: {kind: ray}\n")
    probe = ("import sys; import quantgate.run, quantgate.cli, quantgate.config; "
             "assert 'ray' not in sys.modules, 'ray imported'; sys.modules['ray'] = None; "
             "sys.argv = ['quantgate', 'run', sys.argv[1]]; quantgate.cli.main()")
    done = subprocess.run([sys.executable, "-c", probe, str(cfg)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip() == "quantgate: error: executor ray needs ray: pip install 'quantgate[ray]'"


# ---------------------------------------------------------------------------------------------
# On a Ray instance started here.


@pytest.fixture(scope="module")
def ray_head():
    """A Ray instance on loopback for this module: 2 CPUs, a 100 MB object store, no dashboard.
    Yields its address (what a config's executor.address names)."""
    ray = pytest.importorskip("ray")
    context = ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False,
                       _node_ip_address="127.0.0.1")
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny Llama and a character tokenizer saved as a model.base directory (every Ray actor
    loads it from there)."""
    model_dir = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    build_tiny_llama().save_pretrained(model_dir)
    char_tokenizer_files(model_dir)
    return model_dir


def _tiny_config(model_dir: Path, executor: dict) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"base": str(model_dir)},
        "candidates": [{"method": "gptq", "bits": 4, "group_size": 32}, {"method": "rtn", "bits": 8}],
        "evaluation": {"limit": 6, "cloze_items": 4, "ppl_windows": 2, "window_tokens": 32, "record_every": 3},
        "calibration": {"samples": 4, "seq_len": 32},
        "economics": {"measure": False},
        "quality_gate": {"min_items": 4},
        "executor": executor,
    })


def _tiny_run(model_dir: Path, executor: dict, store: Path, resume: bool = False):
    from quantgate.run import execute

    with single_thread():
        return execute(_tiny_config(model_dir, executor), workdir=store.parent / "work",
                       store=open_store(str(store)), resume=resume)


def _forget(store: Path, candidate: str, keep: int) -> int:
    """Delete a candidate's records but its first `keep` items (a run killed while scoring it:
    keep is a multiple of record_every, as a killed run records whole pieces); returns how many
    item rows were deleted."""
    engine = create_engine(f"sqlite:///{store}")
    with engine.begin() as conn:
        ids = conn.execute(text("SELECT id FROM item_results WHERE candidate = :c AND task != '__windows__' "
                                "ORDER BY id"), {"c": candidate}).scalars().all()
        conn.execute(text("DELETE FROM item_results WHERE candidate = :c AND (task = '__windows__' OR id > :last)"),
                     {"c": candidate, "last": ids[keep - 1]})
    engine.dispose()
    return len(ids) - keep


@pytest.mark.heavy
def test_a_calibrated_run_on_ray_equals_the_local_run(ray_head, tiny_model, tmp_path):
    """GPTQ (calibration windows travel to the actor) and RTN on the tiny Llama: every quality
    number of results.json is the local executor's, and every item was scored once."""
    local = _tiny_run(tiny_model, {"kind": "local"}, tmp_path / "local.db")
    on_ray = _tiny_run(tiny_model, {"kind": "ray"}, tmp_path / "ray.db")
    assert quality(results_of(on_ray)) == quality(results_of(local))
    n = len(local.prepared.suite.items)
    assert [m.scores.items_scored for m in [on_ray.baseline, *on_ray.candidates]] == [n, n, n]


@pytest.mark.heavy
@pytest.mark.parametrize("first,then", [("ray", "local"), ("local", "ray")])
def test_a_run_cut_short_under_one_executor_resumes_under_the_other(ray_head, tiny_model, tmp_path, first, then):
    store = tmp_path / "runs.db"
    whole = _tiny_run(tiny_model, {"kind": first}, store)
    missing = _forget(store, "rtn-w8", keep=3)
    resumed = _tiny_run(tiny_model, {"kind": then}, store, resume=True)
    assert quality(results_of(resumed)) == quality(results_of(whole))
    n = len(whole.prepared.suite.items)
    assert [m.scores.items_scored for m in [resumed.baseline, *resumed.candidates]] == [0, 0, missing]
    assert missing == n - 3


@pytest.mark.heavy
def test_an_error_in_an_actor_is_the_error_a_local_run_gives(ray_head, tiny_model, tmp_path):
    """A candidate whose making fails on its actor (pruning every head) ends the run with the
    local run's own one-line error, not a Ray traceback."""
    from quantgate.run import execute

    bad = {"prune": "magnitude", "sparsity": 0.99, "structure": "heads"}
    errors = []
    for kind in ("local", "ray"):
        cfg = _tiny_config(tiny_model, {"kind": kind})
        small = cfg.evaluation.model_copy(update={"limit": 2, "cloze_items": 2, "ppl_windows": 1})
        cfg = cfg.model_copy(update={"candidates": (candidate(**bad),), "evaluation": small})
        with pytest.raises(UserError) as caught, single_thread():
            execute(cfg, workdir=tmp_path / kind)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "would remove all 2 heads units of a block" in errors[0]


def test_a_model_no_node_can_hold_is_refused_at_once(ray_head, tiny_model, tmp_path):
    with pytest.raises(UserError, match=r"no node of the Ray cluster holds one model's actor \(1 CPUs, 1 GPUs"):
        _tiny_run(tiny_model, {"kind": "ray", "num_gpus": 1}, tmp_path / "runs.db")


# ---------------------------------------------------------------------------------------------
# The default model, two candidates (slow).

# test_resume's run, smaller
DEFAULT_RUN = {
    "model": {"base": "smollm2-135m-instruct"},
    "candidates": [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4, "group_size": 64}],
    "serving": {"engine": "torch", "max_batch_size": 4},
    "evaluation": {"limit": 8, "cloze_items": 4, "ppl_windows": 1, "window_tokens": 64, "record_every": 2},
    "economics": {"measure": False},
    "quality_gate": {"min_items": 5},
}
ITEMS = 12  # 8 multiple choice + 4 cloze, for each of the 3 models


@pytest.fixture(scope="module")
def local_default(tmp_path_factory) -> dict:
    """results.json of the default model's run on the local executor."""
    from quantgate.run import execute

    root = tmp_path_factory.mktemp("local-default")
    cfg = RunConfig.model_validate({**DEFAULT_RUN, "executor": {"kind": "local"}})
    return results_of(execute(cfg, workdir=root / "work", store=open_store(str(root / "runs.db"))))


@pytest.mark.slow
@pytest.mark.heavy
def test_the_default_model_on_ray_equals_the_local_run(ray_head, local_default, tmp_path):
    from quantgate.run import execute

    cfg = RunConfig.model_validate({**DEFAULT_RUN, "executor": {"kind": "ray"}})
    on_ray = results_of(execute(cfg, workdir=tmp_path / "work", store=open_store(str(tmp_path / "runs.db"))))
    assert quality(on_ray) == quality(local_default)
    assert [m["name"] for m in on_ray["candidates"]] == ["rtn-w8", "rtn-w4-g64"]
    assert on_ray["config"]["executor"]["kind"] == "ray"


@pytest.mark.slow
@pytest.mark.heavy
def test_a_killed_ray_run_resumes_with_nothing_lost_or_repeated(ray_head, local_default, tmp_path):
    """`quantgate run` on the cluster (by its address), SIGKILLed while its candidates are being
    scored, then `--resume`d: the local run's results, and exactly the missing items scored."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({**DEFAULT_RUN, "executor": {"kind": "ray", "address": ray_head}}))
    before = run_killed(cfg, tmp_path, ITEMS + 4)  # the baseline and part of the candidates (at once)
    assert ITEMS + 4 <= before < 3 * ITEMS
    payload = run_resumed(cfg, tmp_path)
    assert quality(payload) == quality(local_default)
    scored = sum(m["items_scored"] for m in [payload["baseline"], *payload["candidates"]])
    assert scored == 3 * ITEMS - before  # exactly the missing items, nothing twice
    assert payload["baseline"]["items_reused"] == ITEMS
