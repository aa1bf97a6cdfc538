"""Offline English prose present on every Python install: the documentation topics of the
standard library's `pydoc_data` (the language reference text that `help()` shows, ~465k chars).

The topics are split once, deterministically, into disjoint pools:
  - "cloze":       sentences whose last word is hidden (the cloze task),
  - "perplexity":  held-out text for perplexity and KL divergence windows,
  - "calibration": everything else, reserved for calibrating quantizers (never evaluated on).
A topic's pool depends only on the sha256 of its name, so the split does not move when Python
adds topics. Topics repeat each other's text, so the calibration pool leaves out every block
(blank-line separated) that also occurs in a cloze or perplexity topic: no text is in two pools.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

POOLS = ("cloze", "perplexity", "calibration")
# sha256(name) first byte ranges: [0, 50) cloze, [50, 64) perplexity, the rest calibration
# (155k / 42k / 202k characters with Python 3.11, calibration after dropping repeated text:
# ~267 cloze sentences, ~10k perplexity tokens).
_BOUNDS = (50, 64)


@dataclass(frozen=True)
class Topic:
    name: str
    text: str

    @property
    def pool(self) -> str:
        b = hashlib.sha256(self.name.encode()).digest()[0]
        return "cloze" if b < _BOUNDS[0] else "perplexity" if b < _BOUNDS[1] else "calibration"


def topics() -> list[Topic]:
    from pydoc_data.topics import topics as raw  # standard library

    return [Topic(name, raw[name]) for name in sorted(raw)]


def pool_topics(pool: str) -> list[Topic]:
    if pool not in POOLS:
        raise ValueError(f"unknown pool {pool!r}; pools: {POOLS}")
    chosen = [t for t in topics() if t.pool == pool]
    if pool == "calibration":
        # Topics repeat each other's text (e.g. "compound" contains "try", "with", "for", ...), so
        # calibration drops every block that also occurs in an evaluated (cloze/perplexity) topic.
        held_out = {_norm(b) for t in topics() if t.pool != "calibration" for b in _blocks(t.text)}
        chosen = [Topic(t.name, "\n\n".join(b for b in _blocks(t.text) if _norm(b) not in held_out)) for t in chosen]
    return chosen


def _blocks(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


def _norm(block: str) -> str:
    return " ".join(ln.strip() for ln in block.split("\n")).strip()


def paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a topic: blank-line separated blocks, without headings (a line followed
    by *** or === underlines), indented code/grammar blocks and list-like lines; lines joined."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if any(re.fullmatch(r"[*=\-~^]{3,}", ln.strip()) for ln in lines):
            continue  # heading
        if lines[0].startswith((" ", "\t")) or lines[0].lstrip().startswith(("*", "-", "+", ">>>")):
            continue  # code, grammar, lists, examples
        para = " ".join(ln.strip() for ln in lines).strip()
        if len(para.split()) >= 8:
            out.append(para)
    return out


def pool_text(pool: str) -> str:
    """All text of a pool (headings and code included, as a reader would see it)."""
    return "\n\n".join(t.text.strip() for t in pool_topics(pool))


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph at '.', '!' or '?' followed by a space and a capital letter or quote."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", paragraph) if s.strip()]
