"""Every run recorded: SQLAlchemy 2 over SQLite (a file under the results directory) by default."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

SCHEMA_VERSION = 1


class Base(DeclarativeBase):
    pass


class RunRow(Base):
    __tablename__ = "runs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(String(64), unique=True)
    started: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    model_base: Mapped[str] = mapped_column(String(512))
    model_sha256: Mapped[str] = mapped_column(String(64))
    config_digest: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    recommended: Mapped[str | None] = mapped_column(String(128), nullable=True)
    exit_code: Mapped[int] = mapped_column(Integer)
    results: Mapped[dict[str, Any]] = mapped_column(JSON)
    candidates: Mapped[list[CandidateRow]] = relationship(back_populates="run", cascade="all, delete-orphan")


class CandidateRow(Base):
    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_pk: Mapped[int] = mapped_column(ForeignKey("runs.id"))
    name: Mapped[str] = mapped_column(String(128))
    method: Mapped[str] = mapped_column(String(32))
    bits: Mapped[int] = mapped_column(Integer)
    group_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    weight_bytes: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float] = mapped_column(Float)
    recovery: Mapped[float | None] = mapped_column(Float, nullable=True)
    flip_rate: Mapped[float] = mapped_column(Float)
    kld_mean: Mapped[float] = mapped_column(Float)
    kld_p99: Mapped[float] = mapped_column(Float)
    top1_agreement: Mapped[float] = mapped_column(Float)
    passed: Mapped[bool] = mapped_column(Boolean)
    run: Mapped[RunRow] = relationship(back_populates="candidates")


class MetaRow(Base):
    __tablename__ = "quantgate_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


def open_store(url_or_path: str | Path) -> Engine:
    """An engine for a store URL, or for a SQLite file path; creates the schema if new."""
    url = str(url_or_path)
    if "://" not in url:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{url}"
    engine = create_engine(url)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    with Session(engine) as s:
        row = s.get(MetaRow, "schema_version")
        if row is None:
            s.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            s.commit()
        elif int(row.value) != SCHEMA_VERSION:
            raise RuntimeError(f"store {url}: schema version {row.value}, this quantgate reads {SCHEMA_VERSION}")
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    cur.execute("PRAGMA busy_timeout=30000")  # concurrent writers wait instead of failing
    cur.close()


def record_run(engine: Engine, data: dict[str, Any]) -> None:
    """Store one run (the dict of report.data.to_dict)."""
    run = RunRow(
        run_id=data["run_id"],
        started=datetime.fromisoformat(data["started"]),
        finished=datetime.fromisoformat(data["finished"]),
        model_base=data["model"]["base"],
        model_sha256=data["model"]["sha256"],
        config_digest=data["config_digest"],
        config=data["config"],
        recommended=data["recommendation"]["candidate"],
        exit_code=data["exit_code"],
        results=json.loads(json.dumps(data)),
    )
    for c in data["candidates"]:
        vs = c["vs_baseline"]
        run.candidates.append(CandidateRow(
            name=c["name"], method=c["method"], bits=c["bits"], group_size=c["group_size"],
            weight_bytes=c["weight_bytes"], accuracy=c["accuracy"], recovery=vs["recovery"],
            flip_rate=vs["flips"]["rate"], kld_mean=vs["kld_mean"], kld_p99=vs["kld_p99"],
            top1_agreement=vs["top1_agreement"], passed=c["gate"]["passed"],
        ))
    with Session(engine) as s:
        s.add(run)
        s.commit()


def list_runs(engine: Engine) -> list[RunRow]:
    with Session(engine) as s:
        return list(s.scalars(select(RunRow).order_by(RunRow.started)))
