"""A synthetic results.json (schema version 0, as quantgate wrote it before the typed record) and its
RunRecord (quantgate.record) for the report tests:
four candidates on a bit-width ladder, economics on some (one simulated), per-token KLD histograms on
some, a measured engine noise floor, and flipped items whose text needs escaping. The numbers are
derived from a few inputs per candidate so that the rules, rates and recommendation agree."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from quantgate.record import RunRecord, load_record

N_ITEMS = 400
BASE_ACC = 0.80
MIN_ACCEPTABLE = 0.94
MAX_FLIP_RATE = 0.05
BASE_BYTES = 538_060_032
KLD_EDGES = [float(v) for v in np.logspace(-4, 2, 13)]  # 12 log-spaced bins, 1e-4 .. 1e2 nats
HOSTILE = "<script>alert('x')</script> & \"quotes\" | pipes *stars*"


def _rule(rule: str, value: float, interval: list[float], threshold: float, at_least: bool) -> dict[str, Any]:
    lo, hi = interval
    if at_least:
        status = "pass" if lo >= threshold else "fail" if hi < threshold else "inconclusive"
    else:
        status = "pass" if hi <= threshold else "fail" if lo > threshold else "inconclusive"
    return {"rule": rule, "status": status, "value": value, "interval": interval, "threshold": threshold,
            "passed": status == "pass"}


def _kld_hist(kld_mean: float, seed: int) -> dict[str, list]:
    # per-token KLD drawn from a log-normal whose mean is kld_mean (sigma 1.2)
    sigma = 1.2
    draws = np.random.default_rng(seed).lognormal(np.log(kld_mean) - sigma**2 / 2, sigma, 5000)
    counts, _ = np.histogram(np.clip(draws, KLD_EDGES[0], KLD_EDGES[-1]), bins=KLD_EDGES)
    return {"edges": KLD_EDGES, "counts": [int(c) for c in counts]}


def _economics(bits: int, *, simulated: bool, engine: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Decode speed bound by bytes read per token: fewer bits, faster (with a fixed overhead)."""
    artifact = int(BASE_BYTES * bits / 32)
    decode = 1.0 / (artifact / 40e9 + 0.004)  # 40 GB/s effective, 4 ms overhead per token
    lat = {"p50": 64 / decode, "p95": 1.2 * 64 / decode, "p99": 1.4 * 64 / decode}
    load = [{"batch_size": b, "latency_s": lat, "tokens_per_s": decode * b / (1 + 0.05 * b)} for b in (1, 4, 16)]
    econ = {"engine": engine, "simulated": simulated, "artifact_bytes": artifact, "peak_rss_bytes": artifact + 90_000_000,
            "prefill_tokens_per_s": 12 * decode, "decode_tokens_per_s": decode, "latency_s": lat,
            "decode_tokens_per_s_range": [0.9 * decode, 1.08 * decode],
            "roofline_fraction": decode * artifact / 50e9, "load": load}
    per_million = 2.0 / (decode * 3600) * 1e6  # $2/hour
    base_per_million = 2.0 / ((1.0 / (BASE_BYTES / 40e9 + 0.004)) * 3600) * 1e6
    saving = (base_per_million - per_million) * 300.0  # 300M tokens / month
    cost = {"per_million_tokens": per_million, "monthly": per_million * 300.0, "monthly_saving": saving,
            "worth_it": saving >= 50.0, "note": "saving under the $50/month bar" if saving < 50.0 else ""}
    return econ, cost


def _candidate(name: str, method: str, bits: int, group: int | None, acc: float, c2w: int, w2c: int,
               kld_mean: float, top1: float, seed: int) -> dict[str, Any]:
    recovery = acc / BASE_ACC
    rate = (c2w + w2c) / N_ITEMS
    half = 1.96 * np.sqrt(max(rate, 1e-3) / N_ITEMS) / BASE_ACC
    rec_ci = [recovery - half, min(recovery + half, 1.02)]
    flip_ci = [max(rate - half * BASE_ACC, 0.0), rate + half * BASE_ACC]
    flips = {"correct_to_wrong": c2w, "wrong_to_correct": w2c, "answers_changed": c2w + w2c, "rate": rate,
             "items": N_ITEMS}
    overall = {"task": "overall", "n": N_ITEMS, "labeled": True, "base": BASE_ACC, "cand": acc, "recovery": recovery,
               "recovery_ci": rec_ci, "diff": acc - BASE_ACC, "diff_ci": [acc - BASE_ACC - 0.02, acc - BASE_ACC + 0.02],
               "flips": {"correct_to_wrong": c2w, "wrong_to_correct": w2c, "changed": c2w + w2c, "n": N_ITEMS,
                         "rate": rate},
               "flip_rate_ci": flip_ci, "mcnemar_p": 0.01, "min_detectable_drop": 0.03}
    rules = [_rule(f"accuracy recovery >= {MIN_ACCEPTABLE}", recovery, rec_ci, MIN_ACCEPTABLE, True),
             _rule(f"flip rate <= {MAX_FLIP_RATE}", rate, flip_ci, MAX_FLIP_RATE, False)]
    items = [{"id": f"item-{seed}-{i}", "task": "default-mc", "prompt": f"Question {i}: {HOSTILE}\nAnswer:",
              "gold": "right", "baseline_answer": "right" if i < c2w else "wrong",
              "candidate_answer": "wrong" if i < c2w else "right",
              "direction": "correct->wrong" if i < c2w else "wrong->correct"} for i in range(c2w + w2c)]
    return {
        "name": name, "weight_bytes": int(BASE_BYTES * bits / 32) + 30_000_000, "accuracy": acc,
        "accuracy_norm": acc - 0.01, "per_task": {"default-mc": acc}, "perplexity": 17.0 / recovery**4,
        "eval_seconds": 10.0, "method": method, "bits": bits, "group_size": group, "symmetric": group is None,
        "settings": {"method": method, "bits": bits, "group_size": group}, "modules_changed": 210,
        "quantize_seconds": 0.5,
        "vs_baseline": {"recovery": recovery, "tasks": {"overall": overall}, "flips": flips, "kld_mean": kld_mean,
                        "kld_mean_ci": [kld_mean * 0.9, kld_mean * 1.1], "kld_p99": kld_mean * 6,
                        "kld_p99_ci": [kld_mean * 5, kld_mean * 7], "top1_agreement": top1},
        "gate": {"passed": all(r["passed"] for r in rules), "rules": rules},
        "flipped_items": items,
    }


def synthetic_results(*, economics: bool = True, noise_floor: bool = True, kld_hist: bool = True) -> dict[str, Any]:
    """The full synthetic run; each flag off removes that optional part (as an older or cheaper run
    would lack it)."""
    cands = [
        _candidate("rtn-w8", "rtn", 8, None, 0.797, 3, 2, 0.003, 0.965, 1),
        _candidate("gptq-w4-g128", "gptq", 4, 128, 0.770, 26, 14, 0.21, 0.78, 2),
        _candidate("rtn-w4-g64", "rtn", 4, 64, 0.760, 30, 14, 0.31, 0.70, 3),
        _candidate("rtn-w2-g64", "rtn", 2, 64, 0.25, 230, 10, 10.1, 0.006, 4),
    ]
    cands[2]["flipped_items"].append({"id": "free-1", "task": "prompts", "prompt": "Say hi", "gold": None,
                                      "baseline_answer": "hi", "candidate_answer": "hello",
                                      "direction": "output changed"})
    passing = [c for c in cands if c["gate"]["passed"]]
    rec = min(passing, key=lambda c: c["weight_bytes"])["name"] if passing else None
    results = {
        "run_id": "20260101T000000Z-deadbeef", "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-01T00:01:30+00:00",
        "config": {"seed": 0, "quality_gate": {"metric": "accuracy", "min_acceptable": MIN_ACCEPTABLE,
                                               "max_flip_rate": MAX_FLIP_RATE, "confidence": 0.95}},
        "config_digest": "ab" * 32,
        "environment": {"quantgate": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu", "machine": "Linux x86_64"},
        "model": {"base": "smollm2-135m-instruct", "source": "/models/smollm2.gguf", "sha256": "cd" * 32,
                  "description": "SmolLM2-135M-Instruct"},
        "eval": {"eval_set": "default", "metric": "accuracy", "items": N_ITEMS, "tasks": {"default-mc": N_ITEMS},
                 "duplicates": [], "window_tokens": 2048},
        "calibration": {"source": "default", "sha256": "ef" * 32, "shape": [128, 256]},
        "baseline": {"name": "baseline", "weight_bytes": BASE_BYTES, "accuracy": BASE_ACC, "accuracy_norm": 0.79,
                     "per_task": {"default-mc": BASE_ACC}, "perplexity": 17.0, "eval_seconds": 20.0},
        "candidates": cands,
        "failed_candidates": [{"name": "awq-w3-g128", "settings": {"method": "awq", "bits": 3, "group_size": 128},
                               "error": "the engine crashed loading the artifact (exit 139)"}],
        "recommendation": {"candidate": rec, "reason": "the smallest candidate that holds every rule"},
        "exit_code": 0 if rec else 1,
    }
    cands[0]["artifact"] = {"path": "/results/run/rtn-w8.gguf", "sha256": "12" * 32, "bytes": cands[0]["weight_bytes"]}
    if economics:
        _add_economics(results)
    if noise_floor:
        results["noise_floor"] = {"engine": "llama.cpp", "reference": "torch", "kld_mean": 0.0008, "kld_p99": 0.006,
                                  "top1_agreement": 0.995, "tokens": 2048}
    if kld_hist:
        for i, c in enumerate(cands[:2]):
            c["vs_baseline"]["kld_hist"] = _kld_hist(c["vs_baseline"]["kld_mean"], seed=i)
    return copy.deepcopy(results)


def _add_economics(results: dict[str, Any]) -> None:
    """Economics on the baseline and the first three candidates; the GPTQ one ran fake-quantized in
    PyTorch (simulated); the 2-bit one has none. Cost sits inside economics (as quantgate writes
    it), except the baseline's, beside it (the other place a reader accepts)."""
    results["baseline"]["economics"], results["baseline"]["cost"] = _economics(32, simulated=False, engine="llama.cpp")
    for c in results["candidates"][:3]:
        sim = c["method"] == "gptq"
        econ, cost = _economics(c["bits"], simulated=sim, engine="torch" if sim else "llama.cpp")
        c["economics"] = {**econ, "cost": cost}
    results["machine"] = {"memory_bandwidth_bytes_per_s": 40e9}
    results["economics_config"] = {"hardware_cost_per_hour": 2.0, "tokens_per_month": 300e6, "min_monthly_saving": 50.0}


def synthetic_record(**parts: bool) -> RunRecord:
    """synthetic_results(**parts) loaded as a RunRecord (through record.upgrade)."""
    return load_record(synthetic_results(**parts))


def measured_speed_models(results: RunRecord) -> list[str]:
    """Names of the models with a real (not simulated) decode speed."""
    return [m.name for m in results.models if m.economics and not m.economics.simulated
            and m.economics.decode_tokens_per_s is not None]
