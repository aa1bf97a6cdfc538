"""Eval items and where they come from: the default offline suite and JSONL / text files.

Item kinds (a JSONL set may mix them, and mix tasks by a "task" field):
  - ChoiceItem: the model picks the option whose continuation it finds most likely. Ordinary
    multiple choice shares the context and varies the continuation (" " + choice); Winograd style
    varies the context and shares the continuation.
  - ClozeItem: a context and its gold continuation (LAMBADA); correct when every continuation token
    is the model's greedy choice.
  - GenerationItem: greedy generation scored against the gold answer and its aliases (exact match,
    contains, or a user scorer).
  - PromptItem: an unlabeled prompt; scored only by agreement with the baseline's output.
Plain text files (.txt, .raw) give held-out text for perplexity and KL divergence.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from quantgate import readers
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

    @property
    def gold_answer(self) -> str:
        return self.answer(self.gold)


@dataclass(frozen=True)
class ClozeItem:
    id: str
    task: str
    context: str
    continuation: str  # the gold next word(s), joined to the context as written

    @property
    def prompt(self) -> str:
        return self.context

    @property
    def gold_answer(self) -> str:
        return self.continuation.strip()


@dataclass(frozen=True)
class GenerationItem:
    id: str
    task: str
    context: str
    answers: tuple[str, ...]  # the answer first, then its aliases

    @property
    def prompt(self) -> str:
        return self.context

    @property
    def gold_answer(self) -> str:
        return self.answers[0]


@dataclass(frozen=True)
class PromptItem:
    id: str
    task: str
    prompt: str

    @property
    def gold_answer(self) -> str:
        return ""


Item = ChoiceItem | ClozeItem | GenerationItem | PromptItem


@dataclass(frozen=True)
class TaskSpec:
    """How a task's items are rendered and scored (from the eval set's config entry)."""

    chat_template: bool = False  # render contexts/prompts with the tokenizer's chat template
    match: str = "exact"  # generation: "exact" or "contains", after normalisation
    scorer: str | None = None  # generation: "module:function" (prediction, item) -> score in [0, 1]
    max_new_tokens: int = 32


@dataclass(frozen=True)
class EvalSuite:
    name: str
    items: tuple[Item, ...]
    perplexity_text: str | None  # held-out prose for perplexity / KL windows
    specs: dict[str, TaskSpec] = field(default_factory=dict)  # per task; absent = TaskSpec()
    # (task, id, id of the earlier identical item): same content, reported, kept.
    duplicates: tuple[tuple[str, str, str], ...] = ()

    def spec(self, task: str) -> TaskSpec:
        return self.specs.get(task, TaskSpec())

    def texts(self) -> list[str]:
        """Every text the suite shows a model (for the calibration overlap check)."""
        out = [self.perplexity_text or ""]
        for item in self.items:
            for key, value in vars(item).items():
                if key in ("id", "task"):
                    continue
                if isinstance(value, str):
                    out.append(value)
                elif isinstance(value, tuple):  # contexts, continuations, answers
                    out.extend(v for v in value if isinstance(v, str))
        return out

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
    n_cloze = cloze_items if limit is None else min(cloze_items, limit)  # limit caps every task
    items = _first_per_task(mc, limit) + cloze(n_cloze, seed=seed)
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


def read_jsonl(path: Path, *, task: str | None = None) -> list[Item]:
    """Read a JSONL eval set; each line's fields decide its kind (see the module docstring). An
    optional "task" field groups items, an optional "id" names them (default: task-line). Errors
    name the file and line (decoding and JSON checks: quantgate.readers)."""
    items = []
    for lineno, obj in readers.read_jsonl(path, "eval set"):
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object")
        items.append(_item(obj, f"{path}:{lineno}", lineno, task or str(obj.get("task", path.stem))))
    if not items:
        raise UserError(f"{path}: eval set has no items")
    _check_unique_ids(items, path)
    return items


def _string(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string")
    return value


def _strings(obj: dict, key: str, where: str, least: int) -> list[str]:
    value = obj.get(key)
    if not isinstance(value, list) or len(value) < least or not all(isinstance(v, str) for v in value):
        raise UserError(f"{where}: '{key}' must be a list of at least {least} strings")
    return value


def _gold(obj: dict, key: str, n: int, where: str) -> int:
    gold = obj.get("gold")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < n:
        raise UserError(f"{where}: 'gold' must be an integer index into '{key}' (0..{n - 1})")
    return gold


def _item(obj: dict, where: str, lineno: int, task: str) -> Item:
    item_id = str(obj.get("id", f"{task}-{lineno}"))
    if "choices" in obj:
        query, choices = _string(obj, "query", where), _strings(obj, "choices", where, 2)
        return ChoiceItem.multiple_choice(item_id, task, query, choices, _gold(obj, "choices", len(choices), where))
    if "context_options" in obj:
        options, cont = _strings(obj, "context_options", where, 2), _string(obj, "continuation", where)
        return ChoiceItem.winograd(item_id, task, options, cont, _gold(obj, "context_options", len(options), where))
    if "answer" in obj or "aliases" in obj:
        answer = _string(obj, "answer", where)
        aliases = _strings(obj, "aliases", where, 0) if "aliases" in obj else []
        answers = tuple(dict.fromkeys([answer, *aliases]))
        return GenerationItem(item_id, task, _string(obj, "context", where), answers)
    if "continuation" in obj:
        cont = _string(obj, "continuation", where)
        if not cont.strip():
            raise UserError(f"{where}: 'continuation' is empty")
        context = _string(obj, "context", where)
        joined = cont[:1].isspace() or context[-1:].isspace() or not context  # a space already, or none needed
        return ClozeItem(item_id, task, context, cont if joined else " " + cont)
    if "prompt" in obj:
        return PromptItem(item_id, task, _string(obj, "prompt", where))
    raise UserError(
        f"{where}: expected 'query'+'choices', 'context_options'+'continuation', 'context'+'continuation', "
        "'context'+'answer' or 'prompt'"
    )


def read_text(path: Path) -> str:
    """A plain text file of held-out text for perplexity / KL windows."""
    text = readers.read_text(path, "text file")
    if not text.strip():
        raise UserError(f"{path}: text file is empty")
    return text


def find_duplicates(items: list[Item]) -> tuple[tuple[str, str, str], ...]:
    """(task, id, first id) for each item whose content repeats an earlier item of its task."""
    first: dict[tuple, str] = {}
    dupes = []
    for item in items:
        key = (type(item).__name__, item.task, *[v for k, v in vars(item).items() if k not in ("id", "task")])
        if key in first:
            dupes.append((item.task, item.id, first[key]))
        else:
            first[key] = item.id
    return tuple(dupes)


def _check_unique_ids(items: list[ChoiceItem], path: Path) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise UserError(f"{path}: item id '{item.id}' appears more than once")
        seen.add(item.id)


TEXT_SUFFIXES = (".txt", ".raw")


def load_suite(gate, *, limit: int | None, cloze_items: int, seed: int, import_scorers: bool = True) -> EvalSuite:
    """The eval suite a quality_gate config names: "default", "none", one JSONL file, or
    eval_sets (JSONL and text files, each with its own options). Scorers are imported here, so a
    bad one is reported before any model work (import_scorers=False: `quantgate check`, which
    runs no user code)."""
    from quantgate.evals.scoring import load_scorer

    if gate.eval_sets is None:
        if gate.eval_set == "default":
            return default_suite(limit=limit, cloze_items=cloze_items, seed=seed)
        if gate.eval_set == "none":
            return EvalSuite("none", (), prose.pool_text("perplexity"))
        entries = [(Path(gate.eval_set), None, limit, TaskSpec())]
    else:
        entries = [
            (Path(e.path), e.task, e.limit or limit,
             TaskSpec(e.chat_template, e.match, e.scorer, e.max_new_tokens))
            for e in gate.eval_sets
        ]
    items: list[Item] = []
    specs: dict[str, TaskSpec] = {}
    texts = []
    for path, task, n, spec in entries:
        if path.suffix in TEXT_SUFFIXES:
            texts.append(read_text(path))
            continue
        if spec.scorer and import_scorers:
            load_scorer(spec.scorer)
        read = _first_per_task(read_jsonl(path, task=task), n)
        specs.update({item.task: spec for item in read})
        items += read
    _check_unique_ids(items, Path(", ".join(str(e[0]) for e in entries)))
    name = entries[0][0].stem if len(entries) == 1 else "+".join(e[0].stem for e in entries)
    text = "\n\n".join(texts) if texts else prose.pool_text("perplexity")
    return EvalSuite(name, tuple(items), text, specs, find_duplicates(items))
