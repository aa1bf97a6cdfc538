"""`quantgate run` on the real default model with flags and no YAML (issue 21's acceptance):
`quantgate run --model smollm2-135m-instruct --candidate rtn:8 --limit 20`, with two more flags
that keep it short (no speed measurement, two perplexity windows). Through a real process whose
stderr is a pipe, as in CI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_a_run_from_flags_alone_on_the_default_model(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "quantgate.cli", "run", "--model", "smollm2-135m-instruct", "--candidate", "rtn:8",
         "--limit", "20", "--set", "economics.measure=false", "--set", "evaluation.ppl_windows=2", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 1), proc.stderr  # 40 items < min_items 100: measured, none recommended
    assert "Traceback" not in proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["items"] == 40 and [c["name"] for c in summary["candidates"]] == ["rtn-w8"]
    (cand,) = summary["candidates"]
    assert cand["recovery"] > 0.9 and cand["kld_mean"] < 0.05  # 8-bit RTN of the default model barely moves
    results = json.loads(open(summary["files"]["results"]).read())
    config = results["config"]
    assert config["model"]["base"] == "smollm2-135m-instruct" and config["evaluation"]["limit"] == 20
    assert [c["bits"] for c in config["candidates"]] == [8] and config["serving"]["engine"] == "torch"
    items = open(summary["files"]["items"]).read().splitlines()
    assert len(items) == 40 and set(json.loads(items[0])["models"]) == {"baseline", "rtn-w8"}
    # line progress in a pipe: a few lines per model, no bars redrawn with carriage returns
    progress = [line for line in proc.stderr.splitlines() if line.startswith("quantgate: ")]
    assert "quantgate: baseline: started (3 steps)" in progress and "\r" not in proc.stderr
    assert len(proc.stderr.splitlines()) < 30, proc.stderr
