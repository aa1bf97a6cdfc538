"""Every run recorded: SQLAlchemy 2 over SQLite (a file under the results directory) by default,
PostgreSQL by URL; the schema is versioned and migrated by Alembic (see connect and schema).

    store = open_store(store_location(option, cfg.store, results_dir))
    record_run(store, record)                       # at the end of a run (a RunRecord)
    record_items(store, key, items, run_id=..., candidate=...)   # as items are scored
    scored_items(store, key)                        # what a resumed run need not score again
    record_drift(store, check); last_drift(store, model, candidate); history(store, model)
"""

from quantgate.store.connect import ENV_VAR, open_store, store_location
from quantgate.store.queries import (
    HistoryRow, RunRow, history, last_drift, load_run, run_artifacts, run_metrics, run_rows, scored_items,
)
from quantgate.store.records import (
    DRIFT_OUTCOMES, Artifact, DriftCheck, ItemKey, ItemResult, digest, metric_rows, record_drift, record_items,
    record_run,
)
from quantgate.store.schema import SCHEMA_VERSION

__all__ = [
    "DRIFT_OUTCOMES", "ENV_VAR", "SCHEMA_VERSION", "Artifact", "DriftCheck", "HistoryRow", "ItemKey", "ItemResult",
    "RunRow", "digest", "history", "last_drift", "load_run", "metric_rows", "open_store", "record_drift",
    "record_items", "record_run", "run_artifacts", "run_metrics", "run_rows", "scored_items", "store_location",
]
