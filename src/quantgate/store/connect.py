"""Opening a store: where it is, connecting, and bringing its schema to the newest revision.

SQLite (a file; the default) runs in WAL mode with a busy timeout, and every writing transaction
starts with BEGIN IMMEDIATE: several processes may write at once, each waits for the write lock
instead of failing half-way. PostgreSQL by URL (psycopg 3). The schema is migrated by Alembic, run
from code (no alembic.ini): the migration runs inside one transaction that holds the store's write
lock (SQLite's, or a PostgreSQL advisory lock), so processes opening a store at once migrate it
once.
"""

from __future__ import annotations

import os
import random
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine, event, inspect, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from quantgate.errors import UserError
from quantgate.store.schema import BASELINE_REVISION, SCHEMA_VERSION, VERSION_TABLE, meta, metadata

DEFAULT_FILE = "quantgate.db"  # under the results directory
ENV_VAR = "QUANTGATE_STORE"
SUPPORTED = ("sqlite", "postgresql")
BUSY_TIMEOUT_MS = 60_000  # a writer waits this long for another process's transaction
PG_CONNECT_TIMEOUT_S = 10
PG_MIGRATION_LOCK = 0x71_67_73_74  # pg_advisory_xact_lock key held while migrating ("qgst")
READ_ONLY = "quantgate_read_only"  # execution option: SQLite begins a deferred (reading) transaction
V1 = "version 1 (before migrations)"  # _schema_state of a store written before Alembic


def store_location(option: str | None, configured: str | None, results_dir: str | Path) -> str:
    """Where the store is: the --store option, else $QUANTGATE_STORE, else the config's `store`,
    else the SQLite file <results_dir>/quantgate.db."""
    for value in (option, os.environ.get(ENV_VAR), configured):
        if value:
            return value
    return str(Path(results_dir) / DEFAULT_FILE)


def open_store(url_or_path: str | Path, *, create: bool = True) -> Engine:
    """An engine on the store at a URL (sqlite:///PATH, postgresql+psycopg://USER@HOST/DB) or a
    SQLite file path, its schema at the newest revision: a new store is created (unless
    create=False: then a missing SQLite file is a UserError), an older one migrated, a newer one
    refused. Every failure to open is a UserError naming the store (password hidden)."""
    url = store_url(url_or_path, create=create)
    shown = url.render_as_string(hide_password=True)
    try:
        engine = _engine(url)
    except (SQLAlchemyError, ImportError) as e:
        raise UserError(f"store {shown}: cannot use it: {_first_line(e)}") from None
    try:
        migrate(engine, shown)
    except (SQLAlchemyError, CommandError) as e:
        engine.dispose()
        raise UserError(f"store {shown}: cannot open it: {_first_line(e)}") from None
    except UserError:
        engine.dispose()
        raise
    return engine


def store_url(url_or_path: str | Path, *, create: bool = True) -> URL:
    """The SQLAlchemy URL of a store given as a URL or a SQLite file path; 'postgresql://' means
    the psycopg (3) driver. UserError for what cannot be a store."""
    value = str(url_or_path)
    if "://" not in value:
        return _sqlite_url(Path(value).expanduser(), create)
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):  # ValueError: e.g. a port that is not a number
        hidden = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", value)  # a password, if the text holds one
        raise UserError(f"store '{hidden}': not a database URL (sqlite:///PATH or "
                        "postgresql+psycopg://USER@HOST/DB)") from None
    backend = url.get_backend_name()
    if backend not in SUPPORTED:
        raise UserError(f"store {url.render_as_string(hide_password=True)}: database '{backend}' is not "
                        f"supported (use {' or '.join(SUPPORTED)})")
    if backend == "sqlite":
        if not url.database or url.database == ":memory:":
            raise UserError(f"store '{value}': give a file (an in-memory SQLite store forgets every run)")
        return _sqlite_url(Path(url.database).expanduser(), create)
    return url.set(drivername="postgresql+psycopg") if url.drivername == "postgresql" else url


def _sqlite_url(path: Path, create: bool) -> URL:
    if path.is_dir():
        raise UserError(f"store {path}: is a directory (give a file, e.g. {path / DEFAULT_FILE})")
    if not create and not path.is_file():
        raise UserError(f"store {path}: no such file (no run recorded there yet)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return URL.create("sqlite", database=str(path))


def _engine(url: URL) -> Engine:
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    engine = create_engine(url)
    event.listen(engine, "connect", _sqlite_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # the driver emits no BEGIN of its own: _sqlite_begin does
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _switch_to_wal(cur)  # readers never block the writer, nor it them
    cur.close()


def _switch_to_wal(cur: sqlite3.Cursor) -> None:
    """PRAGMA journal_mode=WAL, retried while another process holds the lock. Switching a new
    store's journal escalates a shared lock to an exclusive one, and SQLite answers SQLITE_BUSY at
    once there instead of waiting (waiting could deadlock), whatever the busy timeout: two
    processes opening a new store together failed about 1 time in 80 without this."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if e.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))  # jittered: the other opener finishes first


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock now: a deferred transaction that reads and then writes could
    # fail with "database is locked" at once (its snapshot is stale), whatever the busy timeout.
    deferred = conn.get_execution_options().get(READ_ONLY, False)
    conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A connection for queries only (on SQLite it does not take the write lock)."""
    with engine.connect() as conn:
        yield conn.execution_options(**{READ_ONLY: True})


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, in code: the migrations shipped inside this package."""
    cfg = Config()
    cfg.set_main_option("script_location", "quantgate.store:migrations")
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, shown: str, revision: str = "head") -> None:
    """Bring the store's schema to `revision` (a store written before migrations is first stamped
    as version 1), in one transaction holding the store's write lock."""
    script = ScriptDirectory.from_config(alembic_config())
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_MIGRATION_LOCK})
        state = _schema_state(conn, script, shown)
        if state == revision or (revision == "head" and state == script.get_current_head()):
            return
        cfg = alembic_config(conn)
        if state == V1:
            command.stamp(cfg, BASELINE_REVISION)
        if revision != "head" and state not in (None, V1) and _is_ahead(script, state, revision):
            command.downgrade(cfg, revision)
        else:
            command.upgrade(cfg, revision)


def _is_ahead(script: ScriptDirectory, state: str, revision: str) -> bool:
    return any(r.revision == revision for r in script.iterate_revisions(state, "base"))


def _schema_state(conn: Connection, script: ScriptDirectory, shown: str) -> str | None:
    """The store's schema revision; V1 for a store written before migrations; None for an empty
    database. UserError for a newer schema than this quantgate knows, or for a database that holds
    quantgate's tables without any schema version."""
    tables = set(inspect(conn).get_table_names())
    if VERSION_TABLE in tables:
        revisions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        if len(revisions) != 1:
            raise UserError(f"store {shown}: {VERSION_TABLE} holds {len(revisions)} revisions, expected one")
        if revisions[0] not in {r.revision for r in script.walk_revisions()}:
            raise _newer(shown, f"revision {revisions[0]}", script)
        return revisions[0]
    if meta.name in tables:
        version = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
        if version == "1":
            return V1
        if version is not None and version.isdigit() and int(version) > 1:
            raise _newer(shown, f"version {version}", script)
        raise UserError(f"store {shown}: quantgate_meta.schema_version is {version!r}, which no quantgate wrote")
    ours = sorted(tables & set(metadata.tables))
    if ours:
        raise UserError(f"store {shown}: has tables {', '.join(ours)} but no schema version: "
                        "not a quantgate store, or a damaged one")
    return None


def _newer(shown: str, schema: str, script: ScriptDirectory) -> UserError:
    return UserError(f"store {shown}: written by a newer quantgate (schema {schema}; this quantgate reads up to "
                     f"revision {script.get_current_head()}, schema version {SCHEMA_VERSION}): upgrade quantgate, "
                     "or use another store")


def _first_line(e: BaseException) -> str:
    cause = getattr(e, "orig", None) or e
    lines = [x.strip() for x in str(cause).splitlines() if x.strip()]
    return lines[0] if lines else type(cause).__name__
