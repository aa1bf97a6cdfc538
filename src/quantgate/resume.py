"""Resuming a killed run: every model's finished items are recorded in the store as they are
scored, keyed by what makes them reusable, and a resumed run (`quantgate run --resume`) scores
only what is missing.

The key of a model's items is (model weights sha256, settings digest, data digest):
  - settings: the baseline's reference and engine, or a candidate's full settings, the engine,
    the calibration data's digest and the seed (everything its outputs depend on);
  - data: the token ids the engine sees (every request, prompt and generation limit), so a
    changed eval set or tokenizer never reuses stale results.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
from sqlalchemy.engine import Engine as Store

from quantgate.methods.registry import MethodConfig
from quantgate.config import RunConfig
from quantgate.evals.datasets import GenerationItem
from quantgate.evals.tasks import ItemOutput, PreparedSuite, WindowOutput
from quantgate.store import ItemKey, ItemResult, digest, record_items, scored_items

WINDOWS_TASK = "__windows__"  # the pseudo-item that holds a model's per-window results


def data_digest(prepared: PreparedSuite) -> str:
    items = prepared.suite.items
    prompts = {str(i): [p, prepared.suite.spec(items[i].task).max_new_tokens, isinstance(items[i], GenerationItem)]
               for i, p in prepared.prompts.items()}
    return digest({"requests": prepared.requests, "offsets": prepared.offsets.tolist(), "prompts": prompts,
                   "stop_ids": prepared.stop_ids, "windows": prepared.windows})


def settings_digest(cfg: RunConfig, cand: MethodConfig | None, calibration: str | None) -> str:
    if cand is None:
        return digest({"baseline": cfg.reference, "engine": cfg.serving.engine})
    return digest({"candidate": cand.model_dump(mode="json"), "engine": cfg.serving.engine,
                   "calibration": calibration, "seed": cfg.seed})


@dataclass
class StoreCache:
    """evals.tasks.ScoreCache over the store. With resume=False nothing is read back (a fresh
    run), but everything is still recorded, so that run can itself be resumed."""

    store: Store
    key: ItemKey
    prepared: PreparedSuite
    chunk_items: int  # items scored between two writes
    label: str
    resume: bool

    @cached_property
    def _rows(self) -> dict[tuple[str, str], ItemResult]:
        """What the store held for this key when first asked: one query per model. Later writes are
        this run's own, so the snapshot stays right for the reads that follow (known, windows, meta)."""
        return scored_items(self.store, self.key) if self.resume else {}

    def _id(self, i: int) -> tuple[str, str]:
        item = self.prepared.suite.items[i]
        return item.task, f"{i}:{item.id}"  # the index keeps ids unique even with duplicate items

    def known(self) -> dict[int, ItemOutput]:
        rows = self._rows
        out = {}
        for i in range(len(self.prepared.suite.items)):
            r = rows.get(self._id(i))
            if r is not None:
                out[i] = ItemOutput(r.option_ll or (), r.option_greedy or (), r.generation)
        return out

    def record(self, outputs: dict[int, ItemOutput]) -> None:
        rows = [ItemResult(*self._id(i), correct=None, score=None, answer=None, option_ll=o.option_ll,
                           option_greedy=o.option_greedy, generation=o.generation) for i, o in outputs.items()]
        record_items(self.store, self.key, rows, candidate=self.label)

    def windows(self) -> WindowOutput | None:
        row = self._rows.get((WINDOWS_TASK, "all"))
        if row is None:
            return None
        x = row.extra
        return WindowOutput(
            token_nll=np.array(x["token_nll"], dtype=np.float64),
            kld=None if x["kld"] is None else np.array(x["kld"], dtype=np.float64),
            top1_agree=None if x["top1"] is None else np.array(x["top1"], dtype=bool),
            window_of=np.array(x["window_of"], dtype=np.int64),
        )

    def record_windows(self, out: WindowOutput) -> None:
        extra = {"token_nll": out.token_nll.tolist(), "kld": None if out.kld is None else out.kld.tolist(),
                 "top1": None if out.top1_agree is None else out.top1_agree.astype(int).tolist(),
                 "window_of": out.window_of.tolist()}
        row = ItemResult(WINDOWS_TASK, "all", correct=None, score=None, answer=None, extra=extra)
        record_items(self.store, self.key, [row], candidate=self.label)

    def meta(self) -> dict | None:
        """What the model's making reported (sizes, counts), recorded once it was evaluated."""
        row = self._rows.get((WINDOWS_TASK, "model"))
        return None if row is None else dict(row.extra)

    def record_meta(self, meta: dict) -> None:
        row = ItemResult(WINDOWS_TASK, "model", correct=None, score=None, answer=None, extra=meta)
        record_items(self.store, self.key, [row], candidate=self.label)

    def complete(self) -> bool:
        """Every item and the windows are recorded: the model need not even be built."""
        return (len(self.known()) == len(self.prepared.suite.items) and self.windows() is not None
                and self.meta() is not None)
