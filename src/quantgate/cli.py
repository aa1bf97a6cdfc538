"""The `quantgate` command: parse arguments, load the one typed config, call the run, render.

Exit codes: 0 a candidate holds the gate, 1 none does, 2 bad input, 3 a step did nothing.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from quantgate.config import RunConfig, check_supported, default_config_path, load_config
from quantgate.engines.process import EngineCrashed
from quantgate.errors import NothingHappened, UserError

STORE_HELP = "Store URL or SQLite file (default: $QUANTGATE_STORE, the config's store, <results-dir>/quantgate.db)"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a language model and prove, on your eval set, what it cost.")


@app.callback()
def _root() -> None:
    """quantgate: candidates vs baseline on your eval set, with a quality gate."""


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML config (default: the packaged default run)")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="Where results go (overrides results_dir)")] = None,
    store: Annotated[str | None, typer.Option(help=STORE_HELP)] = None,
    resume: Annotated[bool, typer.Option(help="Reuse items and candidates an interrupted run already scored")] = False,
) -> int:
    """Evaluate the baseline and every candidate, apply the quality gate, recommend."""
    cfg = load_config(config or default_config_path())
    check_supported(cfg)  # before the heavy imports below: bad input answers at once

    from quantgate.models.load import file_sha256
    from quantgate.record import build_record, dump_record
    from quantgate.report import terminal
    from quantgate.report.files import RESULTS, write_reports
    from quantgate.run import execute
    from quantgate.store import Artifact, open_store, record_run, store_location

    out_root = results_dir or Path(cfg.results_dir)
    db = open_store(store_location(store, cfg.store, out_root))  # a bad store fails now, not after the run
    console = Console(width=None if sys.stdout.isatty() else 180)  # logs and pipes get the whole table
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bars:
        result = execute(cfg, _progress(bars), workdir=out_root / "engine-logs", store=db, resume=resume)
    record = build_record(result)
    run_dir = out_root / record.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    results = run_dir / RESULTS
    results.write_text(dump_record(record), encoding="utf-8")
    record_run(db, record, artifacts=[Artifact("results", str(results), sha256=file_sha256(results),
                                               bytes=results.stat().st_size)])
    reports = write_reports(record, run_dir)
    terminal.render(record, console)
    console.print(f"results: {results}  (run recorded in {db.url.render_as_string(hide_password=True)})")
    console.print(f"report: {reports['html']}  (summary: {reports['markdown']})", soft_wrap=True)
    return result.exit_code


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A run directory holding results.json, or the results root "
                                                     "(then its newest run)")],
) -> int:
    """Rebuild report.html and summary.md from a stored results.json (nothing is rerun)."""
    from quantgate.report.files import find_run, load_results, write_reports

    run_dir = find_run(results_dir)
    paths = write_reports(load_results(run_dir), run_dir)
    print(f"report: {paths['html']}\nsummary: {paths['markdown']}")
    return 0


@app.command()
def history(
    results_dir: Annotated[Path | None, typer.Option(help="The results directory whose store to read")] = None,
    store: Annotated[str | None, typer.Option(help=STORE_HELP)] = None,
    model: Annotated[str | None, typer.Option(help="Only this model (its base name or sha256)")] = None,
) -> int:
    """Runs and drift checks over time: recommended candidate, its recovery, flip rate and KLD."""
    from quantgate.report.history import render_history
    from quantgate.store import history as store_history
    from quantgate.store import open_store, store_location

    location = store_location(store, None, results_dir or Path(RunConfig().results_dir))
    db = open_store(location, create=False)
    render_history(store_history(db, model), Console(width=None if sys.stdout.isatty() else 180), model)
    return 0


@app.command()
def drift(
    run: Annotated[str, typer.Argument(help="The gate run: its directory (holding results.json) or its run id")],
    inputs: Annotated[Path, typer.Option(help="Fresh production inputs: a JSONL eval file (labeled, or "
                                              "unlabeled prompts) or a .txt of text")],
    candidate: Annotated[str | None, typer.Option(help="The shipped candidate (default: the run's "
                                                       "recommended one)")] = None,
    if_due: Annotated[bool, typer.Option(help="Check only when quality_gate.drift_check's period has passed "
                                              "since the last check")] = False,
    store: Annotated[str | None, typer.Option(help=STORE_HELP)] = None,
    results_dir: Annotated[Path | None, typer.Option(help="Results root (default: the run directory's parent)")] = None,
) -> int:
    """Re-check a shipped candidate on fresh inputs: the gate, movement since the run, input shift.
    Exit 0 no drift, 1 drift or the gate now fails."""
    from quantgate import drift as check

    plan = check.plan(run, inputs, candidate=candidate, store=store, results_dir=results_dir)
    console = Console(width=None if sys.stdout.isatty() else 180)
    skip = check.not_due(plan) if if_due else None
    if skip:
        console.print(skip)
        return 0
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bars:
        report = check.check(plan, _progress(bars), workdir=plan.results_root / "engine-logs")
    return check.finish(plan, report, console)


@app.command()
def export(
    results: Annotated[Path, typer.Argument(help="A run directory holding results.json")],
    candidate: Annotated[str, typer.Option(help="The candidate's name in results.json")],
    format: Annotated[str, typer.Option("--format", help="gguf, onnx, compressed-tensors or hf")],
    out: Annotated[Path | None, typer.Option(help="Directory to write (default: <run>/exports/<name>-<format>)")] = None,
    dtype: Annotated[str | None, typer.Option(help="Tensors not stored as integers: float16 or float32 (default: "
                                                   "float16 for W4A16-style compressed-tensors, else float32)")] = None,
) -> int:
    """Write an evaluated candidate as an artifact with quantgate-manifest.json beside it."""
    from quantgate.export.build import export_candidate, render_export

    render_export(export_candidate(results, candidate, format, out, dtype), Console())
    return 0


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="An exported directory, or a file in one")],
) -> int:
    """Check an artifact's files against its manifest and re-measure it on its gate run's eval set."""
    from quantgate.export.verify import render_verification, verify as verify_artifact

    result = verify_artifact(artifact)
    render_verification(result, Console(width=None if sys.stdout.isatty() else 180))
    return 0 if result.ok else 1


def _progress(bars: Progress) -> Callable[[str, int], Callable[[int], None]]:
    def start(description: str, total: int) -> Callable[[int], None]:
        task = bars.add_task(description, total=total)
        return lambda n: bars.advance(task, n)

    return start


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except UserError as e:
        print(f"quantgate: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (NothingHappened, EngineCrashed) as e:
        print(f"quantgate: error: {e}", file=sys.stderr)
        sys.exit(3)
    except typer.Abort:
        print("quantgate: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors (typer's own click)
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
