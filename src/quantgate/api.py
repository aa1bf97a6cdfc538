"""quantgate as a library: the same run as `quantgate run`, returning the typed record.

    import quantgate
    record = quantgate.run("quantgate.yaml")          # a YAML path, a dict of the same keys, or a RunConfig
    record.recommended                               # the candidate that holds the gate, or None
    for c in record.candidates:
        print(c.name, c.gate.passed, c.vs_baseline.recovery, c.vs_baseline.kld_mean)

Every run writes what the command writes: <results_dir>/<run id>/ with results.json (the record
as JSON), items.jsonl (every item's scores for every model), report.html and summary.md, and a
row in the store. The run directory appears complete or not at all: it is written under a
temporary name and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantgate.config import RunConfig, check_supported, config_from_mapping, load_config
from quantgate.errors import UserError

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine as Store

    from quantgate.engines.registry import Progress
    from quantgate.record import RunRecord
    from quantgate.run import RunResult

ConfigLike = RunConfig | Mapping[str, Any] | str | os.PathLike | None


@dataclass(frozen=True)
class RunOutput:
    """A finished run: its record, where its files went, and the store it is recorded in."""

    record: RunRecord
    run_dir: Path
    files: dict[str, Path]  # "results", "items", "html", "markdown"
    store: str  # the store's URL, password hidden


def as_config(config: ConfigLike) -> RunConfig:
    """A RunConfig from a RunConfig, a mapping of the YAML's keys, or a YAML path (None: the
    packaged default run). Bad input is a UserError naming the key."""
    if isinstance(config, RunConfig):
        return config
    if isinstance(config, Mapping):
        return config_from_mapping(config)
    return load_config(config)


def run(config: ConfigLike = None, *, results_dir: str | os.PathLike | None = None, store: str | None = None,
        resume: bool = False, progress: Progress | None = None) -> RunRecord:
    """Evaluate the baseline and every candidate of `config`, apply the gate, write the run's files
    and record it; returns the run's RunRecord (quantgate.record). `results_dir` overrides the
    config's; `store` is a store URL or SQLite path (default: $QUANTGATE_STORE, the config's,
    <results_dir>/quantgate.db); `progress` is a sink (description, total) -> advance(n), e.g. a
    quantgate.report.progress.Feedback (default: silent). Raises quantgate.errors.UserError for
    bad input."""
    return run_to_files(config, results_dir=results_dir, store=store, resume=resume, progress=progress).record


def run_to_files(config: ConfigLike = None, *, results_dir: str | os.PathLike | None = None,
                 store: str | None = None, resume: bool = False, progress: Progress | None = None) -> RunOutput:
    """`run`, also saying where the files went (what the CLI prints)."""
    cfg = as_config(config)
    check_supported(cfg)  # before the heavy imports below: bad input answers at once

    from quantgate.run import execute
    from quantgate.store import open_store, store_location

    root = results_root(Path(results_dir) if results_dir is not None else Path(cfg.results_dir))
    db = open_store(store_location(store, cfg.store, root))  # a bad store fails now, not after the run
    result = execute(cfg, progress or _silent, workdir=root / "engine-logs", store=db, resume=resume)
    return write_run(result, root, db)


def _silent(description: str, total: int):
    return lambda n: None


def check_results_root(path: Path) -> None:
    """UserError when the results directory (or a folder above it) is a file."""
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise UserError(f"results_dir {path}: {part} is a file, not a directory")


def results_root(path: Path) -> Path:
    """The results directory, made if missing; UserError when it (or a folder above it) is a file
    or cannot be made."""
    check_results_root(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"results_dir {path}: cannot make it ({e.strerror or e})") from None
    return path.resolve()


def write_run(result: RunResult, root: Path, db: Store) -> RunOutput:
    """The run's files, written under a temporary name and renamed into <root>/<run id>, then the
    run recorded in the store (with results.json and items.jsonl as artifacts)."""
    from quantgate.models.load import file_sha256
    from quantgate.record import build_record, dump_items, dump_record
    from quantgate.report.data import item_records
    from quantgate.report.files import ITEMS, RESULTS, write_reports
    from quantgate.store import Artifact, record_run

    record = build_record(result)
    run_dir, partial = root / record.run_id, root / f".{record.run_id}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        (partial / RESULTS).write_text(dump_record(record), encoding="utf-8")
        (partial / ITEMS).write_text(dump_items(item_records(result)), encoding="utf-8")
        reports = write_reports(record, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if run_dir.exists():
        raise UserError(f"{run_dir}: a run directory of that id exists already; this run's files are in {partial}")
    partial.rename(run_dir)
    files = {"results": run_dir / RESULTS, "items": run_dir / ITEMS,
             **{kind: run_dir / path.name for kind, path in reports.items()}}
    record_run(db, record, artifacts=[Artifact(kind, str(files[kind]), sha256=file_sha256(files[kind]),
                                               bytes=files[kind].stat().st_size) for kind in ("results", "items")])
    return RunOutput(record, run_dir, files, db.url.render_as_string(hide_password=True))
