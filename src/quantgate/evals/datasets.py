"""Eval items and where they come from: the default offline suite and JSONL files.

Every labeled item is a choice among options. An option is (context, continuation): ordinary
multiple choice shares the context and varies the continuation (" " + choice); Winograd style
varies the context and shares the continuation. The model picks the option whose continuation it
finds most likely.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from quantgate.errors import UserError
from quantgate.evals import prose


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    task: str
    contexts: tuple[str, ...]  # one per option
    continuations: tuple[str, ...]  # one per option
    gold: int

    @classmethod
    def multiple_choice(cls, id: str, task: str, query: str, choices: list[str], gold: int) -> ChoiceItem:
        return cls(id, task, (query,) * len(choices), tuple(" " + c for c in choices), gold)

    @classmethod
    def winograd(cls, id: str, task: str, options: list[str], continuation: str, gold: int) -> ChoiceItem:
        return cls(id, task, tuple(options), (" " + continuation,) * len(options), gold)

    @property
    def prompt(self) -> str:
        """A readable rendering of the question (for flip reports)."""
        if len(set(self.contexts)) == 1:
            return self.contexts[0]
        return " | ".join(self.contexts) + " →" + self.continuations[0]

    def answer(self, option: int) -> str:
        if len(set(self.contexts)) == 1:
            return self.continuations[option].strip()
        return self.contexts[option]


@dataclass(frozen=True)
class EvalSuite:
    name: str
    items: tuple[ChoiceItem, ...]
    perplexity_text: str | None  # held-out prose for perplexity / KL windows

    @property
    def tasks(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.items:
            counts[item.task] = counts.get(item.task, 0) + 1
        return counts


# -- the default suite --------------------------------------------------------------------------


def default_suite(*, limit: int | None, cloze_items: int, seed: int) -> EvalSuite:
    """The project's own offline suite: hand-written multiple choice, a cloze task over standard
    library prose, and held-out prose for perplexity/KLD. Deterministic for a seed and Python."""
    mc_path = resources.files("quantgate.evals") / "data" / "default_mc.jsonl"
    mc = read_jsonl(Path(str(mc_path)), task="default-mc")
    items = _first_per_task(mc, limit) + cloze(cloze_items, seed=seed)
    return EvalSuite("default", tuple(items), prose.pool_text("perplexity"))


def _first_per_task(items: list[ChoiceItem], limit: int | None) -> list[ChoiceItem]:
    if limit is None:
        return list(items)
    taken: dict[str, int] = {}
    out = []
    for item in items:
        if taken.get(item.task, 0) < limit:
            taken[item.task] = taken.get(item.task, 0) + 1
            out.append(item)
    return out


_CLOZE_TARGET = re.compile(r"^(?P<context>.*\S) (?P<word>[a-z]{4,})\.$")


def cloze(n: int, *, seed: int, n_options: int = 4) -> list[ChoiceItem]:
    """n cloze items from the "cloze" prose pool. Each hides the last word of a sentence of 8-40
    words whose last word is a lowercase word of >= 4 letters; the context is the sentence before
    it (same paragraph) plus the sentence up to that word. Distractors are other such words from
    the same pool, drawn with `seed`; the options' order is shuffled with the same generator."""
    if n == 0:
        return []
    candidates: dict[tuple[str, str], str] = {}  # (context, word) -> id; the topics repeat text
    vocab: set[str] = set()
    for topic in prose.pool_topics("cloze"):
        for p, para in enumerate(prose.paragraphs(topic.text)):
            sents = prose.sentences(para)
            vocab.update(re.findall(r"\b[a-z]{4,}\b", para))
            for i, s in enumerate(sents):
                m = _CLOZE_TARGET.match(s)
                if m and 8 <= len(s.split()) <= 40:
                    before = sents[i - 1] + " " if i > 0 else ""
                    candidates.setdefault((before + m["context"], m["word"]), f"{topic.name}:{p}:{i}")
    if n > len(candidates):
        raise UserError(f"evaluation.cloze_items: {n} asked, the prose pool has {len(candidates)} sentences")
    rng = random.Random(seed)
    words = sorted(vocab)
    items = []
    pool = sorted((key, context, word) for (context, word), key in candidates.items())
    for key, context, word in sorted(rng.sample(pool, n)):
        options = [word] + rng.sample([w for w in words if w != word], n_options - 1)
        rng.shuffle(options)
        items.append(ChoiceItem.multiple_choice(f"cloze-{key}", "default-cloze", context, options, options.index(word)))
    return items


# -- JSONL files --------------------------------------------------------------------------------


def read_jsonl(path: Path, *, task: str | None = None) -> list[ChoiceItem]:
    """Read a JSONL eval set of multiple-choice ({"query", "choices", "gold"}) or Winograd-style
    ({"context_options", "continuation", "gold"}) lines; an optional "task" field groups items,
    an optional "id" names them (default: the line number). Errors name the file and line."""
    if not path.is_file():
        raise UserError(f"{path}: eval set not found")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON: {e.msg}") from None
            items.append(_item(obj, path, lineno, task or path.stem))
    if not items:
        raise UserError(f"{path}: eval set has no items")
    _check_unique_ids(items, path)
    return items


def _item(obj: object, path: Path, lineno: int, default_task: str) -> ChoiceItem:
    where = f"{path}:{lineno}"
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    item_id = str(obj.get("id", f"{default_task}-{lineno}"))
    task = str(obj.get("task", default_task))
    gold = obj.get("gold")
    if "choices" in obj:
        options, kind = obj["choices"], "choices"
        query = obj.get("query")
        if not isinstance(query, str):
            raise UserError(f"{where}: 'query' must be a string")
    elif "context_options" in obj:
        options, kind = obj["context_options"], "context_options"
        if not isinstance(obj.get("continuation"), str):
            raise UserError(f"{where}: 'continuation' must be a string")
    else:
        raise UserError(f"{where}: expected 'query'+'choices' or 'context_options'+'continuation'")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
        raise UserError(f"{where}: '{kind}' must be a list of at least 2 strings")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
        raise UserError(f"{where}: 'gold' must be an integer index into '{kind}' (0..{len(options) - 1})")
    if kind == "choices":
        return ChoiceItem.multiple_choice(item_id, task, query, options, gold)
    return ChoiceItem.winograd(item_id, task, options, obj["continuation"], gold)


def _check_unique_ids(items: list[ChoiceItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise UserError(f"{path}: item id '{item.id}' appears more than once")
        seen.add(item.id)


def load_suite(eval_set: str, *, limit: int | None, cloze_items: int, seed: int) -> EvalSuite:
    if eval_set == "default":
        return default_suite(limit=limit, cloze_items=cloze_items, seed=seed)
    path = Path(eval_set)
    return EvalSuite(path.stem, tuple(_first_per_task(read_jsonl(path), limit)), prose.pool_text("perplexity"))
