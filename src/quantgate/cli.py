"""The `quantgate` command: parse arguments, build the one typed config, call the run, render.

Flags of `run` and `check` are a second way to write the config (config.py flag_overrides): each
sets one key, on top of the YAML file when one is given. Progress and notes go to stderr (bars on
a terminal, plain lines in a pipe or log), results to stdout; --json prints one JSON document on
stdout instead of tables; --quiet prints nothing but errors.

Exit codes: 0 a candidate holds the gate, 1 none does, 2 bad input, 3 a step did nothing or an
engine gave no usable answer (crashed, NaN).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from quantgate import __version__
from quantgate.errors import EngineFault, NothingHappened, UserError

STORE_HELP = "Store URL or SQLite file (default: $QUANTGATE_STORE, the config's store, <results-dir>/quantgate.db)"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Compress a language model and prove, on your eval set, what it cost.")

# -- options shared by several commands (each sets one config key, see config.FLAG_KEYS) ----------
ConfigArg = Annotated[Path | None, typer.Argument(help="YAML config (none: the flags alone; neither: the packaged "
                                                       "default run). /dev/stdin works.")]
Model = Annotated[str | None, typer.Option("--model", help="model.base: smollm2-135m-instruct, an HF directory "
                                                           "or a .gguf file")]
Candidates = Annotated[list[str] | None, typer.Option("--candidate", help="A candidate as method:setting:... "
                                                      "(rtn:8, gptq:4:g64, awq:4:g128, gguf:Q4_K_M:imatrix, "
                                                      "smoothquant:0.5); repeat it; replaces the file's candidates")]
EvalSet = Annotated[str | None, typer.Option("--eval-set", help="quality_gate.eval_set: a JSONL file, 'default' or "
                                                                "'none'")]
Limit = Annotated[int | None, typer.Option("--limit", help="evaluation.limit: the first N items of each task")]
Seed = Annotated[int | None, typer.Option("--seed", help="seed")]
Output = Annotated[Path | None, typer.Option("--output", "-o", "--results-dir",
                                             help="Where run directories go (overrides results_dir; not a setting: "
                                                  "the run's config digest is the same wherever it is written)")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Any key: KEY=VALUE with VALUE in YAML "
                                                              "(evaluation.cloze_items=20, economics.measure=false)")]
Store = Annotated[str | None, typer.Option(help=STORE_HELP)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors (and --json)")]
JsonOut = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of tables")]


def _version(show: bool) -> None:
    if show:
        print(f"quantgate {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="Print the version and exit")] = False) -> None:
    """quantgate: candidates vs baseline on your eval set, with a quality gate."""


def _config(config: Path | None, model: str | None, candidate: list[str] | None, eval_set: str | None,
            limit: int | None, seed: int | None, sets: list[str] | None):
    from quantgate.config import flag_overrides, load_config

    flags = {"--model": model, "--candidate": candidate, "--eval-set": eval_set, "--limit": limit, "--seed": seed}
    return load_config(config, flag_overrides(flags, sets or ()))


def _console(quiet: bool = False) -> Console:
    return Console(width=None if sys.stdout.isatty() else 180, quiet=quiet)  # logs and pipes get whole tables


@app.command()
def run(config: ConfigArg = None, model: Model = None, candidate: Candidates = None, eval_set: EvalSet = None,
        limit: Limit = None, seed: Seed = None, output: Output = None, set_: Sets = None, store: Store = None,
        resume: Annotated[bool, typer.Option(help="Reuse items and candidates an interrupted run already "
                                                  "scored")] = False,
        quiet: Quiet = False, json_out: JsonOut = False) -> int:
    """Evaluate the baseline and every candidate, apply the quality gate, recommend."""
    from quantgate.api import run_to_files
    from quantgate.report import terminal
    from quantgate.report.progress import Feedback
    from quantgate.report.summary import dumps, run_summary

    cfg = _config(config, model, candidate, eval_set, limit, seed, set_)
    with Feedback(quiet) as feedback:
        out = run_to_files(cfg, results_dir=output, store=store, resume=resume, progress=feedback)
    if json_out:
        print(dumps(run_summary(out.record, out.files, out.store)))
    elif not quiet:
        console = _console()
        terminal.render(out.record, console)
        console.print(f"results: {out.files['results']}  (per item: {out.files['items'].name}; run recorded in "
                      f"{out.store})", soft_wrap=True)
        console.print(f"report: {out.files['html']}  (summary: {out.files['markdown']})", soft_wrap=True)
    return out.record.exit_code


@app.command()
def check(config: ConfigArg = None, model: Model = None, candidate: Candidates = None, eval_set: EvalSet = None,
          limit: Limit = None, seed: Seed = None, output: Output = None, set_: Sets = None,
          json_out: JsonOut = False) -> int:
    """Validate a config (file and flags, as `run` takes them) and print what a run would load, make,
    evaluate and measure, on which engine, and roughly how long it takes. Nothing is run."""
    from quantgate.plan import make_plan
    from quantgate.report.summary import dumps, plan_summary, render_plan

    plan = make_plan(_config(config, model, candidate, eval_set, limit, seed, set_), results_dir=output)
    if json_out:
        print(dumps(plan_summary(plan)))
    else:
        render_plan(plan, _console())
    return 0


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="A run directory holding results.json, or the results root "
                                                     "(then its newest run)")],
    out: Annotated[Path | None, typer.Option(help="Directory to write report.html and summary.md into (default: "
                                                  "the run directory, rewritten)")] = None,
    quiet: Quiet = False,
) -> int:
    """Rebuild report.html and summary.md from a stored results.json (nothing is rerun)."""
    from quantgate.api import results_root
    from quantgate.report.files import find_run, load_results, write_reports

    run_dir = find_run(results_dir)
    paths = write_reports(load_results(run_dir), results_root(out) if out is not None else run_dir)
    _console(quiet).print(f"report: {paths['html']}\nsummary: {paths['markdown']}", soft_wrap=True)
    return 0


def _store(results_dir: Path | None, store: str | None):
    from quantgate.config import RunConfig
    from quantgate.store import open_store, store_location

    return open_store(store_location(store, None, results_dir or Path(RunConfig().results_dir)), create=False)


@app.command()
def history(
    results_dir: Annotated[Path | None, typer.Option(help="The results directory whose store to read")] = None,
    store: Store = None,
    model: Annotated[str | None, typer.Option(help="Only this model (its base name or sha256)")] = None,
    json_out: JsonOut = False,
) -> int:
    """Runs and drift checks over time: recommended candidate, its recovery, flip rate and KLD."""
    from quantgate.report.history import render_history
    from quantgate.report.summary import dumps, history_summary
    from quantgate.store import history as store_history

    rows = store_history(_store(results_dir, store), model)
    if json_out:
        print(dumps(history_summary(rows)))
    else:
        render_history(rows, _console(), model)
    return 0


@app.command()
def runs(
    results_dir: Annotated[Path | None, typer.Option(help="The results directory whose store to read")] = None,
    store: Store = None,
    model: Annotated[str | None, typer.Option(help="Only this model (its base name or sha256)")] = None,
    json_out: JsonOut = False,
) -> int:
    """Every recorded run, whatever its outcome (runs where no candidate passed included)."""
    from quantgate.report.summary import dumps, runs_summary, runs_table
    from quantgate.store import run_rows

    rows = run_rows(_store(results_dir, store), model)
    if json_out:
        print(dumps(runs_summary(rows)))
    elif rows:
        _console().print(runs_table(rows))
    else:
        _console().print(f"no runs recorded{f' for model {model}' if model else ''}")
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
    store: Store = None,
    results_dir: Annotated[Path | None, typer.Option(help="Results root (default: the run directory's parent)")] = None,
    quiet: Quiet = False,
) -> int:
    """Re-check a shipped candidate on fresh inputs: the gate, movement since the run, input shift.
    Exit 0 no drift, 1 drift or the gate now fails."""
    from quantgate import drift as check
    from quantgate.report.progress import Feedback

    plan = check.plan(run, inputs, candidate=candidate, store=store, results_dir=results_dir)
    console = _console(quiet)
    skip = check.not_due(plan) if if_due else None
    if skip:
        console.print(skip)
        return 0
    with Feedback(quiet) as feedback:
        report = check.check(plan, feedback, workdir=plan.results_root / "engine-logs")
    return check.finish(plan, report, console)


@app.command()
def export(
    results: Annotated[Path, typer.Argument(help="A run directory holding results.json")],
    candidate: Annotated[str, typer.Option(help="The candidate's name in results.json")],
    format: Annotated[str, typer.Option("--format", help="gguf, onnx, compressed-tensors or hf")],
    out: Annotated[Path | None, typer.Option(help="Directory to write (default: <run>/exports/<model>.<candidate>.run-"
                                                  "<run id>-<format>)")] = None,
    dtype: Annotated[str | None, typer.Option(help="Tensors not stored as integers: float16 or float32 (default: "
                                                   "float16 for W4A16-style compressed-tensors, else float32)")] = None,
    quiet: Quiet = False,
) -> int:
    """Write an evaluated candidate as an artifact with quantgate-manifest.json beside it."""
    from quantgate.export.build import export_candidate, render_export
    from quantgate.report.progress import Feedback

    with Feedback(quiet) as feedback:
        exported = export_candidate(results, candidate, format, out, dtype, feedback=feedback)
    render_export(exported, _console(quiet))
    return 0


@app.command()
def verify(
    artifact: Annotated[Path, typer.Argument(help="An exported directory, or a file in one")],
    quiet: Quiet = False,
) -> int:
    """Check an artifact's files against its manifest and re-measure it on its gate run's eval set."""
    from quantgate.export.verify import render_verification, verify as verify_artifact
    from quantgate.report.progress import Feedback

    with Feedback(quiet) as feedback:
        result = verify_artifact(artifact, feedback=feedback)
    render_verification(result, _console(quiet))
    return 0 if result.ok else 1


def main() -> None:
    if not sys.stderr.isatty() or "--quiet" in sys.argv or "-q" in sys.argv:
        _no_library_bars()
    try:
        code = app(standalone_mode=False)
    except UserError as e:
        print(f"quantgate: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except (NothingHappened, EngineFault) as e:
        print(f"quantgate: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(3)
    except (typer.Abort, KeyboardInterrupt):
        print("quantgate: interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.TyperException as e:  # usage errors (typer's own click)
        e.show()
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


def _no_library_bars() -> None:
    """No progress bars from transformers / huggingface_hub (weights loading) in a log or with
    --quiet: they would be redrawn as many lines. (Read at their import; set on a loaded one too.)"""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _one_line(e: BaseException) -> str:
    """An error's message on one line (a message quoting a file's text may hold newlines)."""
    return " ".join(str(e).split())


if __name__ == "__main__":
    main()
