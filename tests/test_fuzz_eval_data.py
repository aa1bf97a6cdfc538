"""Fuzzing eval data (JSONL eval sets, text files, calibration data): encodings, nesting, lone
surrogates, malformed lines. `quantgate run` reads the eval set before any model work: every case
is exit 2, one line naming the file and line, no traceback, no run. A UTF-8 byte-order mark is
read, not refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fuzz_cli import no_run_left, quantgate, refused

MC = '{"query": "Question: 2 + 2?\\nAnswer:", "choices": ["4", "5"], "gold": 0}'


def lines(*rows: str) -> bytes:
    return ("\n".join(rows) + "\n").encode()


def good(n: int = 3) -> list[str]:
    return [json.dumps({"id": f"q{i}", "query": f"Question: {i} + 1?\nAnswer:", "choices": [str(i + 1), str(i + 2)],
                        "gold": 0}) for i in range(n)]


# (id, the eval file's bytes, fragments; {path} is the file)
CASES = [
    ("latin1", lines(*good(2)) + '{"query": "café?", "choices": ["a", "b"], "gold": 0}\n'.encode("latin-1"),
     ["{path}:3", "not UTF-8", "0xe9"]),
    ("invalid-utf8-mid-line", lines(*good(1)) + b'{"query": "\xc3\x28", "choices": ["a", "b"], "gold": 0}\n',
     ["{path}:2", "not UTF-8"]),
    ("overlong-utf8", b'{"query": "\xc0\xaf", "choices": ["a", "b"], "gold": 0}\n', ["{path}:1", "not UTF-8"]),
    ("encoded-surrogate", b'{"query": "\xed\xa0\x80", "choices": ["a", "b"], "gold": 0}\n', ["{path}:1", "not UTF-8"]),
    ("utf16", lines(*good(2)).decode().encode("utf-16"), ["{path}", "UTF-16"]),
    ("nul", lines(*good(2)) + b'{"query": "a\x00b", "choices": ["a", "b"], "gold": 0}\n', ["{path}:3", "NUL byte"]),
    ("deep-json", lines(*good(1)) + b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
     ["{path}:2", "nested too deeply"]),
    ("nested-150", lines(*good(1), '{"query": "q", "choices": ["a", "b"], "gold": 0, "x": '
                         + "[" * 150 + "]" * 150 + "}"), ["{path}:2", "nested more than 100"]),
    ("lone-high-surrogate", lines(*good(1), '{"query": "broken \\ud800 text", "choices": ["a", "b"], "gold": 0}'),
     ["{path}:2", "lone surrogate"]),
    ("lone-low-surrogate-in-choice", lines('{"query": "q", "choices": ["a\\udc00", "b"], "gold": 0}'),
     ["{path}:1", "lone surrogate"]),
    ("surrogate-in-key", lines('{"query": "q", "choices": ["a", "b"], "gold": 0, "\\ud83d": 1}'),
     ["{path}:1", "lone surrogate"]),
    ("surrogate-in-cloze", lines('{"context": "The cat sat on the", "continuation": " mat\\udfff"}'),
     ["{path}:1", "lone surrogate"]),
    ("surrogate-in-prompt", lines('{"prompt": "\\ud800"}'), ["{path}:1", "lone surrogate"]),
    ("array-line", lines(*good(1), "[1, 2, 3]"), ["{path}:2", "expected a JSON object"]),
    ("string-line", lines(*good(1), '"just a string"'), ["{path}:2", "expected a JSON object"]),
    ("number-line", lines("3.14"), ["{path}:1", "expected a JSON object"]),
    ("truncated-line", lines(*good(2)) + b'{"query": "q", "choices": ["a"', ["{path}:3", "not valid JSON"]),
    ("two-objects-one-line", lines(MC + " " + MC), ["{path}:1", "not valid JSON"]),
    ("nan-gold", lines('{"query": "q", "choices": ["a", "b"], "gold": NaN}'), ["{path}:1", "'gold'"]),
    ("bool-gold", lines('{"query": "q", "choices": ["a", "b"], "gold": true}'), ["{path}:1", "'gold'"]),
    ("huge-gold", lines('{"query": "q", "choices": ["a", "b"], "gold": 1e999}'), ["{path}:1", "'gold'"]),
    ("gold-out-of-range", lines('{"query": "q", "choices": ["a", "b"], "gold": 2}'), ["{path}:1", "'gold'"]),
    ("choices-not-list", lines('{"query": "q", "choices": "ab", "gold": 0}'), ["{path}:1", "'choices'"]),
    ("one-choice", lines('{"query": "q", "choices": ["a"], "gold": 0}'), ["{path}:1", "'choices'"]),
    ("query-number", lines('{"query": 7, "choices": ["a", "b"], "gold": 0}'), ["{path}:1", "'query'"]),
    ("no-kind", lines('{"text": "what am I?"}'), ["{path}:1", "expected 'query'+'choices'"]),
    ("empty-continuation", lines('{"context": "a", "continuation": "  "}'), ["{path}:1", "'continuation' is empty"]),
    ("empty-file", b"", ["{path}", "no items"]),
    ("blank-lines", b"\n\n   \n\t\n", ["{path}", "no items"]),
    ("duplicate-ids", lines(*good(1), *good(1)), ["{path}", "'q0' appears more than once"]),
]


def write_config(tmp: Path, gate: str) -> Path:
    path = tmp / "config.yaml"
    path.write_text(f"quality_gate: {gate}\nresults_dir: {tmp / 'results'}\n")
    return path


@pytest.mark.parametrize("name, data, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_eval_set_is_one_line(tmp_path, capfd, name, data, fragments):
    data_path = tmp_path / "set.jsonl"
    data_path.write_bytes(data)
    config = write_config(tmp_path, "{eval_set: set.jsonl}")
    refused(quantgate(capfd, "run", str(config)), *(f.format(path=data_path.resolve()) for f in fragments))
    no_run_left(tmp_path / "results")


TEXT_CASES = [
    ("latin1", "Größe und Maß\n".encode("latin-1"), ["{path}:1", "not UTF-8"]),
    ("utf16", "held-out text\n".encode("utf-16"), ["{path}", "UTF-16"]),
    ("nul", b"held-out\x00text\n", ["{path}:1", "NUL byte"]),
    ("empty", b"", ["{path}", "text file is empty"]),
    ("whitespace", b" \n\n \t\n", ["{path}", "text file is empty"]),
]


@pytest.mark.parametrize("name, data, fragments", TEXT_CASES, ids=[c[0] for c in TEXT_CASES])
def test_bad_text_file_is_one_line(tmp_path, capfd, name, data, fragments):
    (tmp_path / "set.jsonl").write_text(MC + "\n")
    text = tmp_path / "held-out.txt"
    text.write_bytes(data)
    config = write_config(tmp_path, "{eval_sets: [{path: set.jsonl}, {path: held-out.txt}]}")
    refused(quantgate(capfd, "run", str(config)), *(f.format(path=text.resolve()) for f in fragments))
    no_run_left(tmp_path / "results")


CALIBRATION_CASES = [
    ("latin1", ".txt", "Größe\n".encode("latin-1"), ["{path}:1", "not UTF-8"]),
    ("jsonl-surrogate", ".jsonl", b'{"text": "\\ud800"}\n', ["{path}:1", "lone surrogate"]),
    ("jsonl-no-text", ".jsonl", b'{"txt": "hello"}\n', ["{path}:1", "'text' string"]),
    ("jsonl-deep", ".jsonl", b"[" * 50_000 + b"]" * 50_000 + b"\n", ["{path}:1", "nested too deeply"]),
    ("missing", ".txt", None, ["{path}", "calibration data not found"]),
]


@pytest.mark.parametrize("name, suffix, data, fragments", CALIBRATION_CASES, ids=[c[0] for c in CALIBRATION_CASES])
def test_bad_calibration_data_is_one_line(tmp_path, capfd, name, suffix, data, fragments):
    """Checked by `quantgate check` before anything is loaded (a run reads it after the model)."""
    calib = tmp_path / f"calib{suffix}"
    if data is not None:
        calib.write_bytes(data)
    config = tmp_path / "config.yaml"
    config.write_text(f"candidates: [{{method: gptq, bits: 4}}]\ncalibration: {{data: {calib}}}\n"
                      "evaluation: {limit: 5, cloze_items: 5}\n")
    refused(quantgate(capfd, "check", str(config)), *(f.format(path=calib) for f in fragments))


def test_a_byte_order_mark_is_read_not_refused(tmp_path, capfd):
    (tmp_path / "set.jsonl").write_bytes(b"\xef\xbb\xbf" + lines(*good(3)))
    config = write_config(tmp_path, "{eval_set: set.jsonl}")
    o = quantgate(capfd, "check", str(config), "--json")
    assert o.code == 0, o.err
    assert json.loads(o.out)["tasks"] == {"set": 3}


def test_crlf_and_unicode_line_separators_are_text(tmp_path, capfd):
    """CRLF line ends, and U+2028 inside a string (valid JSON; str.splitlines would cut there)."""
    rows = [json.dumps({"query": "a\u2028b", "choices": ["x", "y"], "gold": 1}, ensure_ascii=False), *good(2)]
    (tmp_path / "set.jsonl").write_bytes("\r\n".join(rows).encode() + b"\r\n")
    o = quantgate(capfd, "check", str(write_config(tmp_path, "{eval_set: set.jsonl}")), "--json")
    assert o.code == 0, o.err
    assert json.loads(o.out)["items"] == 3
