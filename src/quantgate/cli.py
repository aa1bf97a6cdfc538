"""The `quantgate` command: parse arguments, load the one typed config, call the run, render.

Exit codes: 0 a candidate holds the gate, 1 none does, 2 bad input, 3 a step did nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from quantgate.config import check_supported, default_config_path, load_config
from quantgate.errors import NothingHappened, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress a language model and prove, on your eval set, what it cost.")


@app.callback()
def _root() -> None:
    """quantgate: candidates vs baseline on your eval set, with a quality gate."""


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="YAML config (default: the packaged default run)")] = None,
    results_dir: Annotated[Path | None, typer.Option(help="Where results go (overrides results_dir)")] = None,
) -> int:
    """Evaluate the baseline and every candidate, apply the quality gate, recommend."""
    cfg = load_config(config or default_config_path())
    check_supported(cfg)  # before the heavy imports below: bad input answers at once

    from quantgate.report import data, terminal
    from quantgate.run import execute
    from quantgate.store import open_store, record_run

    out_root = results_dir or Path(cfg.results_dir)
    console = Console(width=None if sys.stdout.isatty() else 180)  # logs and pipes get the whole table
    with Progress(TextColumn("{task.description:<16}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=False) as bars:
        result = execute(cfg, _progress(bars))
    payload = data.to_dict(result)
    run_dir = out_root / payload["run_id"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    record_run(open_store(out_root / "quantgate.db"), payload)
    terminal.render(result, console)
    console.print(f"results: {run_dir / 'results.json'}  (run recorded in {out_root / 'quantgate.db'})")
    return result.exit_code


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
    except NothingHappened as e:
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
