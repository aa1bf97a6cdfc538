"""A stored gate run (results.json) as the inputs it was computed from, each checked against
what the run recorded: the config (by digest), the baseline weights (sha256), the eval set (the
prepared suite's digest) and the calibration windows (sha256). A re-created candidate goes
through the same code path as the run (make_candidate, same seed, same calibration)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from quantgate.config import RunConfig, error_text
from quantgate.errors import UserError
from quantgate.evals.datasets import load_suite
from quantgate.evals.digest import eval_digest
from quantgate.evals.tasks import PreparedSuite, prepare
from quantgate.methods.apply import CandidateModel, make_candidate
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


def recreate(run: StoredRun, name: str, *, make: bool = True, sized: bool = True, progress: Progress | None = None,
             say: Callable[[str], None] = lambda text: None) -> Recreated:
    """The candidate `name` made again from the stored config, after checking the baseline,
    eval set and calibration data against the run; its size and changed-module count must match
    the recorded ones. `progress` sees the making block by block; `say` hears each step."""
    cfg, where = run.config, run.path
    cand, record = run.candidate(name)
    say(f"loading the baseline {cfg.model.base} and checking its sha256 against the run's")
    baseline = checked_baseline(cfg, run.record.model.sha256, where)
    prepared = prepared_suite(cfg, baseline.tokenizer)
    digest = checked_eval(prepared, run.record.eval.sha256, where)
    say(f"eval set matches the run's ({len(prepared.suite.items)} items)")
    made = None
    if make:
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
        got = (made.weight_bytes if sized else record.weight_bytes, made.modules_changed)
        if got != (record.weight_bytes, record.modules_changed):
            raise UserError(f"{where}: candidate {name} re-created with (bytes, modules changed) {got}, "
                            f"the run recorded ({record.weight_bytes}, {record.modules_changed})")
    return Recreated(baseline, prepared, digest, cand, record, made)
