"""What every bad-input case of the fuzz suites (tests/test_fuzz_*.py) must end with, checked on
the real command line: exit 2 (or the documented code), exactly one line on stderr that names the
file, line, key or flag, no traceback, and no run directory or store row presented as a run.

`quantgate(...)` runs `quantgate.cli.main` in this process (fast: no interpreter start per case);
an exception that main lets through fails the test with its traceback, which is what a user would
have seen. A few cases per suite also go through a real subprocess (`quantgate_process`)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from quantgate import cli


@dataclass(frozen=True)
class Outcome:
    code: int
    out: str
    err: str


def quantgate(capfd: pytest.CaptureFixture[str], *args: str) -> Outcome:
    """`quantgate ARGS` in this process; stdout and stderr as the file descriptors saw them."""
    capfd.readouterr()
    argv = sys.argv
    sys.argv = ["quantgate", *args]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    out, err = capfd.readouterr()
    return Outcome(code, out, err)


def quantgate_process(*args: str, cwd: Path | None = None, stdin: bytes | None = None,
                      timeout: float = 300) -> Outcome:
    proc = subprocess.run([sys.executable, "-m", "quantgate.cli", *args], cwd=cwd, input=stdin,
                          capture_output=True, timeout=timeout)
    return Outcome(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"))


def refused(o: Outcome, *fragments: str, code: int = 2) -> str:
    """The case's one error line, after checking the exit code, the single line and no traceback."""
    assert "Traceback" not in o.err, o.err
    lines = [line for line in o.err.splitlines() if line.strip()]
    assert o.code == code, (o.code, o.err)
    assert len(lines) == 1, o.err
    assert lines[0].startswith("quantgate: error: "), lines[0]
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def no_run_left(results: Path) -> None:
    """Nothing under `results` looks like a run: no run directory (finished or partial), and a
    store there, if any, records no run."""
    assert not list(results.glob("*/results.json")), list(results.iterdir())
    assert not list(results.glob(".*.partial")), list(results.iterdir())
    db = results / "quantgate.db"
    if db.exists():
        from quantgate.store import open_store, run_rows

        store = open_store(db, create=False)
        try:
            assert run_rows(store) == []
        finally:
            store.dispose()
