"""A stored gate run (results.json) as the inputs it was computed from, each checked against
what the run recorded: the config (by digest), the baseline weights (sha256), the eval set (the
prepared suite's digest) and the calibration windows (sha256). A re-created candidate goes
through the same code path as the run (make_candidate, same seed, same calibration)."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from quantgate.config import RunConfig, error_text
from quantgate.engines import registry as backends
from quantgate.errors import UserError
from quantgate.evals.datasets import load_suite
from quantgate.evals.digest import eval_digest
from quantgate.evals.tasks import PreparedSuite, prepare
from quantgate.methods.apply import CandidateModel, make_candidate, spec_of, weight_bytes
from quantgate.methods.calibrate import calibration_set
from quantgate.methods.registry import MethodConfig
from quantgate.models.load import Baseline, load_baseline
from quantgate.record import CandidateRecord, RunRecord

if TYPE_CHECKING:
    from quantgate.engines.registry import Progress


@dataclass(frozen=True)
class StoredRun:
    path: Path  # results.json
    record: RunRecord
    config: RunConfig

    def candidate(self, name: str) -> tuple[MethodConfig, CandidateRecord]:
        """The named candidate's settings and its record."""
        found = self.record.candidate(name)
        if found is None:
            failed = {c.name for c in self.record.failed_candidates}
            names = ", ".join(c.name for c in self.record.candidates) or "none"
            why = "its engine crashed in that run" if name in failed else f"candidates: {names}"
            raise UserError(f"{self.path}: no evaluated candidate '{name}' ({why})")
        configs = {c.label: c for c in self.config.resolved_candidates}
        if name not in configs:
            raise UserError(f"{self.path}: candidate '{name}' is not in the stored config")
        return configs[name], found


def read_config(config: dict[str, Any], config_digest: str, where: Path) -> RunConfig:
    """A run's config from its JSON and the digest recorded beside it. The digest is checked on the
    JSON as stored (RunConfig.digest's canonical form), so a config written before fields were
    added to the schema still matches; it is then read with the current schema's defaults."""
    stored = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    if stored != config_digest:
        raise UserError(f"{where}: the stored config does not match its config_digest (edited?)")
    return run_config(config, where)


def run_config(config: dict[str, Any], where: Path) -> RunConfig:
    """`config` (JSON) validated as a RunConfig; UserError naming the key."""
    try:
        return RunConfig.model_validate(config)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"{where}: config.{'.'.join(map(str, first['loc']))}: {error_text(first)}") from None


def load_stored_run(run_dir: Path) -> StoredRun:
    """The run in `run_dir` (or its newest run below it), its config checked against its digest as
    stored (before any upgrade of an older record's config)."""
    from quantgate.report.files import RESULTS, find_run, load_results

    run = find_run(run_dir)
    record = load_results(run, check_config=True)
    return StoredRun(run / RESULTS, record, run_config(record.config, run / RESULTS))


def checked_baseline(cfg: RunConfig, model_sha256: str, where: Path) -> Baseline:
    """model.base loaded, refused when its weights are not the ones the run measured."""
    baseline = load_baseline(cfg.model.base, cfg.precision)
    if baseline.digest != model_sha256:
        raise UserError(f"{where}: model.base '{cfg.model.base}' now has sha256 {baseline.digest[:16]}…, "
                        f"the run measured {model_sha256[:16]}…")
    return baseline


def prepared_suite(cfg: RunConfig, tokenizer) -> PreparedSuite:
    """The eval suite tokenized as the run did (run.execute)."""
    ev = cfg.evaluation
    suite = load_suite(cfg.quality_gate, limit=ev.limit, cloze_items=ev.cloze_items, seed=cfg.seed)
    return prepare(suite, tokenizer, window_tokens=ev.window_tokens, n_windows=ev.ppl_windows)


def checked_eval(prepared: PreparedSuite, recorded: str | None, where: Path) -> str:
    """The prepared suite's digest, refused when it differs from a recorded one."""
    digest = eval_digest(prepared)
    if recorded is not None and recorded != digest:
        raise UserError(f"{where}: the eval set no longer matches the one the run measured "
                        f"(eval sha256 {digest[:16]}… vs recorded {recorded[:16]}…)")
    return digest


@dataclass(frozen=True)
class Recreated:
    baseline: Baseline
    prepared: PreparedSuite
    eval_sha256: str
    candidate: MethodConfig
    record: CandidateRecord
    made: CandidateModel | None  # None for llama.cpp candidates (their artifact is the GGUF file)


def recreate(run: StoredRun, name: str, *, make: bool = True, progress: Progress | None = None,
             say: Callable[[str], None] = lambda text: None) -> Recreated:
    """The candidate `name` after checking the baseline and eval set against the run: rebuilt from
    the codes its evaluated artifact holds when its engine keeps them (_from_artifact), else made
    again from the stored config (_made_again, calibration checked too). `progress` sees the making
    block by block; `say` hears each step."""
    cfg, where = run.config, run.path
    cand, record = run.candidate(name)
    say(f"loading the baseline {cfg.model.base} and checking its sha256 against the run's")
    baseline = checked_baseline(cfg, run.record.model.sha256, where)
    prepared = prepared_suite(cfg, baseline.tokenizer)
    digest = checked_eval(prepared, run.record.eval.sha256, where)
    say(f"eval set matches the run's ({len(prepared.suite.items)} items)")
    made = None
    if make:
        made = _from_artifact(run, cand, record, baseline, say) or _made_again(run, cand, record, baseline, prepared,
                                                                               progress, say)
    return Recreated(baseline, prepared, digest, cand, record, made)


def _from_artifact(run: StoredRun, cand: MethodConfig, record: CandidateRecord, baseline: Baseline,
                   say: Callable[[str], None]) -> CandidateModel | None:
    """The candidate rebuilt from the weights its evaluated artifact holds (its exact codes, on an
    engine whose artifacts keep them: Backend.stored_weights), when its method changed nothing
    but those weights; None otherwise (then it is made again)."""
    if record.artifact is None or not cand.weights_alone:
        return None
    engine = (getattr(cand, "serving", None) or run.config.serving).engine
    weights = backends.entry(engine).load().stored_weights(Path(record.artifact.path), baseline)
    if not weights or len(weights) != record.modules_changed:  # (a composition counts a linear per step)
        return None
    say(f"reusing {record.name}'s codes from the artifact it was evaluated as ({record.artifact.path}); "
        "nothing is quantized again")
    model = copy.deepcopy(baseline.model)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)
    specs = {id(model.get_submodule(n).weight): spec_of(cand.quantizer) for n in weights}
    total, qparams = weight_bytes(model, specs)
    return CandidateModel(model=model, modules_changed=len(weights), weight_bytes=total, quantized_params=qparams)


def _made_again(run: StoredRun, cand: MethodConfig, record: CandidateRecord, baseline: Baseline,
                prepared: PreparedSuite, progress: Progress | None, say: Callable[[str], None]) -> CandidateModel:
    """The candidate made again from the stored config (same code path, seed and calibration as
    the run); its changed-module count (and, where the weights themselves were counted, its size)
    must match the record."""
    cfg, where, name = run.config, run.path, record.name
    calib = None
    say(f"making {name} again from the stored config (seed {cfg.seed}"
        + (", calibration windows checked against the run's sha256)" if cand.needs_calibration else ")"))
    if cand.needs_calibration:  # the one answer the run gave too (MethodConfig.calibration_needs)
        calib = calibration_set(baseline.tokenizer, cfg.calibration, prepared.suite.texts())
        recorded = run.record.calibration and run.record.calibration.sha256
        if recorded != calib.digest:
            raise UserError(f"{where}: the calibration windows no longer match the run's "
                            f"(sha256 {calib.digest[:16]}… vs recorded {str(recorded)[:16]}…)")
    blocks = len(baseline.model.get_submodule(baseline.arch.blocks)) if calib is not None else 1
    step = progress(name, blocks) if progress is not None else (lambda n: None)  # one step per calibrated block
    made = make_candidate(baseline.model, baseline.arch, cand, calib, seed=cfg.seed, on_block=lambda i: step(1))
    if calib is None:
        step(1)
    # an engine's artifact (an ONNX graph) or served checkpoint (vLLM's: BackendEntry.sizes_from_checkpoint)
    # has a size of its own; otherwise the weights were counted
    counted = record.artifact is None and not backends.entry(run.config.serving.engine).sizes_from_checkpoint
    got = (made.weight_bytes if counted else record.weight_bytes, made.modules_changed)
    if got != (record.weight_bytes, record.modules_changed):
        raise UserError(f"{where}: candidate {name} re-created with (bytes, modules changed) {got}, "
                        f"the run recorded ({record.weight_bytes}, {record.modules_changed})")
    return made
