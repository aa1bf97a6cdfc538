"""Reading what a person hands quantgate: one place where a file's bytes become text and text
becomes JSON or YAML data, so that every bad file fails the same way, as a UserError naming the
file (and the line where it can), never a decoding or recursion traceback.

Accepted: UTF-8, with or without a byte-order mark. Refused, each in one line: UTF-16/32 text,
bytes that are not UTF-8, NUL bytes, JSON or YAML nested deeper than MAX_DEPTH or holding more
than MAX_NODES values (a YAML alias "bomb" counts every expansion), and JSON strings holding a
lone UTF-16 surrogate (an escape such as \\ud800 that is no character, which tokenizers reject).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from quantgate.errors import UserError

UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # (UTF-32's little-endian mark starts with the first)
MAX_DEPTH = 100  # nesting of lists / mappings in one document (downstream code recurses)
MAX_NODES = 1_000_000  # values in one document, aliases expanded


def read_text(path: str | Path, what: str = "file") -> str:
    """The file's text (UTF-8, a leading byte-order mark dropped); UserError naming the file
    when it is missing, unreadable, or not UTF-8 text."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    return decode(data, str(path))


def decode(data: bytes, where: str) -> str:
    """UTF-8 bytes as text (see read_text), newlines \\r\\n and \\r read as \\n; `where` names the
    source in errors."""
    if data.startswith(UTF16_BOMS):
        raise UserError(f"{where}: UTF-16/UTF-32 text (byte-order mark {data[:2].hex()}); save it as UTF-8")
    data = data.removeprefix(UTF8_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}:{_line(data, e.start)}: not UTF-8 text (byte 0x{data[e.start]:02x}); "
                        "save it as UTF-8") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(f"{where}:{_line(data, nul)}: NUL byte in text (a binary file?)")
    return text.replace("\r\n", "\n").replace("\r", "\n")  # newlines as Python's text mode reads them


def _line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def lines(text: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) of a text, split at newlines only (a JSON string may hold
    U+2028 and other characters str.splitlines would split at)."""
    return enumerate(text.split("\n"), 1)


def parse_json(text: str, where: str, line: int | None = None) -> Any:
    """JSON text as data, checked (see check_data). `line`: the line `text` is (JSONL), named in
    errors; otherwise the error's own line in the document."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}:{line or e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{where}:{line or 1}: JSON nested too deeply") from None
    check_data(data, f"{where}:{line}" if line else where)
    return data


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    return parse_json(read_text(path, what), str(path))


def read_jsonl(path: str | Path, what: str = "JSONL file") -> Iterator[tuple[int, Any]]:
    """(line number, data) of every non-blank line of a JSONL file."""
    for lineno, line in lines(read_text(path, what)):
        if line.strip():
            yield lineno, parse_json(line, str(path), lineno)


def check_data(data: Any, where: str) -> None:
    """Refuse parsed data nested deeper than MAX_DEPTH, larger than MAX_NODES values, or holding a
    string with a lone surrogate. Iterative: never recurses, stops at the first problem."""
    stack, seen = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise UserError(f"{where}: more than {MAX_NODES:,} values (aliases expanded): too large to be input")
        if isinstance(value, str):
            _check_string(value, where)
        elif isinstance(value, dict | list | tuple):
            if depth >= MAX_DEPTH:
                raise UserError(f"{where}: nested more than {MAX_DEPTH} levels deep")
            children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((c, depth + 1) for c in children)


def _check_string(value: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: a string holds a lone surrogate {value[e.start]!r} (not a character; "
                        "written as an escape such as \\ud800?)") from None


def load_yaml(text: str, where: str) -> Any:
    """YAML text (safe loader: plain data only) as data, checked like JSON; one-line errors with
    the line of the problem."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{where}{line}: malformed YAML: {_one_line(e.problem or e.context)}") from None
    except yaml.YAMLError as e:  # a reader error: a character YAML does not allow
        offset = getattr(e, "position", None)
        line = f":{text.count(chr(10), 0, offset) + 1}" if isinstance(offset, int) else ""
        raise UserError(f"{where}{line}: malformed YAML: {_one_line(getattr(e, 'reason', None) or e)}") from None
    except RecursionError:
        raise UserError(f"{where}: YAML nested too deeply") from None
    check_data(data, where)
    return data


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
