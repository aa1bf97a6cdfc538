"""A finished run as the parts of its record (quantgate.record): the pure helpers that compute
them from the run's arrays (KLD histogram, flipped items, noise floor, ladder)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from quantgate import record as rec
from quantgate.economics import Conditions, Cost, Economics, Estimate, LoadLevel, SpeedRatios
from quantgate.evals.datasets import ChoiceItem, ClozeItem, GenerationItem, PromptItem
from quantgate.evals.digest import eval_digest
from quantgate.evals.metrics import TaskComparison
from quantgate.gate import CandidateVerdict, ladder_step
from quantgate.models.load import file_sha256
from quantgate.run import ModelResult, RunResult


def run_id(result: RunResult) -> str:
    return f"{result.started:%Y%m%dT%H%M%SZ}-{result.config.digest()[:8]}"


def record_fields(result: RunResult) -> dict[str, Any]:
    """Every field of the run's RunRecord but its schema_version (see record.build_record)."""
    cfg, suite = result.config, result.prepared.suite
    verdicts = {v.name: v for v in result.decision.verdicts}
    econ, gate = cfg.economics, cfg.quality_gate
    return {
        "run_id": run_id(result), "started": result.started, "finished": result.finished,
        "config": cfg.model_dump(mode="json"), "config_digest": cfg.digest(), "environment": result.environment,
        "model": rec.ModelInfo(base=cfg.model.base, source=result.model_source, sha256=result.model_digest,
                               description=result.model_description, precision=result.precision),
        "eval": rec.EvalInfo(
            eval_set=suite.name, metric=gate.metric, items=len(suite.items), tasks=suite.tasks,
            duplicates=tuple(rec.Duplicate(task=t, id=i, same_as=f) for t, i, f in suite.duplicates),
            window_tokens=result.prepared.n_window_tokens,
            sha256=eval_digest(result.prepared)),  # the prepared items, labels and tokens (evals/digest.py)
        "calibration": result.calibration and rec.Calibration(**result.calibration),
        "noise_floor": noise_floor(result), "notes": tuple(result.notes),
        "machine": rec.Machine(memory_bandwidth_bytes_per_s=result.memory_bandwidth),
        "conditions": conditions(result.conditions),
        "economics_config": rec.EconomicsSettings(
            measure=econ.measure, requests=econ.requests, prompt_tokens=econ.prompt_tokens,
            new_tokens=econ.new_tokens, hardware_cost_per_hour=econ.hardware_cost_per_hour,
            tokens_per_month=econ.tokens_per_month, min_monthly_saving=econ.min_monthly_saving, rounds=econ.rounds),
        "quality_gate": rec.GateSettings(min_acceptable=gate.min_acceptable, max_flip_rate=gate.max_flip_rate,
                                         confidence=gate.confidence, task_floors=gate.task_floors),
        "seed": cfg.seed,
        "baseline": rec.ModelRecord(**_model(result.baseline)),
        "candidates": tuple(_candidate(result, c, verdicts[c.name]) for c in result.candidates),
        "failed_candidates": tuple(rec.FailedCandidate(name=f.name, settings=f.candidate.model_dump(mode="json"),
                                                       error=f.error) for f in result.failed),
        "strategy": cfg.strategy, "ladder": ladder(result) if cfg.strategy == "ladder" else None,
        "recommendation": rec.Recommendation(candidate=result.decision.recommended, reason=result.decision.reason),
        "exit_code": result.exit_code,
        "full_precision": result.full_precision and _full_precision(result, *result.full_precision),
    }


def _model(m: ModelResult) -> dict[str, Any]:
    return {
        "name": m.name, "weight_bytes": m.weight_bytes, "accuracy": m.metrics.accuracy,
        "accuracy_norm": m.metrics.accuracy_norm, "per_task": m.metrics.per_task, "perplexity": m.metrics.perplexity,
        "eval_seconds": round(m.scores.seconds, 3), "items_scored": m.scores.items_scored,
        "items_reused": m.scores.items_reused, "economics": economics(m.economics),
        "artifact": m.artifact and rec.Artifact(path=str(m.artifact), sha256=file_sha256(m.artifact),
                                                bytes=m.artifact.stat().st_size),
        "scheme": m.scheme,
        "bytes_counted": m.bytes_counted,
        "unservable": m.unservable,
    }


def _candidate(result: RunResult, m: ModelResult, verdict: CandidateVerdict) -> rec.CandidateRecord:
    c = m.candidate
    return rec.CandidateRecord(
        **_model(m), method=c.method, bits=c.quantized_bits,
        group_size=getattr(c, "group_size", None), symmetric=getattr(c, "symmetric", None),  # not every method has them
        settings=c.model_dump(mode="json"), modules_changed=m.modules_changed,
        quantize_seconds=round(m.quantize_seconds, 3), vs_baseline=comparison(m),
        gate=rec.Gate(passed=verdict.passed, rules=tuple(map(rec.rule_record, verdict.rules))),
        flipped_items=flipped_items(result, m), aa_check=c.is_baseline,
    )


def _full_precision(result: RunResult, m: ModelResult, verdict: CandidateVerdict) -> rec.CandidateRecord:
    """The checkpoint in fp32 against a lower-precision baseline, recorded like a candidate."""
    return rec.CandidateRecord(
        **_model(m), method="precision", bits=None, group_size=None, symmetric=None, settings=None,
        modules_changed=0, quantize_seconds=None, vs_baseline=comparison(m),
        gate=rec.Gate(passed=verdict.passed, rules=tuple(map(rec.rule_record, verdict.rules))),
        flipped_items=flipped_items(result, m), aa_check=False,
    )


def ladder(result: RunResult) -> tuple[rec.Rung, ...]:
    """Each rung in order: "pass", "fail", "not needed" (a cheaper method held its scheme) or
    "not measured" (after the rung where quality broke); see gate.ladder_step."""
    verdicts = {v.name: v for v in result.decision.verdicts}
    rungs, last = [], None
    for c in result.config.resolved_candidates:
        v = verdicts.get(c.label)
        if v is None:
            status = "not needed" if ladder_step(last, c.scheme) == "skip" else "not measured"
        else:
            status, last = ("pass" if v.passed else "fail"), (c.scheme, v.passed)
        rungs.append(rec.Rung(name=c.label, status=status))
    return tuple(rungs)


def economics(e: Economics | None) -> rec.Economics | None:
    if e is None:
        return None
    t = e.throughput
    latency = t.latency_s if t else {}
    return rec.Economics(
        engine=e.engine, simulated=e.simulated, artifact_bytes=e.artifact_bytes,
        peak_rss_bytes=e.peak_rss_bytes and round(e.peak_rss_bytes.value), peak_rss_bytes_ci=_ci(e.peak_rss_bytes),
        prefill_tokens_per_s=t and t.prefill_tokens_per_s.value,
        prefill_tokens_per_s_ci=_ci(t and t.prefill_tokens_per_s),
        decode_tokens_per_s=t and t.decode_tokens_per_s.value, decode_tokens_per_s_ci=_ci(t and t.decode_tokens_per_s),
        decode_tokens_per_s_range=t and t.decode_range,
        latency_s={k: v.value for k, v in latency.items()} or None,
        latency_s_ci={k: v.ci for k, v in latency.items()} or None,
        roofline_fraction=e.roofline_fraction, load=tuple(map(_level, e.load)), cost=e.cost and _cost(e.cost),
        vs_baseline=e.vs_baseline and _ratios(e.vs_baseline), rounds=e.rounds or None, requests=t and t.requests,
    )


def _ci(e: Estimate | None) -> tuple[float, float] | None:
    return e.ci if e is not None else None


def _ratio(e: Estimate | None) -> rec.Ratio | None:
    return e and rec.Ratio(value=e.value, ci=e.ci)


def _ratios(r: SpeedRatios) -> rec.SpeedRatios:
    return rec.SpeedRatios(decode=_ratio(r.decode), prefill=_ratio(r.prefill),
                           latency_s={k: _ratio(v) for k, v in r.latency.items()},
                           peak_rss=_ratio(r.peak_rss), under_load=_ratio(r.under_load))


def _level(level: LoadLevel) -> rec.LoadLevel:
    ttft = level.ttft_s or {}
    return rec.LoadLevel(
        batch_size=level.batch_size, batched=level.batched, tokens_per_s=level.tokens_per_s.value,
        tokens_per_s_ci=level.tokens_per_s.ci, latency_s={k: v.value for k, v in level.latency_s.items()},
        latency_s_ci={k: v.ci for k, v in level.latency_s.items()},
        ttft_s={k: v.value for k, v in ttft.items()} or None,
        requests=level.requests, vs_baseline=_ratio(level.vs_baseline),
        replica_tokens_per_s=level.replica_tokens_per_s)


def _cost(c: Cost) -> rec.Cost:
    return rec.Cost(per_million_tokens=c.per_million_tokens.value, per_million_tokens_ci=c.per_million_tokens.ci,
                    monthly=c.monthly.value, monthly_saving=c.monthly_saving.value,
                    monthly_saving_ci=c.monthly_saving.ci, worth_it=c.worth_it, note=c.note)


def conditions(c: Conditions | None) -> rec.Conditions | None:
    return c and rec.Conditions(threads=c.threads, cores=c.cores, cpu=c.cpu, load_before=c.load_before,
                                load_during=c.load_during, rounds=c.rounds,
                                interleaved=c.interleaved)


def noise_floor(result: RunResult) -> rec.NoiseFloor | None:
    f = result.noise_floor
    if f is None:
        return None
    return rec.NoiseFloor(engine=f.engine, reference=f.reference, kld_mean=float(f.kld.mean()),
                          kld_p99=float(np.quantile(f.kld, 0.99)), top1_agreement=float(f.top1_agree.mean()),
                          tokens=int(f.kld.size),
                          truncation_kld_mean=None if f.truncation_kld is None else float(f.truncation_kld.mean()))


def comparison(m: ModelResult) -> rec.Comparison:
    c = m.comparison
    return rec.Comparison(
        recovery=c.recovery, tasks={name: _task(t) for name, t in c.tasks.items()},
        flips=rec.Flips(correct_to_wrong=c.flips.correct_to_wrong, wrong_to_correct=c.flips.wrong_to_correct,
                        answers_changed=c.flips.changed, rate=c.flips.rate, items=c.flips.n),
        kld_mean=c.kld.mean, kld_mean_ci=c.kld.mean_ci, kld_p99=c.kld.quantile, kld_p99_ci=c.kld.quantile_ci,
        top1_agreement=c.top1_agreement, kld_hist=kld_histogram(m.scores.kld),
    )


def kld_histogram(kld: np.ndarray | None, bins: int = 30) -> rec.KldHistogram | None:
    """Per-token KL divergences counted in log-spaced bins from 1e-5 (values below it, zeros
    included, fall in the first bin) to the largest value."""
    if kld is None or not len(kld):
        return None
    low = 1e-5
    edges = np.geomspace(low, max(float(kld.max()), low * 10) * 1.0001, bins + 1)
    counts, _ = np.histogram(np.clip(kld, low, None), bins=edges)
    return rec.KldHistogram(edges=tuple(edges.tolist()), counts=tuple(counts.tolist()))


def _task(t: TaskComparison) -> rec.TaskStats:
    fields = asdict(t)
    fields["flips"] = rec.TaskFlips(**fields["flips"], rate=t.flips.rate)
    return rec.TaskStats(**fields)


def flipped_items(result: RunResult, m: ModelResult) -> tuple[rec.FlippedItem, ...]:
    """Items whose correctness changed (labeled) or whose output changed (unlabeled prompts): the
    "edge" inputs, with both answers and the gold."""
    base = result.baseline.metrics
    labeled = ~np.isnan(base.score)
    changed = np.flatnonzero(np.where(labeled, base.correct != m.metrics.correct,
                                      np.array(base.answers, dtype=object) != np.array(m.metrics.answers, dtype=object)))
    items = result.prepared.suite.items
    return tuple(
        rec.FlippedItem(
            id=items[i].id, task=items[i].task, prompt=items[i].prompt, gold=items[i].gold_answer,
            baseline_answer=base.answers[i], candidate_answer=m.metrics.answers[i],
            direction=("correct->wrong" if base.correct[i] else "wrong->correct") if labeled[i] else "output changed",
        )
        for i in changed
    )


KINDS = {ChoiceItem: "choice", ClozeItem: "cloze", GenerationItem: "generation", PromptItem: "prompt"}


def item_records(result: RunResult) -> list[rec.ItemRecord]:
    """Every item of the run's suite with the baseline's and each candidate's outcome."""
    prepared, items = result.prepared, result.prepared.suite.items
    models = [result.baseline, *result.candidates]
    out = []
    for i, item in enumerate(items):
        a, b = int(prepared.offsets[i]), int(prepared.offsets[i + 1])
        labeled = not isinstance(item, PromptItem)
        scores = {m.name: rec.ItemScore(
            answer=m.metrics.answers[i], score=m.metrics.score[i] if labeled else None,
            correct=bool(m.metrics.correct[i]) if labeled else None,
            option_ll=tuple(m.scores.option_ll[a:b].tolist()) if b > a else None,
            greedy=tuple(m.scores.option_greedy[a:b].tolist()) if b > a else None) for m in models}
        out.append(rec.ItemRecord(index=i, id=item.id, task=item.task, kind=KINDS[type(item)], prompt=item.prompt,
                                  gold=item.gold_answer if labeled else None, models=scores))
    return out
