"""Tests for quantgate.evals.datasets (default suite, cloze, JSONL files) and quantgate.evals.prose."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import pytest

from quantgate.config import QualityGateConfig
from quantgate.errors import UserError
from quantgate.evals import prose
from quantgate.evals.datasets import ChoiceItem, cloze, default_suite, load_suite, read_jsonl

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"  # <repo>/../shared/data
MC_FILES = ("piqa", "arc_easy", "arc_challenge", "openbook_qa", "copa", "boolq")
WINOGRAD_FILES = ("winogrande",)


# ---------------------------------------------------------------- the default suite


@pytest.fixture(scope="module")
def suite0():
    return default_suite(limit=None, cloze_items=200, seed=0)


def test_default_suite_is_deterministic(suite0):
    again = default_suite(limit=None, cloze_items=200, seed=0)
    assert again == suite0  # frozen dataclasses: items, order, text all equal
    other = default_suite(limit=None, cloze_items=200, seed=1)
    mc0 = [i for i in suite0.items if i.task == "default-mc"]
    mc1 = [i for i in other.items if i.task == "default-mc"]
    assert mc0 == mc1  # the hand-written part does not depend on the seed
    cz0 = [i for i in suite0.items if i.task == "default-cloze"]
    cz1 = [i for i in other.items if i.task == "default-cloze"]
    assert len(cz0) == len(cz1) == 200
    assert cz0 != cz1
    # different sentences are drawn, and shared sentences get different distractors / order
    assert {i.id for i in cz0} != {i.id for i in cz1}
    assert other.perplexity_text == suite0.perplexity_text == prose.pool_text("perplexity")


def test_default_suite_sizes(suite0):
    assert suite0.name == "default"
    tasks = suite0.tasks
    assert tasks["default-cloze"] == 200
    assert tasks["default-mc"] >= 200
    small = default_suite(limit=10, cloze_items=0, seed=0)
    assert small.tasks == {"default-mc": 10}
    assert small.items == suite0.items[:10]
    assert len(suite0.perplexity_text) > 10_000
    with pytest.raises(UserError, match="cloze_items"):
        default_suite(limit=None, cloze_items=100_000, seed=0)


def test_hand_written_items_are_valid(suite0):
    mc = [i for i in suite0.items if i.task == "default-mc"]
    assert len(mc) >= 200
    ids = [i.id for i in suite0.items]
    assert len(ids) == len(set(ids))
    for item in mc:
        n = len(item.continuations)
        assert n >= 2 and len(item.contexts) == n
        assert 0 <= item.gold < n and isinstance(item.gold, int)
        assert all(c.startswith(" ") and c.strip() for c in item.continuations)
        assert len(set(item.continuations)) == n, f"{item.id}: repeated option"
        assert len(set(item.contexts)) == 1 and item.contexts[0].strip()
    # the packaged file is what the suite holds, line for line
    path = Path(str(resources.files("quantgate.evals") / "data" / "default_mc.jsonl"))
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == len(mc)
    for obj, item in zip(lines, mc):
        assert item.id == obj["id"] and item.gold == obj["gold"]
        assert item.answer(item.gold) == obj["choices"][obj["gold"]]


def test_cloze_items(suite0):
    def ws(text: str) -> str:
        return re.sub(r"\s+", " ", text)

    pool = "\n".join(ws(p) for t in prose.pool_topics("cloze") for p in prose.paragraphs(t.text))
    items = [i for i in suite0.items if i.task == "default-cloze"]
    for item in items:
        ctx = item.contexts[0]
        assert len(set(item.contexts)) == 1
        options = [c.strip() for c in item.continuations]
        answer = options[item.gold]
        assert len(options) == 4 and len(set(options)) == 4
        assert all(re.fullmatch(r"[a-z]{4,}", o) for o in options)
        assert ctx.split()[-1] != answer
        assert not ctx.endswith(" " + answer)
        # the hidden word really is the sentence's last word in the cloze prose
        assert ws(f"{ctx} {answer}.") in pool, item.id
        assert item.id.startswith("cloze-")
    # gold positions are shuffled, not always the same slot
    assert len({i.gold for i in items}) == 4


def test_cloze_zero_and_seed():
    assert cloze(0, seed=0) == []
    assert cloze(5, seed=3) == cloze(5, seed=3)
    assert cloze(5, seed=3) != cloze(5, seed=4)


# ---------------------------------------------------------------- prose pools


def test_prose_pools_are_disjoint():
    names = {p: {t.name for t in prose.pool_topics(p)} for p in prose.POOLS}
    assert all(names[p] for p in prose.POOLS)
    for a in prose.POOLS:
        for b in prose.POOLS:
            if a < b:
                assert not names[a] & names[b], (a, b)
    assert set().union(*names.values()) == {t.name for t in prose.topics()}
    with pytest.raises(ValueError):
        prose.pool_topics("nonsense")


def test_evaluated_pools_share_no_paragraph_with_calibration():
    paras = {p: {x for t in prose.pool_topics(p) for x in prose.paragraphs(t.text)} for p in prose.POOLS}
    assert len(paras["cloze"]) > 100 and len(paras["calibration"]) > 100 and len(paras["perplexity"]) > 10
    assert not paras["cloze"] & paras["calibration"]
    assert not paras["perplexity"] & paras["calibration"]
    assert not paras["cloze"] & paras["perplexity"]
    # and no calibration paragraph occurs inside the perplexity text
    ppl = re.sub(r"\s+", " ", prose.pool_text("perplexity"))
    assert not [p for p in paras["calibration"] if len(p) > 80 and p in ppl]


def test_sentences_split():
    assert prose.sentences('One two. Three four! "Five" six? (Seven) eight.') == [
        "One two.", "Three four!", '"Five" six?', "(Seven) eight.",
    ]
    assert prose.sentences("e.g. this stays. x.y") == ["e.g. this stays. x.y"]


# ---------------------------------------------------------------- JSONL files


def _write(tmp_path: Path, lines: list[str], name: str = "set.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD_MC = json.dumps({"query": "Q?", "choices": ["a", "b"], "gold": 1})
GOOD_WINO = json.dumps({"context_options": ["A did", "B did"], "continuation": "it.", "gold": 0})


def test_read_jsonl_parses_both_kinds(tmp_path):
    named = json.dumps({"id": "x", "task": "t", "query": "Q", "choices": ["p", "q", "r"], "gold": 2})
    path = _write(tmp_path, [GOOD_MC, "", GOOD_WINO, named])
    items = read_jsonl(path)
    assert items[0] == ChoiceItem("set-1", "set", ("Q?", "Q?"), (" a", " b"), 1)
    assert items[1] == ChoiceItem("set-3", "set", ("A did", "B did"), (" it.", " it."), 0)  # line 3
    assert items[2].id == "x" and items[2].task == "t" and items[2].gold == 2
    assert read_jsonl(path, task="forced")[0].task == "forced"


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ('{"query": "Q", "choices": ["a", "b"], "gold": 0', "not valid JSON"),
        (json.dumps({"choices": ["a", "b"], "gold": 0}), "'query' must be a string"),
        (json.dumps({"query": "Q", "choices": ["a", "b"]}), "'gold'"),
        (json.dumps({"query": "Q", "gold": 0}), "expected 'query'+'choices'"),
        (json.dumps({"context_options": ["a", "b"], "gold": 0}), "'continuation' must be a string"),
        (json.dumps({"query": "Q", "choices": ["a", "b"], "gold": 2}), "'gold' must be an integer index"),
        (json.dumps({"query": "Q", "choices": ["a", "b"], "gold": -1}), "'gold' must be an integer index"),
        (json.dumps({"query": "Q", "choices": ["a", "b"], "gold": True}), "'gold'"),
        (json.dumps({"query": "Q", "choices": ["a", "b"], "gold": "0"}), "'gold'"),
        (json.dumps({"query": "Q", "choices": "a b", "gold": 0}), "'choices' must be a list"),
        (json.dumps({"query": "Q", "choices": ["a"], "gold": 0}), "'choices' must be a list of at least 2"),
        (json.dumps({"query": "Q", "choices": ["a", 3], "gold": 0}), "'choices' must be a list"),
        (json.dumps({"context_options": "ab", "continuation": "c", "gold": 0}), "'context_options' must be a list"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad, fragment):
    # line 1 good, line 2 blank (still counted), line 3 bad
    path = _write(tmp_path, [GOOD_MC, "", bad, GOOD_MC])
    with pytest.raises(UserError) as err:
        read_jsonl(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert fragment in msg


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match="no items"):
        read_jsonl(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_duplicate_ids_are_an_error(tmp_path):
    a = json.dumps({"id": "dup", "query": "Q", "choices": ["a", "b"], "gold": 0})
    b = json.dumps({"id": "dup", "query": "R", "choices": ["c", "d"], "gold": 1})
    with pytest.raises(UserError, match="'dup' appears more than once"):
        read_jsonl(_write(tmp_path, [a, GOOD_MC, b]))
    # an explicit id equal to another line's default id is a duplicate too
    c = json.dumps({"id": "set-1", "query": "R", "choices": ["c", "d"], "gold": 1})
    with pytest.raises(UserError, match="more than once"):
        read_jsonl(_write(tmp_path, [GOOD_MC, c]))


def test_load_suite_from_file(tmp_path):
    path = _write(tmp_path, [GOOD_MC, GOOD_WINO], name="mine.jsonl")
    suite = load_suite(QualityGateConfig(eval_set=str(path)), limit=None, cloze_items=0, seed=0)
    assert suite.name == "mine" and len(suite.items) == 2 and suite.tasks == {"mine": 2}
    assert suite.perplexity_text == prose.pool_text("perplexity")
    assert suite.duplicates == ()


# ---------------------------------------------------------------- the shared real data sets


def _manifest_counts() -> dict[str, int]:
    text = (SHARED_DATA / "MANIFEST.md").read_text(encoding="utf-8")
    return {m[1]: int(m[2]) for m in re.finditer(r"^\| (\w+)\.jsonl \| (\d+) \|", text, re.M)}


@pytest.mark.parametrize("name", MC_FILES + WINOGRAD_FILES)
def test_shared_data_files_read(name):
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.skip(f"{SHARED_DATA} is absent")
    counts = _manifest_counts()
    assert name in counts, f"{name} not in MANIFEST.md"
    items = read_jsonl(SHARED_DATA / f"{name}.jsonl")
    assert len(items) == counts[name]
    assert {i.task for i in items} == {name}
    for item in items:
        n = len(item.contexts)
        assert n == len(item.continuations) >= 2 and 0 <= item.gold < n
        if name in WINOGRAD_FILES:
            assert len(set(item.continuations)) == 1 and len(set(item.contexts)) == n
        else:
            assert len(set(item.contexts)) == 1


def test_manifest_counts_known():
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        pytest.skip(f"{SHARED_DATA} is absent")
    counts = _manifest_counts()
    assert {k: counts[k] for k in MC_FILES + WINOGRAD_FILES} == {
        "piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "openbook_qa": 500,
        "copa": 100, "boolq": 3270, "winogrande": 1267,
    }
