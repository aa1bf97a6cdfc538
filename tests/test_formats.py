"""Eval-set formats: every kind of JSONL line, text files, errors naming file:line, duplicates,
limits, the real shared data sets as they are, and short-answer scoring (quantgate.evals.datasets
and quantgate.evals.scoring)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from quantgate.config import QualityGateConfig
from quantgate.errors import UserError
from quantgate.evals import prose
from quantgate.evals.datasets import (
    ChoiceItem,
    ClozeItem,
    EvalSuite,
    GenerationItem,
    PromptItem,
    TaskSpec,
    load_suite,
    read_jsonl,
)
from quantgate.evals.metrics import model_metrics
from quantgate.evals.scoring import (
    contains,
    exact_match,
    first_line,
    load_scorer,
    normalize,
    score_generation,
)
from quantgate.evals.tasks import ModelScores, PreparedSuite

from conftest import CharTokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(tmp_path: Path, rows: list, name: str = "set.jsonl") -> Path:
    """One line per row: a dict is dumped as JSON, a str is written as it is."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _suite(*entries, limit=None) -> EvalSuite:
    """load_suite over eval_sets entries (paths or dicts of EvalSetConfig fields)."""
    sets = [e if isinstance(e, dict) else {"path": str(e)} for e in entries]
    return load_suite(QualityGateConfig(eval_sets=sets), limit=limit, cloze_items=0, seed=0)


MC = {"query": "Q?", "choices": ["a", "b", "c"], "gold": 2}
WINO = {"context_options": ["Ann did", "Bob did"], "continuation": "it.", "gold": 1}
CLOZE = {"context": "The cat sat on the", "continuation": "mat"}
GEN = {"context": "Question: capital of France?\nAnswer:", "answer": "Paris", "aliases": ["Paris, France", "Paris"]}
PROMPT = {"prompt": "Write a haiku about rain."}


# ---------------------------------------------------------------- every kind of line


def test_every_kind_is_read(tmp_path):
    path = _write(tmp_path, [MC, WINO, CLOZE, GEN, PROMPT])
    items = read_jsonl(path)
    assert items == [
        ChoiceItem("set-1", "set", ("Q?",) * 3, (" a", " b", " c"), 2),
        ChoiceItem("set-2", "set", ("Ann did", "Bob did"), (" it.", " it."), 1),
        ClozeItem("set-3", "set", "The cat sat on the", " mat"),
        GenerationItem("set-4", "set", GEN["context"], ("Paris", "Paris, France")),  # answer first, deduped
        PromptItem("set-5", "set", "Write a haiku about rain."),
    ]
    assert [i.gold_answer for i in items] == ["c", "Bob did", "mat", "Paris", ""]
    assert items[2].prompt == CLOZE["context"] and items[4].prompt == PROMPT["prompt"]


@pytest.mark.parametrize(
    "context,continuation,expected",
    [
        ("The cat sat on the", "mat", " mat"),  # neither side has a space: one is inserted
        ("The cat sat on the", " mat", " mat"),  # the continuation has it
        ("The cat sat on the ", "mat", "mat"),  # the context has it
        ("Line one\n", "mat", "mat"),  # any whitespace counts
        ("", "mat", "mat"),  # nothing to separate
        ("The cat sat on the", "mat and the hat", " mat and the hat"),
    ],
)
def test_cloze_joins_context_and_continuation_with_one_space(tmp_path, context, continuation, expected):
    (item,) = read_jsonl(_write(tmp_path, [{"context": context, "continuation": continuation}]))
    assert isinstance(item, ClozeItem)
    assert item.context == context and item.continuation == expected
    assert item.gold_answer == continuation.strip()
    whole = item.context + item.continuation
    assert "  " not in whole and whole.strip().endswith(continuation.strip())


def test_generation_without_aliases_and_with_a_gold_id(tmp_path):
    rows = [{"id": "q7", "context": "C", "answer": "A"}, {"context": "C", "answer": "A", "aliases": []}]
    a, b = read_jsonl(_write(tmp_path, rows))
    assert a == GenerationItem("q7", "set", "C", ("A",))
    assert b.answers == ("A",) and b.id == "set-2"


def test_mixed_file_with_task_field_gives_several_tasks(tmp_path):
    rows = [
        {**MC, "task": "quiz"}, {**GEN, "task": "qa"}, {**MC, "query": "R?", "task": "quiz"},
        {**PROMPT, "task": "chat"}, {**CLOZE, "task": "lambada"}, {**GEN, "context": "Other?", "task": "qa"},
        WINO,  # no task field: the file's name
    ]
    path = _write(tmp_path, rows, name="mixed.jsonl")
    suite = load_suite(QualityGateConfig(eval_set=str(path)), limit=None, cloze_items=0, seed=0)
    assert suite.name == "mixed"
    assert suite.tasks == {"quiz": 2, "qa": 2, "chat": 1, "lambada": 1, "mixed": 1}
    kinds = {item.task: type(item) for item in suite.items}
    assert kinds == {"quiz": ChoiceItem, "qa": GenerationItem, "chat": PromptItem, "lambada": ClozeItem,
                     "mixed": ChoiceItem}
    assert [i.id for i in suite.items][:2] == ["quiz-1", "qa-2"]  # default ids: task-line
    # an eval_sets entry's task overrides the lines' task fields
    forced = _suite({"path": str(path), "task": "all"})
    assert forced.tasks == {"all": 7}


# ---------------------------------------------------------------- malformed lines name file:line


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ('{"context": "C", "answer": "A"', "not valid JSON"),
        (json.dumps({"answer": "Paris", "aliases": ["Paris"]}), "'context' must be a string"),
        (json.dumps({"context": "C", "aliases": ["x"]}), "'answer' must be a string"),
        (json.dumps({"context": "C", "answer": "A", "aliases": "Paris"}), "'aliases' must be a list"),
        (json.dumps({"context": "C", "answer": "A", "aliases": ["ok", 3]}), "'aliases' must be a list"),
        (json.dumps({"context": "C", "answer": "A", "aliases": [["nested"]]}), "'aliases' must be a list"),
        (json.dumps({"context": "C", "continuation": ""}), "'continuation' is empty"),
        (json.dumps({"context": "C", "continuation": "   "}), "'continuation' is empty"),
        (json.dumps({"continuation": "word"}), "'context' must be a string"),
        (json.dumps({"context": "C", "continuation": 5}), "'continuation' must be a string"),
        (json.dumps({"prompt": ["not", "a", "string"]}), "'prompt' must be a string"),
        (json.dumps({"text": "what kind is this?"}), "expected 'query'+'choices'"),
        (json.dumps({}), "expected 'query'+'choices'"),
        (json.dumps("a bare string"), "expected a JSON object"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, bad, fragment):
    # lines: good, blank (counted), good, bad, good
    path = _write(tmp_path, [GEN, "", CLOZE, bad, PROMPT])
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:4: "), msg
    assert fragment in msg and "\n" not in msg
    # and through load_suite, unchanged
    with pytest.raises(UserError, match=re.escape(f"{path}:4: ")):
        _suite(path)


# ---------------------------------------------------------------- duplicates, text, scorers, limits


def test_duplicates_are_reported_not_errors(tmp_path):
    rows = [
        {"id": "a", **GEN}, {"id": "b", **MC}, {"id": "c", **GEN},  # c repeats a
        {"id": "d", **GEN, "task": "other"},  # same content, another task: not a duplicate
        {"id": "e", **MC, "gold": 0},  # different gold: different content
        {"id": "f", **MC}, {"id": "g", **GEN},  # repeat b and a
    ]
    suite = _suite(_write(tmp_path, rows))
    assert len(suite.items) == 7  # all kept
    assert suite.duplicates == (("set", "c", "a"), ("set", "f", "b"), ("set", "g", "a"))
    clean = _suite(_write(tmp_path, [MC, GEN, CLOZE, PROMPT], name="clean.jsonl"))
    assert clean.duplicates == ()


def test_text_files_give_the_perplexity_text(tmp_path):
    items = _write(tmp_path, [MC])
    (tmp_path / "held.txt").write_text("Held-out text one.\n", encoding="utf-8")
    (tmp_path / "more.raw").write_text(" = Title = \n more text\n", encoding="utf-8")
    suite = _suite(items, tmp_path / "held.txt")
    assert suite.perplexity_text == "Held-out text one.\n"
    assert suite.tasks == {"set": 1} and suite.name == "set+held"
    both = _suite(tmp_path / "held.txt", items, tmp_path / "more.raw")
    assert both.perplexity_text == "Held-out text one.\n\n\n = Title = \n more text\n"
    assert len(both.items) == 1
    # no text file: the packaged prose
    assert _suite(items).perplexity_text == prose.pool_text("perplexity")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(UserError, match="empty"):
        _suite(items, tmp_path / "empty.txt")
    with pytest.raises(UserError, match="not found"):
        _suite(items, tmp_path / "missing.raw")


@pytest.mark.parametrize(
    "scorer,fragment",
    [("nomodule:fn", "cannot import nomodule"), ("json:no_such_function", "has no function no_such_function")],
)
def test_bad_scorer_fails_at_load_time(tmp_path, scorer, fragment):
    path = _write(tmp_path, [GEN])
    with pytest.raises(UserError) as err:
        _suite({"path": str(path), "scorer": scorer})
    msg = str(err.value)
    assert fragment in msg and scorer in msg
    assert len(msg.splitlines()) == 1


def test_specs_per_task_come_from_their_entry(tmp_path):
    a = _write(tmp_path, [GEN], name="a.jsonl")
    b = _write(tmp_path, [{**GEN, "task": "b1"}, {**PROMPT, "task": "b2"}], name="b.jsonl")
    suite = _suite({"path": str(a), "match": "contains", "max_new_tokens": 5},
                   {"path": str(b), "chat_template": True, "scorer": "json:dumps"})
    assert suite.spec("a") == TaskSpec(match="contains", max_new_tokens=5)
    assert suite.spec("b1") == suite.spec("b2") == TaskSpec(chat_template=True, scorer="json:dumps")
    assert suite.spec("unknown") == TaskSpec()


def test_limit_per_task(tmp_path):
    rows = [{**MC, "query": f"q{i}", "task": t} for i, t in enumerate("aabababbbaa")]  # a: 6, b: 5
    path = _write(tmp_path, rows)
    gate = QualityGateConfig(eval_set=str(path))
    assert load_suite(gate, limit=None, cloze_items=0, seed=0).tasks == {"a": 6, "b": 5}
    two = load_suite(gate, limit=2, cloze_items=0, seed=0)
    assert two.tasks == {"a": 2, "b": 2}
    assert [i.contexts[0] for i in two.items] == ["q0", "q1", "q2", "q4"]  # the first of each, in order
    assert load_suite(gate, limit=100, cloze_items=0, seed=0).tasks == {"a": 6, "b": 5}
    # an eval_sets entry's own limit wins over the run's
    assert _suite({"path": str(path), "limit": 1}, limit=3).tasks == {"a": 1, "b": 1}
    assert _suite({"path": str(path)}, limit=3).tasks == {"a": 3, "b": 3}


# ---------------------------------------------------------------- the shared real data sets


def _manifest() -> tuple[dict[str, int], dict[str, str]]:
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.skip(f"{SHARED_DATA} is absent")
    text = (SHARED_DATA / "MANIFEST.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| ([\w.]+) \| ([^|]+) \|", text, re.M)
    rows = [(name, n) for name, n in rows if "." in name]  # not the header row
    counts = {name: int(n) for name, n in rows if n.strip().isdigit()}
    sizes = {name: n.strip() for name, n in rows}
    return counts, sizes


KIND_OF = {
    "piqa": "mc", "arc_easy": "mc", "arc_challenge": "mc", "openbook_qa": "mc", "copa": "mc", "boolq": "mc",
    "winogrande": "winograd", "lambada_openai": "cloze", "triviaqa_sm_sub": "generation",
}


def test_manifest_lists_every_shared_file():
    counts, sizes = _manifest()
    files = {p.name for p in SHARED_DATA.iterdir() if p.name != "MANIFEST.md"}
    assert files == set(sizes)
    assert set(counts) == {f"{k}.jsonl" for k in KIND_OF}
    assert sizes["wikitext2_test.raw"] == "~245k words"


@pytest.mark.parametrize("name", sorted(KIND_OF))
def test_shared_jsonl_loads_as_it_is(name):
    counts, _ = _manifest()
    path = SHARED_DATA / f"{name}.jsonl"
    suite = _suite(path)
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    assert len(suite.items) == len(raw) == counts[path.name]
    assert suite.tasks == {name: counts[path.name]}
    kind = KIND_OF[name]
    for item, obj in zip(suite.items, raw):
        if kind == "mc":
            assert isinstance(item, ChoiceItem) and len(set(item.contexts)) == 1
            assert item.answer(item.gold) == obj["choices"][obj["gold"]]
        elif kind == "winograd":
            assert isinstance(item, ChoiceItem) and len(set(item.continuations)) == 1
            assert item.contexts[item.gold] == obj["context_options"][obj["gold"]]
        elif kind == "cloze":
            assert isinstance(item, ClozeItem) and item.gold_answer == obj["continuation"].strip()
            ctx, cont = obj["context"], obj["continuation"]
            sep = "" if ctx[-1:].isspace() or cont[:1].isspace() else " "  # one line starts "\n\n"
            assert item.context == ctx and item.continuation == sep + cont
        else:
            assert isinstance(item, GenerationItem) and item.context == obj["context"]
            assert item.answers[0] == obj["answer"] and set(item.answers) == {obj["answer"], *obj["aliases"]}
            assert len(item.answers) == len(set(item.answers))
    # duplicates are reported, never fatal; they are real repeats of content
    for task, dup, first in suite.duplicates:
        assert task == name and dup != first


def test_shared_wikitext_is_the_perplexity_text():
    _, sizes = _manifest()
    path = SHARED_DATA / "wikitext2_test.raw"
    suite = _suite(SHARED_DATA / "copa.jsonl", path)
    assert suite.perplexity_text == path.read_text(encoding="utf-8")
    words = len(suite.perplexity_text.split())
    assert sizes[path.name] == "~245k words" and abs(words - 245_000) < 0.05 * 245_000


def test_all_shared_files_load_together():
    counts, _ = _manifest()
    files = sorted(p for p in SHARED_DATA.iterdir() if p.suffix in (".jsonl", ".raw"))
    suite = _suite(*files)
    assert suite.tasks == {name.removesuffix(".jsonl"): n for name, n in sorted(counts.items())}
    assert suite.perplexity_text == (SHARED_DATA / "wikitext2_test.raw").read_text(encoding="utf-8")
    assert len({i.id for i in suite.items}) == len(suite.items)


# ---------------------------------------------------------------- short-answer scoring


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The Beatles", "beatles"),
        ("  An apple a DAY!  ", "apple day"),
        ("Hello,\tworld...\n", "hello world"),
        ("the theater, an anthem", "theater anthem"),  # articles are whole words only
        ("U.S.A.", "usa"),
        ("A", ""),
        ("", ""),
    ],
)
def test_normalize(text, expected):
    assert normalize(text) == expected


def test_exact_match_over_answer_and_aliases():
    answers = ("The Beatles", "Fab Four")
    assert exact_match("beatles.", answers) == 1.0
    assert exact_match("  THE FAB FOUR!", answers) == 1.0
    assert exact_match("The Beatles band", answers) == 0.0
    assert exact_match("Beatle", answers) == 0.0
    assert isinstance(exact_match("x", answers), float)


def test_contains_is_word_bounded():
    assert contains("It was Paris, France.", ("paris",)) == 1.0
    assert contains("a Parisian cafe", ("Paris",)) == 0.0
    assert contains("I live in New York City", ("new york",)) == 1.0
    assert contains("Newark, not York", ("new york",)) == 0.0
    assert contains("the answer", ("", "The")) == 0.0  # answers that normalise to nothing never match
    assert contains("Rome", ("Paris", "Rome")) == 1.0


def test_only_the_first_line_counts():
    assert first_line("\n\n  Paris  \nLondon") == "Paris"
    assert exact_match("Paris\nQuestion: what else? London", ("Paris",)) == 1.0
    assert exact_match("\n Paris \n", ("Paris",)) == 1.0
    assert exact_match("London\nParis", ("Paris",)) == 0.0
    assert contains("I think\nit is Paris", ("Paris",)) == 0.0


SCORER_MODULE = "qg_test_user_scorer"


@pytest.fixture
def user_scorer(tmp_path, monkeypatch):
    (tmp_path / f"{SCORER_MODULE}.py").write_text(
        "def partial(prediction, item):\n"
        "    return 1.0 if item.answers[0].lower() in prediction.lower() else 0.25\n"
        "def too_big(prediction, item):\n"
        "    return 1.5\n"
        "def negative(prediction, item):\n"
        "    return -0.1\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, SCORER_MODULE, raising=False)
    yield SCORER_MODULE
    sys.modules.pop(SCORER_MODULE, None)


def test_user_scorer(user_scorer):
    item = GenerationItem("q1", "t", "C", ("Paris",))
    scorer = load_scorer(f"{user_scorer}:partial")
    assert score_generation("it is paris of course", item, "exact", scorer) == 1.0
    assert score_generation("London", item, "exact", scorer) == 0.25
    # no scorer: the match mode decides
    assert score_generation("it is paris", item, "exact", None) == 0.0
    assert score_generation("it is paris", item, "contains", None) == 1.0
    for name in ("too_big", "negative"):
        with pytest.raises(UserError, match=r"item 'q1'.*\[0, 1\]"):
            score_generation("x", item, "exact", load_scorer(f"{user_scorer}:{name}"))
    with pytest.raises(UserError, match="has no function"):
        load_scorer(f"{user_scorer}:missing")
    with pytest.raises(UserError, match="expected 'module:function'"):
        load_scorer("no_colon")


def _generated(tok: CharTokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]


def test_model_metrics_scores_generations_by_each_tasks_spec(user_scorer):
    """Generated token ids -> decoded text -> first line -> scored under the task's spec."""
    tok = CharTokenizer()
    items = (
        GenerationItem("e1", "exact", "C", ("Paris", "City of Light")),
        GenerationItem("e2", "exact", "C", ("Paris",)),
        GenerationItem("c1", "contains", "C", ("Paris",)),
        GenerationItem("u1", "user", "C", ("Rome",)),
        GenerationItem("u2", "user", "C", ("Rome",)),
        PromptItem("p1", "chat", "Say hi"),
    )
    specs = {"contains": TaskSpec(match="contains"), "user": TaskSpec(scorer=f"{user_scorer}:partial")}
    outputs = ["The city of light.\nmore", "Paris is nice", "It is Paris.", "ROME!", "Milan", " Hi there \n"]
    prepared = PreparedSuite(
        suite=EvalSuite("gen", items, None, specs), requests=[], offsets=np.zeros(len(items) + 1, dtype=int),
        option_chars=np.zeros(0, dtype=int), prompts={i: [1] for i in range(len(items))}, windows=[],
        n_text_windows=0, stop_ids=(),
    )
    scores = ModelScores(
        option_ll=np.zeros(0), option_greedy=np.zeros(0, dtype=bool),
        generations={i: _generated(tok, text) for i, text in enumerate(outputs)},
        token_nll=np.zeros(0), kld=None, top1_agree=None, window_of=np.zeros(0, dtype=int), seconds=0.0,
    )
    m = model_metrics(scores, prepared, "accuracy", tok)
    np.testing.assert_array_equal(m.score, [1.0, 0.0, 1.0, 1.0, 0.25, np.nan])
    assert m.answers == ["The city of light.", "Paris is nice", "It is Paris.", "ROME!", "Milan", "Hi there"]
    assert m.correct.tolist() == [True, False, True, True, False, False]
    assert m.accuracy == pytest.approx((1 + 0 + 1 + 1 + 0.25) / 5)
    assert m.per_task == pytest.approx({"exact": 0.5, "contains": 1.0, "user": 0.625})
