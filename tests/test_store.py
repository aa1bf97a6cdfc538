"""The store, the same tests against SQLite and a real PostgreSQL server (a throwaway cluster on
loopback, started once per session from the Debian binaries; in CI it must start, elsewhere the
PostgreSQL cases skip when the binaries are missing).

The run payload (tests/data/run_payload.json) is a real, old results.json: the default model, rtn w8
and w2 candidates on 36 items of the default suite; tests/data/results_v0.json is the last results.json
before the typed record (quantgate.record). Both are recorded as RunRecords."""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from quantgate.config import RunConfig
from quantgate.errors import UserError
from quantgate.record import SCHEMA_VERSION, RunRecord, load_record
from quantgate.store import (
    ENV_VAR, Artifact, DriftCheck, ItemKey, ItemResult, digest, history, last_drift, load_run, open_store,
    record_drift, record_items, record_run, run_artifacts, run_metrics, scored_items, store_location,
)
from quantgate.store.connect import migrate
from quantgate.store.schema import BASELINE_REVISION, SCHEMA_VERSION, VERSION_TABLE, metadata

PAYLOAD = Path(__file__).parent / "data" / "run_payload.json"
V0 = Path(__file__).parent / "data" / "results_v0.json"
BACKENDS = ("sqlite", "postgresql")


def payload(run_id: str | None = None, started: datetime | None = None) -> dict:
    """The old results.json as a dict (what a version-1 store holds inline)."""
    data = json.loads(PAYLOAD.read_text())
    if run_id:
        data["run_id"] = run_id
    if started:
        data["started"] = data["finished"] = started.isoformat()
    return data


def record(run_id: str | None = None, started: datetime | None = None) -> RunRecord:
    return load_record(payload(run_id, started))


# ---------------------------------------------------------------------------------------------
# A throwaway PostgreSQL cluster.


def _pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the PostgreSQL store tests: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL prefix (no database) of a PostgreSQL server on 127.0.0.1, trust auth, user postgres.
    As root the server runs as the `postgres` user (initdb refuses root)."""
    bindir = _pg_bindir()
    if bindir is None:
        _unavailable("PostgreSQL server binaries not found (apt-get install postgresql)")
    as_user: list[str] = []
    root = tempfile.mkdtemp(prefix="qg-pg-")  # short: the socket path must fit in 107 bytes
    if os.geteuid() == 0:
        try:
            shutil.chown(root, user="postgres")
        except LookupError:
            _unavailable("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    port, data = _free_port(), f"{root}/data"

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(bindir / tool), *args], check=True, capture_output=True, timeout=120)

    try:
        pg("initdb", "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        options = f"-k {root} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        pg("pg_ctl", "-D", data, "-o", options, "-l", f"{root}/log", "-w", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        _unavailable(f"could not start PostgreSQL: {e.stderr.decode(errors='replace').strip()[-300:]}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        pg("pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _admin(server: str, sql: str) -> None:
    engine = sa.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(sql)
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def store_url(request, tmp_path) -> Iterator[str]:
    """A new, empty store: a SQLite file path, or a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        yield str(tmp_path / "results" / "quantgate.db")
        return
    server = request.getfixturevalue("postgres_server")
    name = f"t_{os.getpid()}_{abs(hash(request.node.nodeid)) % 10**9}"
    _admin(server, f'CREATE DATABASE "{name}"')
    yield f"{server}/{name}"
    _admin(server, f'DROP DATABASE "{name}" WITH (FORCE)')


@pytest.fixture
def store(store_url) -> Iterator[sa.Engine]:
    engine = open_store(store_url)
    yield engine
    engine.dispose()


def count(engine: sa.Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()


# ---------------------------------------------------------------------------------------------
# Runs, items, drift checks, history.


def test_run_round_trip(store):
    data = record()
    results = Artifact("results", "/r/results.json", sha256="ab" * 32, bytes=13468)
    record_run(store, data, artifacts=[results])
    assert load_run(store, data.run_id) == data
    assert load_run(store, "no-such-run") is None
    assert run_artifacts(store, data.run_id) == [results]
    metrics = run_metrics(store, data.run_id)
    w2 = data.candidates[1].vs_baseline
    assert metrics["rtn-w2-g64", "overall", "recovery"] == (w2.overall.recovery, *w2.overall.recovery_ci)
    assert metrics["rtn-w2-g64", "overall", "kld_p99"] == (w2.kld_p99, *w2.kld_p99_ci)
    assert metrics["baseline", "overall", "perplexity"] == (data.baseline.perplexity, None, None)
    for task, value in data.baseline.per_task.items():
        assert metrics["baseline", task, "accuracy"][0] == value
    (row,) = history(store)
    w8 = data.candidates[0].vs_baseline
    assert (row.run_id, row.candidate, row.outcome) == (data.run_id, "rtn-w8", "recommended")
    assert (row.recovery, row.flip_rate, row.kld_mean) == (w8.recovery, w8.flips.rate, w8.kld_mean)
    assert row.when == data.started


def test_the_last_version_0_results_file_is_recorded(store):
    old = load_record(V0)
    record_run(store, old)
    assert load_run(store, old.run_id) == old
    metrics = run_metrics(store, old.run_id)
    w4 = old.candidate("rtn-w4-g64")
    assert metrics["rtn-w4-g64", "default-cloze", "recovery"][0] == w4.vs_baseline.tasks["default-cloze"].recovery
    assert metrics["rtn-w4-g64", "overall", "min_detectable_drop"] == (None, None, None)  # inf in the run
    (row,) = history(store)
    assert (row.run_id, row.candidate, row.kld_mean) == (old.run_id, "rtn-w8", old.candidate("rtn-w8").vs_baseline.kld_mean)
    with store.connect() as conn:
        stored = conn.execute(sa.select(sa.column("results", sa.JSON)).select_from(sa.table("runs"))).scalar_one()
    assert stored["schema_version"] == SCHEMA_VERSION and "config" not in stored


def test_candidate_settings_and_config_are_stored_once(store):
    first, second = record("run-a"), record("run-b")
    record_run(store, first)
    record_run(store, second)
    assert count(store, "configs") == 1 + len(first.candidates)  # one run config, each candidate's settings
    with store.connect() as conn:
        stored = conn.execute(sa.text("SELECT settings_digest FROM candidates WHERE name = 'rtn-w8'")).scalars().all()
    assert stored == [digest(first.candidates[0].settings)] * 2
    assert digest(first.config) == first.config_digest  # the store's digest is the config's


def test_a_run_is_recorded_once(store):
    record_run(store, record())
    with pytest.raises(UserError, match="recorded already"):
        record_run(store, record())
    assert count(store, "runs") == 1


KEY = ItemKey(model_sha256="a" * 64, settings_digest="b" * 64, data_digest="c" * 64)


def test_items_round_trip_exactly(store):
    items = [
        ItemResult("mc", "q1", True, 1.0, "the left one", option_ll=(-3.25, float("-inf"), -1e-300),
                   option_greedy=(True, False, False)),
        ItemResult("prompts", "p1", None, None, "free text", generation=(5, 17, 2),
                   extra={"kld_sum": 0.125, "tokens": 31}),
        ItemResult("mc", "q2", False, 0.0, None, option_ll=(-0.1 / 3, float("nan"))),
    ]
    assert record_items(store, KEY, items, run_id="run-a", candidate="rtn-w8") == 3
    back = scored_items(store, KEY)
    assert set(back) == {("mc", "q1"), ("prompts", "p1"), ("mc", "q2")}
    assert back["mc", "q1"] == items[0]  # -inf and a subnormal-sized float survive exactly
    assert back["prompts", "p1"] == items[1]
    q2 = back["mc", "q2"]
    assert q2.option_ll[0] == -0.1 / 3 and q2.option_ll[1] != q2.option_ll[1]  # nan stays nan
    assert scored_items(store, ItemKey(KEY.model_sha256, KEY.settings_digest, "d" * 64)) == {}


def test_items_recorded_again_replace_the_old_ones(store):
    old = ItemResult("mc", "q1", True, 1.0, "a", option_ll=(-1.0, -2.0))
    new = ItemResult("mc", "q1", False, 0.0, "b", option_ll=(-2.0, -1.0))
    record_items(store, KEY, [old])
    assert record_items(store, KEY, [old, new]) == 1  # the same item twice in one call: the last wins
    assert scored_items(store, KEY) == {("mc", "q1"): new}
    assert count(store, "item_results") == 1


def drift(model: dict, candidate: str, outcome: str, when: datetime, **metrics: float) -> DriftCheck:
    return DriftCheck(model_base=model["base"], model_sha256=model["sha256"], candidate=candidate, outcome=outcome,
                      checked_at=when, metrics=metrics, run_id="r1", detail=f"{outcome} at {when:%d}")


def test_drift_checks_and_history_over_time(store):
    t0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    record_run(store, record("r1", t0))
    model = payload()["model"]
    record_drift(store, drift(model, "rtn-w8", "pass", t0 + timedelta(days=7), recovery=1.0, kld_mean=0.004))
    record_drift(store, drift(model, "rtn-w8", "fail", t0 + timedelta(days=14), recovery=0.9, flip_rate=0.2))
    other = {"base": "other-model", "sha256": "f" * 64}
    record_drift(store, drift(other, "rtn-w8", "pass", t0 + timedelta(days=21)))
    record_run(store, record("r2", t0 + timedelta(days=15)))

    latest = last_drift(store, model["base"], "rtn-w8")
    assert latest == drift(model, "rtn-w8", "fail", t0 + timedelta(days=14), recovery=0.9, flip_rate=0.2)
    assert last_drift(store, model["sha256"], "rtn-w8") == latest  # by sha256 too
    assert last_drift(store, model["base"], "rtn-w2-g64") is None

    rows = history(store, model["base"])
    assert [(h.kind, h.run_id, h.outcome) for h in rows] == [
        ("run", "r1", "recommended"), ("drift", "r1", "pass"), ("drift", "r1", "fail"), ("run", "r2", "recommended")]
    assert [h.when for h in rows] == sorted(h.when for h in rows)
    assert (rows[2].recovery, rows[2].flip_rate, rows[2].kld_mean) == (0.9, 0.2, None)
    assert len(history(store)) == 5 and history(store, "no-such-model") == []


def test_drift_outcome_is_checked(store):
    with pytest.raises(ValueError, match="drift outcome"):
        record_drift(store, drift(payload()["model"], "rtn-w8", "ok", datetime.now(timezone.utc)))


# ---------------------------------------------------------------------------------------------
# Several writers at once.


def write_runs(url: str, worker: int, n: int) -> None:
    """A writer process: opens the store itself (the first open migrates it) and records n runs."""
    engine = open_store(url)
    base = record()
    for k in range(n):
        record_run(engine, base.model_copy(update={"run_id": f"w{worker}-{k:03d}"}))
    engine.dispose()


def test_two_processes_writing_at_once_lose_nothing(store_url):
    n = 50
    spawn = multiprocessing.get_context("spawn")  # no torch state forked into the writers
    writers = [spawn.Process(target=write_runs, args=(store_url, w, n)) for w in range(2)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(timeout=300)
    assert [p.exitcode for p in writers] == [0, 0]
    engine = open_store(store_url)
    n_candidates = len(payload()["candidates"])
    assert count(engine, "runs") == 2 * n
    assert count(engine, "candidates") == 2 * n * n_candidates
    assert {h.run_id for h in history(engine)} == {f"w{w}-{k:03d}" for w in range(2) for k in range(n)}
    engine.dispose()


def test_opening_a_new_sqlite_store_waits_for_a_writer_in_another_connection(tmp_path):
    # The new file is still in rollback-journal mode. Switching it to WAL escalates a shared lock,
    # and SQLite answers "database is locked" at once there, whatever the busy timeout (a raw
    # PRAGMA journal_mode=WAL fails in this very setup): open_store must wait, not fail.
    path = tmp_path / "new.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE scratch (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO scratch VALUES (1)")
    threading.Timer(0.3, other.execute, ("COMMIT",)).start()
    engine = open_store(path)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    assert count(engine, "runs") == 0
    engine.dispose()
    other.close()


# ---------------------------------------------------------------------------------------------
# Schema versions and migrations.

# Version 1 as quantgate created it before migrations (SQLAlchemy's DDL of its models, per dialect).
V1_DDL = {
    "sqlite": [
        """CREATE TABLE runs (id INTEGER NOT NULL, run_id VARCHAR(64) NOT NULL, started DATETIME NOT NULL,
            finished DATETIME NOT NULL, model_base VARCHAR(512) NOT NULL, model_sha256 VARCHAR(64) NOT NULL,
            config_digest VARCHAR(64) NOT NULL, config JSON NOT NULL, recommended VARCHAR(128),
            exit_code INTEGER NOT NULL, results JSON NOT NULL, PRIMARY KEY (id), UNIQUE (run_id))""",
        """CREATE TABLE quantgate_meta ("key" VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, PRIMARY KEY ("key"))""",
        """CREATE TABLE candidates (id INTEGER NOT NULL, run_pk INTEGER NOT NULL, name VARCHAR(128) NOT NULL,
            method VARCHAR(32) NOT NULL, bits INTEGER NOT NULL, group_size INTEGER, weight_bytes INTEGER NOT NULL,
            accuracy FLOAT NOT NULL, recovery FLOAT, flip_rate FLOAT NOT NULL, kld_mean FLOAT NOT NULL,
            kld_p99 FLOAT NOT NULL, top1_agreement FLOAT NOT NULL, passed BOOLEAN NOT NULL, PRIMARY KEY (id),
            FOREIGN KEY(run_pk) REFERENCES runs (id))""",
    ],
    "postgresql": [
        """CREATE TABLE quantgate_meta (key VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, PRIMARY KEY (key))""",
        """CREATE TABLE runs (id SERIAL NOT NULL, run_id VARCHAR(64) NOT NULL,
            started TIMESTAMP WITH TIME ZONE NOT NULL, finished TIMESTAMP WITH TIME ZONE NOT NULL,
            model_base VARCHAR(512) NOT NULL, model_sha256 VARCHAR(64) NOT NULL, config_digest VARCHAR(64) NOT NULL,
            config JSON NOT NULL, recommended VARCHAR(128), exit_code INTEGER NOT NULL, results JSON NOT NULL,
            PRIMARY KEY (id), UNIQUE (run_id))""",
        """CREATE TABLE candidates (id SERIAL NOT NULL, run_pk INTEGER NOT NULL, name VARCHAR(128) NOT NULL,
            method VARCHAR(32) NOT NULL, bits INTEGER NOT NULL, group_size INTEGER, weight_bytes INTEGER NOT NULL,
            accuracy FLOAT NOT NULL, recovery FLOAT, flip_rate FLOAT NOT NULL, kld_mean FLOAT NOT NULL,
            kld_p99 FLOAT NOT NULL, top1_agreement FLOAT NOT NULL, passed BOOLEAN NOT NULL, PRIMARY KEY (id),
            FOREIGN KEY(run_pk) REFERENCES runs (id))""",
    ],
}


def raw_engine(url: str) -> sa.Engine:
    """A plain engine on a store_url (no quantgate schema handling)."""
    if "://" in url:
        return sa.create_engine(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return sa.create_engine(f"sqlite:///{url}")


def write_v1_store(url: str, data: dict, schema_version: str = "1") -> None:
    """A store as version-1 quantgate left it: its tables, its version mark and one recorded run
    (the whole payload inline in runs.results, the config in runs.config)."""
    engine = raw_engine(url)
    runs = sa.table("runs", *(sa.column(c) for c in ("run_id", "model_base", "model_sha256", "config_digest",
                                                     "recommended", "exit_code")),
                    sa.column("started", sa.DateTime(timezone=True)), sa.column("finished", sa.DateTime(timezone=True)),
                    sa.column("config", sa.JSON), sa.column("results", sa.JSON))
    cands = sa.table("candidates", *(sa.column(c) for c in (
        "run_pk", "name", "method", "bits", "group_size", "weight_bytes", "accuracy", "recovery", "flip_rate",
        "kld_mean", "kld_p99", "top1_agreement", "passed")))
    with engine.begin() as conn:
        for ddl in V1_DDL[engine.dialect.name]:
            conn.exec_driver_sql(ddl)
        conn.execute(sa.text("INSERT INTO quantgate_meta VALUES ('schema_version', :v)"), {"v": schema_version})
        conn.execute(runs.insert().values(
            run_id=data["run_id"], started=datetime.fromisoformat(data["started"]),
            finished=datetime.fromisoformat(data["finished"]), model_base=data["model"]["base"],
            model_sha256=data["model"]["sha256"], config_digest=data["config_digest"], config=data["config"],
            recommended=data["recommendation"]["candidate"], exit_code=data["exit_code"], results=data))
        run_pk = conn.execute(sa.text("SELECT id FROM runs")).scalar_one()
        for c in data["candidates"]:
            vs = c["vs_baseline"]
            conn.execute(cands.insert().values(
                run_pk=run_pk, name=c["name"], method=c["method"], bits=c["bits"], group_size=c["group_size"],
                weight_bytes=c["weight_bytes"], accuracy=c["accuracy"], recovery=vs["recovery"],
                flip_rate=vs["flips"]["rate"], kld_mean=vs["kld_mean"], kld_p99=vs["kld_p99"],
                top1_agreement=vs["top1_agreement"], passed=c["gate"]["passed"]))
    engine.dispose()


def schema_differences(engine: sa.Engine) -> list:
    """What differs between the store's tables and the models in schema.py (alembic's autogenerate)."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        return compare_metadata(ctx, metadata)


def test_a_new_store_matches_the_models(store):
    assert schema_differences(store) == []
    with store.connect() as conn:
        assert conn.execute(sa.text("SELECT value FROM quantgate_meta")).scalar_one() == str(SCHEMA_VERSION)


def test_a_version_1_store_is_migrated_and_its_run_stays_readable(store_url):
    old = payload("v1-run")
    write_v1_store(store_url, old)
    engine = open_store(store_url)
    assert schema_differences(engine) == []
    assert load_run(engine, "v1-run") == load_record(old)  # the old inline payload, upgraded on reading
    (row,) = history(engine)
    assert (row.run_id, row.candidate, row.recovery) == ("v1-run", "rtn-w8", old["candidates"][0]["vs_baseline"]["recovery"])
    with engine.connect() as conn:
        assert conn.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one() != BASELINE_REVISION
        assert conn.execute(sa.text("SELECT value FROM quantgate_meta")).scalar_one() == str(SCHEMA_VERSION)
        settings = conn.execute(sa.text("SELECT settings_digest FROM candidates ORDER BY id")).scalars().all()
    assert settings == [digest(c["settings"]) for c in old["candidates"]]  # backfilled from the old payload
    record_run(engine, record("v2-run"))  # and the migrated store takes new runs
    assert [h.run_id for h in history(engine)] == ["v1-run", "v2-run"]
    engine.dispose()


def test_downgrade_to_version_1_and_back(store):
    data = record()
    record_run(store, data)
    shown = store.url.render_as_string(hide_password=True)
    migrate(store, shown, BASELINE_REVISION)
    with store.connect() as conn:
        assert set(sa.inspect(conn).get_table_names()) == {"runs", "candidates", "quantgate_meta", VERSION_TABLE}
        config = conn.execute(sa.select(sa.column("config", sa.JSON)).select_from(sa.table("runs"))).scalar_one()
        assert conn.execute(sa.text("SELECT value FROM quantgate_meta")).scalar_one() == "1"
    assert config == data.config
    migrate(store, shown)
    assert schema_differences(store) == []
    assert load_run(store, data.run_id) == data


def test_a_newer_schema_is_refused(store, store_url):
    with store.begin() as conn:
        conn.execute(sa.text(f"UPDATE {VERSION_TABLE} SET version_num = '0099_from_the_future'"))
    with pytest.raises(UserError, match="newer quantgate.*0099_from_the_future"):
        open_store(store_url)


def test_a_newer_unversioned_schema_is_refused(store_url):
    write_v1_store(store_url, payload(), schema_version=str(SCHEMA_VERSION + 1))
    with pytest.raises(UserError, match=f"newer quantgate.*version {SCHEMA_VERSION + 1}"):
        open_store(store_url)


def test_foreign_tables_without_a_version_are_refused(store_url):
    engine = raw_engine(store_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE runs (id INTEGER PRIMARY KEY)")
    engine.dispose()
    with pytest.raises(UserError, match="not a quantgate store"):
        open_store(store_url)


# ---------------------------------------------------------------------------------------------
# Where the store is, and what cannot be one.


@pytest.mark.parametrize("url, message", [
    ("mysql://u@h/db", "database 'mysql' is not supported"),
    ("no such scheme://x", "not a database URL"),
    ("postgresql+psycopg://u:secret@h:port/db", r"'postgresql\+psycopg://u:\*\*\*@h:port/db': not a database URL"),
    ("sqlite://", "in-memory"),
    ("sqlite:///:memory:", "in-memory"),
])
def test_bad_urls_are_named(url, message):
    with pytest.raises(UserError, match=message):
        open_store(url)


def test_unreachable_postgresql_is_a_user_error():
    with pytest.raises(UserError, match=r"store postgresql\+psycopg://u:\*\*\*@127.0.0.1:\d+/db: cannot"):
        open_store(f"postgresql://u:secret@127.0.0.1:{_free_port()}/db")  # nothing listens there


def test_missing_postgresql_database_is_a_user_error(postgres_server):
    with pytest.raises(UserError, match="no_such_db.*does not exist"):
        open_store(f"{postgres_server}/no_such_db")


def test_paths_that_cannot_be_a_store(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        open_store(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("not a database, but long enough to hold a SQLite header and then some more text\n" * 20)
    with pytest.raises(UserError, match="notes.txt: cannot"):
        open_store(text)
    with pytest.raises(UserError, match="no such file"):
        open_store(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()


def test_store_location_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert store_location(None, None, tmp_path) == str(tmp_path / "quantgate.db")
    assert store_location(None, "from-config.db", tmp_path) == "from-config.db"
    monkeypatch.setenv(ENV_VAR, "postgresql+psycopg://env/db")
    assert store_location(None, "from-config.db", tmp_path) == "postgresql+psycopg://env/db"
    assert store_location("from-option.db", "from-config.db", tmp_path) == "from-option.db"


def test_config_store_is_no_run_setting(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("store: postgresql+psycopg://u:secret@db.example/quantgate\n")
    from quantgate.config import load_config

    cfg = load_config(config)
    assert cfg.store == "postgresql+psycopg://u:secret@db.example/quantgate"
    assert "store" not in cfg.model_dump() and cfg.digest() == RunConfig().digest()  # no password in results


# ---------------------------------------------------------------------------------------------
# `quantgate history` through the real command line.


def quantgate(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_history_command(store, store_url):
    t0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
    record_run(store, record("run-1", t0))
    model = payload()["model"]
    record_drift(store, drift(model, "rtn-w8", "fail", t0 + timedelta(days=7), recovery=0.875))
    proc = quantgate("history", "--store", store_url, "--model", model["base"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    run_line = next(x for x in lines if "run-1" in x and "recommended" in x)
    assert "2026-11-01 12:00" in run_line and "rtn-w8" in run_line and "1.0000" in run_line
    drift_line = next(x for x in lines if "drift: fail" in x)
    assert "2026-11-08 12:00" in drift_line and "0.8750" in drift_line
    assert lines.index(run_line) < lines.index(drift_line)
    empty = quantgate("history", "--store", store_url, "--model", "no-such-model")
    assert empty.returncode == 0 and "no runs recorded for model no-such-model" in empty.stdout


def test_history_from_a_results_dir_and_errors(tmp_path):
    results = tmp_path / "results"
    engine = open_store(results / "quantgate.db")
    record_run(engine, record("run-1"))
    engine.dispose()
    clean = {ENV_VAR: ""}
    proc = quantgate("history", "--results-dir", str(results), env=clean)
    assert proc.returncode == 0 and "run-1" in proc.stdout, proc.stderr
    missing = quantgate("history", "--results-dir", str(tmp_path / "none"), env=clean)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    bad = quantgate("history", "--store", "mysql://u@h/db", env=clean)
    assert bad.returncode == 2 and "not supported" in bad.stderr
