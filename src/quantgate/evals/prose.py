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
        # calibration keeps only text sharing no run of OVERLAP_WORDS words with an evaluated topic.
        held_out = set().union(*(word_ngrams(t.text) for t in topics() if t.pool != "calibration"))
        chosen = [Topic(t.name, "\n\n".join(_disjoint_blocks(t.text, held_out))) for t in chosen]
    return chosen


def _disjoint_blocks(text: str, held_out: set[tuple[str, ...]]) -> list[str]:
    """The blocks of text (>= OVERLAP_WORDS words each, so a run spans at most two) such that no
    block, nor any two neighbours joined, share a run with held_out."""
    blocks = [b for b in _blocks(text) if len(re.findall(r"\w+", b)) >= OVERLAP_WORDS
              and not word_ngrams(b) & held_out]
    while True:
        bad = {j for i in range(len(blocks) - 1) if word_ngrams(blocks[i] + " " + blocks[i + 1]) & held_out
               for j in (i, i + 1)}
        if not bad:
            return blocks
        blocks = [b for j, b in enumerate(blocks) if j not in bad]


OVERLAP_WORDS = 12  # a shared run of this many words counts as the same text


def word_ngrams(text: str, n: int = OVERLAP_WORDS) -> set[tuple[str, ...]]:
    """Every run of n consecutive words (lowercased, punctuation ignored) of a text."""
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _blocks(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


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
