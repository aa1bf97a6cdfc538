"""A digest of the prepared eval set: what every model of a run is run and scored on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

from quantgate.evals.datasets import ChoiceItem, GenerationItem
from quantgate.evals.tasks import PreparedSuite


def eval_digest(prepared: PreparedSuite) -> str:
    """sha256 of the canonical JSON of the prepared suite: each item's id, task, kind and label
    (gold option, gold answers), each task's scoring spec, and the token ids the tokenizer made of
    it (option requests, prompts, held-out text windows, stop tokens). The baseline's response
    windows are left out: they are outputs, not eval data. Equal digests mean the same items,
    labels and tokens, so recorded metrics can be compared with re-measured ones."""
    suite = prepared.suite
    items = [{"id": item.id, "task": item.task, "kind": type(item).__name__, "label": _label(item)}
             for item in suite.items]
    canonical = {
        "items": items,
        "specs": {task: asdict(spec) for task, spec in sorted(suite.specs.items())},
        "requests": [[list(ctx), list(cont)] for ctx, cont in prepared.requests],
        "offsets": prepared.offsets.tolist(),
        "option_chars": prepared.option_chars.tolist(),
        "prompts": {str(i): ids for i, ids in sorted(prepared.prompts.items())},
        "windows": prepared.windows[: prepared.n_text_windows],
        "stop_ids": list(prepared.stop_ids),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _label(item) -> int | list[str] | None:
    """The gold a correct answer is judged by (a cloze item's gold is its continuation's tokens)."""
    if isinstance(item, ChoiceItem):
        return item.gold
    if isinstance(item, GenerationItem):
        return list(item.answers)
    return None
