"""Fuzzing the config: bytes, encodings, nesting, sizes and values a YAML file (or a flag) can
hold. Every case is `quantgate run` on it: exit 2, one line on stderr naming the file and line, the
key or the flag, no traceback, no run. All stop before any model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzz_cli import no_run_left, quantgate, quantgate_process, refused

VALID = b"candidates:\n  - {method: rtn, bits: 8}\nevaluation: {limit: 5, cloze_items: 5}\n"

# (id, the config file's bytes, fragments the error line must hold; {path} is the file)
CASES = [
    # encodings and bytes
    ("invalid-utf8", b"model:\n  base: caf\xff\n", ["{path}:2", "not UTF-8"]),
    ("latin1", "model:\n  base: café\n".encode("latin-1"), ["{path}:2", "not UTF-8", "0xe9"]),
    ("utf16-le-bom", "model:\n  base: x\n".encode("utf-16"), ["{path}", "UTF-16"]),
    ("utf16-be-bom", b"\xfe\xff" + "model: {}\n".encode("utf-16-be"), ["{path}", "UTF-16"]),
    ("utf16-no-bom", "model: {}\n".encode("utf-16-le"), ["{path}:1", "NUL byte"]),
    ("utf32-bom", "model: {}\n".encode("utf-32"), ["{path}", "UTF-16/UTF-32"]),
    ("nul-byte", b"model:\n  base: a\x00b\n", ["{path}:2", "NUL byte"]),
    ("nul-only", b"\x00" * 64, ["{path}:1", "NUL byte"]),
    ("control-char", b"model:\n  base: a\x07b\n", ["{path}:2", "malformed YAML"]),
    ("random-binary", bytes(range(1, 256)) * 4, ["{path}:2", "not UTF-8", "0x80"]),
    ("truncated-utf8", "model: {base: é".encode()[:-1], ["{path}:1", "not UTF-8"]),
    # structure
    ("empty", b"", ["{path}", "config is empty"]),
    ("comment-only", b"# nothing here\n", ["{path}", "config is empty"]),
    ("top-level-list", b"- model\n- candidates\n", ["{path}:1", "mapping"]),
    ("top-level-scalar", b"42\n", ["{path}:1", "mapping"]),
    ("deep-list", b"model: " + b"[" * 100_000 + b"]" * 100_000 + b"\n", ["{path}", "nested too deeply"]),
    ("deep-mapping", b"model: " + b"{a: " * 20_000 + b"1" + b"}" * 20_000 + b"\n", ["{path}", "nested too deeply"]),
    ("deep-block", b"".join(b"  " * i + b"a:\n" for i in range(300)), ["{path}", "nested more than 100"]),
    ("nested-150", b"x: " + b"[" * 150 + b"]" * 150 + b"\n", ["{path}", "nested more than 100"]),
    ("alias-bomb", b"a: &a [x, x, x, x, x, x, x, x, x, x]\n"
                   + b"".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n".encode()
                              for i in range(7)), ["{path}", "more than 1,000,000 values"]),
    ("python-tag", b"model: !!python/object/apply:os.system ['echo pwned']\n", ["{path}:1", "malformed YAML"]),
    ("unclosed-flow", b"model: {base: x\ncandidates: []\n", ["{path}", "malformed YAML"]),
    ("tab-indent", b"model:\n\tbase: x\n", ["{path}:2", "malformed YAML"]),
    ("unhashable-key", b"? [a, b]\n: 1\n", ["{path}:1", "malformed YAML"]),
    ("int-key", b"1: x\n", ["{path}:1", "Keys should be strings"]),
    ("duplicate-doc", b"model: {}\n---\nmodel: {}\n", ["{path}", "malformed YAML"]),
    # values
    ("seed-2**64", b"seed: 18446744073709551616\n", ["{path}:1", "seed", "less than or equal"]),
    ("seed-negative-huge", b"seed: -99999999999999999999999\n", ["{path}:1", "seed", "greater than or equal"]),
    ("seed-float", b"seed: 1.5\n", ["{path}:1", "seed"]),
    ("seed-inf", b"seed: .inf\n", ["{path}:1", "seed"]),
    ("calibration-seed-2**64", b"calibration: {seed: 18446744073709551616}\n", ["{path}:1", "calibration.seed"]),
    ("nan-floor", b"quality_gate: {min_acceptable: .nan}\n", ["{path}:1", "quality_gate.min_acceptable", "finite"]),
    ("inf-price", b"economics: {hardware_cost_per_hour: .inf, tokens_per_month: 1}\n",
     ["{path}:1", "economics.hardware_cost_per_hour", "finite"]),
    ("nan-task-floor", b"quality_gate: {task_floors: {a: .nan}}\n", ["{path}:1", "task_floors.a"]),
    ("nan-alpha", b"candidates: [{method: smoothquant, alpha: .nan}]\n", ["{path}:1", "candidates.0.alpha"]),
    ("huge-bootstrap", b"quality_gate: {bootstrap_samples: 1000000000000}\n", ["{path}:1", "bootstrap_samples"]),
    ("huge-new-tokens", b"economics: {new_tokens: 100000000}\n", ["{path}:1", "economics.new_tokens"]),
    ("bits-float", b"candidates: [{method: rtn, bits: 4.5}]\n", ["{path}:1", "candidates.0.bits"]),
    ("bits-string", b"candidates: [{method: rtn, bits: four}]\n", ["{path}:1", "candidates.0.bits"]),
    ("unknown-method", b"candidates: [{method: magic}]\n", ["{path}:1", "method is one of"]),
    ("candidate-list-of-lists", b"candidates: [[1, 2]]\n", ["{path}:1", "candidates.0"]),
    ("candidates-mapping", b"candidates: {method: rtn}\n", ["{path}:1", "candidates"]),
    ("model-list", b"model: [a, b]\n", ["{path}:1", "model"]),
    ("unknown-top-key", b"modle: {base: x}\n", ["{path}:1", "unknown key 'modle'"]),
    ("long-string-key", b"x" * 100_000 + b": 1\n", ["{path}:1", "malformed YAML"]),
    ("engine-unknown", b"serving: {engine: warp}\n", ["serving.engine 'warp'"]),
    ("store-scheme", b"store: ftp://host/db\n", ["store", "ftp"]),
    # paths the config names
    ("results-dir-is-file", b"results_dir: a-file\n", ["results_dir", "a-file is a file"]),
    ("results-dir-parent-is-file", b"results_dir: a-file/runs\n", ["results_dir", "a-file is a file"]),
    ("results-dir-dev-null", b"results_dir: /dev/null/runs\n", ["results_dir", "/dev/null is a file"]),
    ("eval-set-missing", b"quality_gate: {eval_set: nope.jsonl}\n", ["nope.jsonl", "not found"]),
    ("eval-set-directory", b"quality_gate: {eval_set: a-dir}\n", ["a-dir", "is a directory"]),
    ("model-gguf-missing", b"model: {base: nope.gguf}\n", ["nope.gguf", "not found"]),
    ("model-neither", b"model: {base: ./a-file}\n", ["a-file", "neither a directory nor a .gguf"]),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A working directory holding a file and a directory that configs may name."""
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "a-dir").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name, data, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_config_is_one_line(workdir, capfd, name, data, fragments):
    path = workdir / "config.yaml"
    path.write_bytes(data)
    refused(quantgate(capfd, "run", str(path)), *(f.format(path=path) for f in fragments))
    no_run_left(workdir / "quantgate-results")


# (flags, fragments): flags build the config too, and a bad one is named as written
FLAG_CASES = [
    (["--candidate", "rtn:12"], ["--candidate rtn:12", "candidates.0.bits"]),
    (["--candidate", "rtn:8", "--candidate", "rtn:99:g0"], ["--candidate rtn:99:g0"]),
    (["--candidate", "magic:4"], ["--candidate magic:4", "unknown method 'magic'"]),
    (["--candidate", "rtn:8:nonsense"], ["--candidate rtn:8:nonsense", "'nonsense' is not a setting of method rtn"]),
    (["--candidate", "rtn:8:8"], ["'8' is not a setting"]),
    (["--candidate", "rtn:g64:g32"], ["sets group_size a second time"]),
    (["--candidate", ":8"], ["unknown method ''"]),
    (["--candidate", "gguf:Q9_X"], ["--candidate gguf:Q9_X", "method gguf needs 'type'"]),
    (["--candidate", "gguf:Q4_K_M"], ["runs on serving.engine llamacpp"]),
    (["--candidate", "rtn:8", "--candidate", "rtn:8"], ["candidate names must be unique"]),
    (["--limit", "0"], ["--limit 0", "evaluation.limit"]),
    (["--limit", "-5"], ["--limit -5", "evaluation.limit"]),
    (["--seed", "18446744073709551616"], ["--seed 18446744073709551616", "seed"]),
    (["--seed", "-1"], ["--seed -1", "seed"]),
    (["--set", "evaluation.limit"], ["--set evaluation.limit", "KEY=VALUE"]),
    (["--set", "evaluation.nokey=3"], ["--set evaluation.nokey=3", "unknown key 'evaluation.nokey'"]),
    (["--set", "evaluation.limit=[unclosed"], ["--set evaluation.limit=[unclosed", "malformed YAML"]),
    (["--set", "seed=.nan"], ["--set seed=.nan", "seed"]),
    (["--eval-set", "missing.jsonl"], ["missing.jsonl", "not found"]),
    (["--model", "missing.gguf"], ["missing.gguf", "not found"]),
    (["--output", "a-file"], ["results_dir", "a-file is a file"]),
]


@pytest.mark.parametrize("flags, fragments", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flag_is_one_line_naming_the_flag(workdir, capfd, flags, fragments):
    refused(quantgate(capfd, "run", *flags), *fragments)
    no_run_left(workdir / "quantgate-results")


def test_flags_override_a_file_and_name_themselves_not_the_file(workdir, capfd):
    path = workdir / "config.yaml"
    path.write_bytes(VALID)
    line = refused(quantgate(capfd, "run", str(path), "--candidate", "rtn:1"), "--candidate rtn:1")
    assert str(path) not in line


@pytest.mark.parametrize("what", ["config-missing", "config-is-directory"])
def test_config_path_itself(workdir, capfd, what):
    target = workdir / ("nope.yaml" if what == "config-missing" else "a-dir")
    refused(quantgate(capfd, "run", str(target)), str(target), "not found" if what == "config-missing" else "directory")


@pytest.mark.parametrize("data", [b"\xef\xbb\xbf" + VALID, VALID.replace(b"\n", b"\r\n")], ids=["utf8-bom", "crlf"])
def test_a_bom_or_crlf_config_is_read(workdir, capfd, data):
    """Accepted, not refused: `check` validates and plans it (exit 0)."""
    path = workdir / "config.yaml"
    path.write_bytes(data)
    o = quantgate(capfd, "check", str(path), "--json")
    assert o.code == 0, o.err
    assert '"valid":true' in o.out


def test_config_from_stdin_through_a_real_process(workdir):
    """/dev/stdin and pipes are configs too (they are not regular files)."""
    o = quantgate_process("check", "/dev/stdin", "--json", cwd=workdir, stdin=VALID, timeout=120)
    assert o.code == 0, o.err
    assert '"items":10' in o.out


def test_bad_bytes_through_a_real_process(workdir):
    path = workdir / "config.yaml"
    path.write_bytes(b"seed: 18446744073709551616\n")
    refused(quantgate_process("run", str(path), cwd=workdir, timeout=120), f"{path}:1", "seed")
    no_run_left(workdir / "quantgate-results")
