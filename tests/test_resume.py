"""A run killed part-way (SIGKILL) and resumed with --resume ends with the results of a run that
was never interrupted, and scores exactly the items that were missing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

CONFIG = """
model: {base: smollm2-135m-instruct}
candidates:
  - {method: rtn, bits: 8}
  - {method: rtn, bits: 4, group_size: 64}
serving: {engine: torch, max_batch_size: 4}
evaluation: {limit: 16, cloze_items: 8, ppl_windows: 1, window_tokens: 64, record_every: 4}
economics: {measure: false}
quality_gate: {min_items: 10}
"""
ITEMS = 24  # 16 multiple choice + 8 cloze, for each of the 3 models


def _run(cfg: Path, results: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "quantgate.cli", "run", str(cfg), "--results-dir", str(results),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)


def _recorded(db: Path) -> int:
    if not db.exists():
        return 0
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM item_results WHERE task != '__windows__'")).scalar()
    except Exception:  # noqa: BLE001 - the table may not exist yet while the run creates the store
        return 0
    finally:
        engine.dispose()


def _results(root: Path) -> dict:
    (path,) = root.glob("*/results.json")
    return json.loads(path.read_text())


def _summary(payload: dict) -> list[tuple]:
    return [(m["name"], m["accuracy"], m.get("vs_baseline", {}).get("flips", {}).get("answers_changed"),
             round(m.get("vs_baseline", {}).get("kld_mean") or 0.0, 9))
            for m in [payload["baseline"], *payload["candidates"]]]


def run_killed(cfg: Path, results: Path, recorded: int) -> int:
    """`quantgate run CONFIG` SIGKILLed once `recorded` items are in its store; returns the
    items it left there."""
    killed = _run(cfg, results)
    db = results / "quantgate.db"
    deadline = time.monotonic() + 900
    while _recorded(db) < recorded:
        assert killed.poll() is None, killed.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not list(results.glob("*/results.json"))  # it never finished
    return _recorded(db)


def run_resumed(cfg: Path, results: Path) -> dict:
    """`quantgate run CONFIG --resume` to the end; its results.json."""
    resumed = _run(cfg, results, "--resume")
    out = resumed.communicate(timeout=900)[0].decode()
    assert resumed.returncode in (0, 1), out[-2000:]
    return _results(results)


@pytest.mark.slow
@pytest.mark.heavy
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(CONFIG)
    whole = _run(cfg, tmp_path / "whole")
    assert whole.wait(900) == 0 or whole.returncode == 1, whole.stdout.read().decode()[-2000:]

    # the baseline and the first candidate done, part of the second
    before = run_killed(cfg, tmp_path / "killed", 2 * ITEMS + 4)
    assert 2 * ITEMS + 4 <= before < 3 * ITEMS
    payload = run_resumed(cfg, tmp_path / "killed")
    assert _summary(payload) == _summary(_results(tmp_path / "whole"))
    scored = sum(m["items_scored"] for m in [payload["baseline"], *payload["candidates"]])
    assert scored == 3 * ITEMS - before  # exactly the missing items, nothing twice
    assert payload["baseline"]["items_reused"] == ITEMS
    assert payload["candidates"][0]["items_reused"] == ITEMS  # a finished candidate is not rebuilt
