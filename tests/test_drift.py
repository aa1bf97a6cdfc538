"""`quantgate drift`: the two-sample statistics it decides on, the --if-due schedule, bad input,
and (slow) a real gate on PIQA drift-checked on a fresh PIQA sample (no drift) and on ARC-Easy
(an input shift)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from quantgate.methods.registry import candidate
from quantgate.config import RunConfig
from quantgate.drift import PERIODS, Plan, due_at, movements, not_due
from quantgate.evals.metrics import Comparison, Flips, TaskComparison
from quantgate.evals.stats import (
    MeanQuantile, fisher_exact, interval_difference_p, kolmogorov_sf, ks_2samp, normal_quantile,
)
from quantgate.record import RunRecord, TaskStats, load_record
from quantgate.store import DriftCheck, open_store, record_drift

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
V0 = Path(__file__).parent / "data" / "results_v0.json"  # a real results.json from before the typed record

# ---------------------------------------------------------------- Kolmogorov-Smirnov


def test_kolmogorov_sf_critical_values():
    # Tabulated asymptotic critical values: P(K > 1.3581) = 0.05, P(K > 1.6276) = 0.01.
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=2e-5)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=2e-5)
    assert kolmogorov_sf(0.0) == 1.0 and kolmogorov_sf(0.2) == pytest.approx(1.0, abs=1e-12)


def test_kolmogorov_sf_series_agree_at_the_switch():
    # Both series are summed either side of 1.18; they are the same function.
    below, above = kolmogorov_sf(1.18 - 1e-9), kolmogorov_sf(1.18 + 1e-9)
    assert below == pytest.approx(above, rel=1e-7)
    lam = np.linspace(0.3, 3.0, 50)
    q = [kolmogorov_sf(x) for x in lam]
    assert all(a > b for a, b in zip(q, q[1:]))  # strictly decreasing


def test_ks_statistic_equals_brute_force_sup():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), np.round(rng.normal(0.3, 1.0, size=55), 1)  # y has ties
    grid = np.concatenate([x, y])
    brute = max(abs(np.mean(x <= t) - np.mean(y <= t)) for t in grid)
    assert ks_2samp(x, y).d == pytest.approx(brute, abs=1e-15)


def test_ks_known_value():
    # 0..9 vs 5..14: the CDFs differ by 1/2 on [4, 5); m = 5, lam = (sqrt 5 + 0.12 + 0.11/sqrt 5) / 2.
    r = ks_2samp(np.arange(10.0), np.arange(10.0) + 5)
    lam = (math.sqrt(5) + 0.12 + 0.11 / math.sqrt(5)) * 0.5
    assert r.d == 0.5 and r.p == pytest.approx(kolmogorov_sf(lam), rel=1e-12)
    assert (r.n_x, r.n_y) == (10, 10)


def test_ks_same_distribution_rarely_rejects_and_shift_is_found():
    rng = np.random.default_rng(1)
    # Under the null the p-value is (conservatively) uniform: about 5% of tests reject at 0.05.
    p = np.array([ks_2samp(rng.normal(size=100), rng.normal(size=100)).p for _ in range(400)])
    assert np.mean(p < 0.05) < 0.08
    shifted = ks_2samp(rng.normal(size=100), rng.normal(1.0, 1.0, size=100))
    assert shifted.p < 1e-6 and shifted.d > 0.3


def test_ks_identical_samples_and_bad_input():
    x = np.array([1.0, 2.0, 2.0, 3.0])
    assert ks_2samp(x, x).d == 0.0 and ks_2samp(x, x).p == 1.0
    with pytest.raises(ValueError):
        ks_2samp(np.array([]), x)
    with pytest.raises(ValueError):
        ks_2samp(np.array([1.0, np.nan]), x)


# ---------------------------------------------------------------- Fisher, intervals


def test_fisher_exact_known_values():
    assert fisher_exact(3, 4, 1, 4) == pytest.approx(0.4857142857, rel=1e-9)  # Fisher's tea tasting
    assert fisher_exact(8, 9, 2, 7) == pytest.approx(0.0349650350, rel=1e-9)  # [[8, 2], [1, 5]]
    assert fisher_exact(5, 100, 5, 100) == 1.0
    assert fisher_exact(2, 50, 9, 60) == pytest.approx(fisher_exact(9, 60, 2, 50), rel=1e-12)
    with pytest.raises(ValueError):
        fisher_exact(5, 4, 1, 4)


def test_interval_difference_p_by_hand():
    z = normal_quantile(0.975)
    # se_a = 0.1 / z, se_b = 0.05 / z (half-widths over z); difference 0.1.
    p = interval_difference_p(1.0, (0.9, 1.1), 0.9, (0.85, 0.95), 0.95)
    zdiff = 0.1 / math.hypot(0.1 / z, 0.05 / z)
    assert p == pytest.approx(2 * (1 - 0.5 * (1 + math.erf(zdiff / math.sqrt(2)))), rel=1e-9)
    assert interval_difference_p(0.5, (0.5, 0.5), 0.5, (0.5, 0.5), 0.95) == 1.0
    assert interval_difference_p(0.5, (0.5, 0.5), 0.6, (0.6, 0.6), 0.95) == 0.0
    assert math.isnan(interval_difference_p(0.5, (math.nan, 0.6), 0.6, (0.5, 0.7), 0.95))


# ---------------------------------------------------------------- --if-due


def schedule_plan(tmp_path: Path, period: str, started: datetime) -> Plan:
    """A plan with what --if-due reads: the run's config, id, start and model; the store."""
    cfg = RunConfig.model_validate({"quality_gate": {"drift_check": period}})
    old = load_record(V0)
    record = old.model_copy(update={"run_id": "r1", "started": started,
                                    "model": old.model.model_copy(update={"base": "m", "sha256": "a" * 64})})
    return Plan(record=record, candidate="rtn-w8", config=cfg, original=cfg, inputs=tmp_path / "in.jsonl",
                inputs_sha256="", suite=None, store=open_store(tmp_path / "q.db"), results_root=tmp_path)


def test_due_at_periods():
    last = datetime(2024, 1, 1, tzinfo=timezone.utc)
    assert due_at("weekly", last) == last + timedelta(days=7) == last + PERIODS["weekly"]
    assert due_at("daily", last) == last + timedelta(days=1)
    assert due_at("monthly", last) == last + timedelta(days=30)
    assert due_at("off", last) is None


def test_if_due_counts_from_the_run_then_from_the_last_check(tmp_path):
    now = datetime(2024, 3, 1, 6, 0, tzinfo=timezone.utc)
    p = schedule_plan(tmp_path, "weekly", started=now - timedelta(days=8))
    assert not_due(p, now) is None  # never checked, the run is 8 days old
    record_drift(p.store, DriftCheck("m", "a" * 64, "rtn-w8", "pass", now - timedelta(days=2)))
    message = not_due(p, now)
    assert message.startswith("not due") and "due 2024-03-06 06:00" in message  # 7 days after the check (Feb 28)
    assert not_due(p, now + timedelta(days=5)) is None
    # Another candidate's check does not count for this one.
    record_drift(p.store, DriftCheck("m", "a" * 64, "rtn-w4-g64", "pass", now))
    assert not_due(p, now + timedelta(days=5)) is None


def _task(t: TaskStats) -> TaskComparison:
    f = t.flips
    return TaskComparison(t.task, t.n, t.labeled, t.base, t.cand, t.recovery, t.recovery_ci, t.diff, t.diff_ci,
                          Flips(f.correct_to_wrong, f.wrong_to_correct, f.changed, f.n), t.flip_rate_ci, t.mcnemar_p,
                          float("inf") if t.min_detectable_drop is None else t.min_detectable_drop)


def comparison_as_recorded(record: RunRecord, name: str, kld_scale: float = 1.0) -> Comparison:
    """The candidate's comparison as the run measured it (its KLD mean scaled by kld_scale)."""
    vs = record.candidate(name).vs_baseline
    lo, hi = vs.kld_mean_ci
    kld = MeanQuantile(vs.kld_mean * kld_scale, (lo * kld_scale, hi * kld_scale), vs.kld_p99, vs.kld_p99_ci, 0.99, 510)
    o = vs.flips
    return Comparison(vs.recovery, {k: _task(t) for k, t in vs.tasks.items()},
                      Flips(o.correct_to_wrong, o.wrong_to_correct, o.answers_changed, o.items), kld, vs.top1_agreement)


def test_movements_read_the_original_run_record():
    record = load_record(V0)
    same = movements(record, "rtn-w4-g64", comparison_as_recorded(record, "rtn-w4-g64"), 0.95)
    assert [m.metric for m in same] == ["recovery", "flip_rate", "kld_mean"]
    before = record.candidate("rtn-w4-g64").vs_baseline
    assert [m.before for m in same] == [before.recovery, before.flips.rate, before.kld_mean]
    assert not any(m.moved for m in same) and all(m.alpha == pytest.approx(0.05 / 3) for m in same)
    moved = movements(record, "rtn-w4-g64", comparison_as_recorded(record, "rtn-w4-g64", kld_scale=3.0), 0.95)
    assert [m.metric for m in moved if m.moved] == ["kld_mean"]


def test_if_due_with_checks_off(tmp_path):
    p = schedule_plan(tmp_path, "off", started=datetime(2020, 1, 1, tzinfo=timezone.utc))
    assert "drift_check is off" in not_due(p)


# ---------------------------------------------------------------- through the command line


def quantgate(*args: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_missing_run_is_bad_input(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
    proc = quantgate("drift", "20240101T000000Z-deadbeef", "--inputs", str(tmp_path / "in.jsonl"),
                     "--store", str(tmp_path / "q.db"))
    assert_one_line_error(proc, "q.db")
    proc = quantgate("drift", str(tmp_path), "--inputs", str(tmp_path / "in.jsonl"))  # a directory, no results
    assert_one_line_error(proc, f"{tmp_path}: not a run directory (it holds no results.json)")


def sample(path: Path, source: Path, start: int, n: int) -> Path:
    """Lines start..start+n-1 of a shared eval file (a fresh sample of its distribution)."""
    lines = source.read_text(encoding="utf-8").splitlines()[start : start + n]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    """A real gate: the default model, RTN w8, on the first 60 PIQA items (floor 0.9, so that an
    interval of 60 items can clear it; speed measured on one short request only)."""
    if not (DATA / "piqa.jsonl").is_file():
        pytest.skip(f"shared eval data not found at {DATA}")
    tmp = tmp_path_factory.mktemp("drift")
    config = tmp / "gate.yaml"
    config.write_text(
        "candidates:\n  - {method: rtn, bits: 8}\n"
        f"quality_gate: {{eval_set: {DATA / 'piqa.jsonl'}, min_acceptable: 0.9, max_flip_rate: 0.1, min_items: 50}}\n"
        "evaluation: {limit: 60, ppl_windows: 2, window_tokens: 64}\n"
        "economics: {measure: false}\n"
    )
    results = tmp / "results"
    proc = quantgate("run", str(config), "--results-dir", str(results))
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (p.parent for p in results.glob("*/results.json"))
    return run_dir, tmp


def drift_json(out: str) -> dict:
    path = next(line.split("drift check: ")[1].split("  (")[0] for line in out.splitlines()
                if line.startswith("drift check: "))
    return json.loads(Path(path).read_text())


@pytest.mark.slow
@pytest.mark.heavy
def test_fresh_sample_of_the_same_distribution_shows_no_drift(gate_run):
    run_dir, tmp = gate_run
    fresh = sample(tmp / "piqa_fresh.jsonl", DATA / "piqa.jsonl", 300, 100)  # items 300-359 used: unseen
    proc = quantgate("drift", str(run_dir), "--inputs", str(fresh))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = drift_json(proc.stdout)
    assert report["outcome"] == "pass" and report["reasons"] == []
    assert report["candidate"] == "rtn-w8" and report["inputs"]["items"] == 60  # evaluation.limit
    assert {s["what"] for s in report["input_shift"]} == {"baseline NLL per token", "length (tokens)"}
    assert all(not s["shifted"] for s in report["input_shift"])
    assert {m["metric"] for m in report["movement"]} == {"recovery", "flip_rate", "kld_mean"}
    assert all(not m["moved"] for m in report["movement"])


@pytest.mark.slow
@pytest.mark.heavy
def test_another_task_is_reported_as_an_input_shift(gate_run):
    run_dir, tmp = gate_run
    arc = sample(tmp / "arc.jsonl", DATA / "arc_easy.jsonl", 0, 100)
    proc = quantgate("drift", str(run_dir), "--inputs", str(arc))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = drift_json(proc.stdout)
    assert report["outcome"] == "fail"
    shifted = [s for s in report["input_shift"] if s["shifted"]]
    assert shifted and all(s["p"] < 0.01 and s["d"] > 0.1 for s in shifted)
    assert any(r.startswith("input shift") for r in report["reasons"])
    assert "drift: fail" in proc.stdout


@pytest.mark.slow
@pytest.mark.heavy
def test_if_due_skips_a_check_made_today_and_history_lists_checks(gate_run):
    run_dir, tmp = gate_run
    fresh = sample(tmp / "piqa_fresh.jsonl", DATA / "piqa.jsonl", 300, 100)
    before = sorted(run_dir.parent.glob("drift-*"))
    proc = quantgate("drift", str(run_dir), "--inputs", str(fresh), "--if-due")
    # The run (and any check above) is minutes old: the weekly check is not due, nothing runs.
    assert proc.returncode == 0 and "not due" in proc.stdout, proc.stdout + proc.stderr
    assert sorted(run_dir.parent.glob("drift-*")) == before
    hist = quantgate("history", "--results-dir", str(run_dir.parent))
    assert hist.returncode == 0 and hist.stdout.count("drift:") == len(before)


@pytest.mark.slow
@pytest.mark.heavy
def test_bad_input_against_a_real_run(gate_run):
    run_dir, tmp = gate_run
    fresh = sample(tmp / "piqa_small.jsonl", DATA / "piqa.jsonl", 300, 100)
    assert_one_line_error(quantgate("drift", str(run_dir), "--inputs", str(fresh), "--candidate", "rtn-w3"),
                          "--candidate rtn-w3", "candidates: rtn-w8")
    assert_one_line_error(quantgate("drift", str(run_dir), "--inputs", str(tmp / "missing.jsonl")),
                          "missing.jsonl")
    few = sample(tmp / "piqa_few.jsonl", DATA / "piqa.jsonl", 300, 20)
    assert_one_line_error(quantgate("drift", str(run_dir), "--inputs", str(few)), "20 items", "min_items")


# ---------------------------------------------------------------- the check's config


def test_drift_config_keeps_rules_and_text_and_maps_the_task(tmp_path):
    from quantgate.drift import QUICK_ECONOMICS, drift_config

    original = RunConfig.model_validate({
        "candidates": [{"method": "rtn", "bits": 8}, {"method": "rtn", "bits": 4, "group_size": 64}],
        "quality_gate": {"eval_sets": [{"path": "/data/tickets.jsonl", "chat_template": True},
                                       {"path": "/data/held_out.txt"}],
                         "task_floors": {"tickets": 0.97}, "max_flip_rate": 0.05},
        "evaluation": {"limit": 200},
    })
    shipped = candidate(method="rtn", bits=4, group_size=64)
    cfg = drift_config(original, shipped, tmp_path / "prod.jsonl", {"tickets": 300})
    assert cfg.resolved_candidates == (shipped,)
    new, text = cfg.quality_gate.eval_sets
    assert (new.path, new.task, new.chat_template) == (str(tmp_path / "prod.jsonl"), "tickets", True)
    assert text.path == "/data/held_out.txt"  # KLD on the same held-out text
    gate_rules = ("task_floors", "max_flip_rate", "min_acceptable", "confidence", "drift_check")
    assert all(getattr(cfg.quality_gate, k) == getattr(original.quality_gate, k) for k in gate_rules)
    assert cfg.evaluation == original.evaluation and cfg.economics == QUICK_ECONOMICS

    as_text = drift_config(original, shipped, tmp_path / "prod.txt", {"tickets": 300})
    assert [e.path for e in as_text.quality_gate.eval_sets] == ["/data/tickets.jsonl", str(tmp_path / "prod.txt")]


def test_text_sample_needs_a_run_on_eval_files(tmp_path):
    from quantgate.drift import drift_config
    from quantgate.errors import UserError

    with pytest.raises(UserError, match="prod.txt: a text sample needs"):
        drift_config(RunConfig(), candidate(), tmp_path / "prod.txt", {"default-mc": 50})
