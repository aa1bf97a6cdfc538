"""The one engine interface every engine (built-in or not) implements.

Engines receive token ids, never text: tokenization happens once, with the baseline's tokenizer,
so every engine scores exactly the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # engines run in processes that never import torch (see engines/process.py)
    import torch

# (context token ids, continuation token ids); the context is never empty.
Request = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class ContextGroup:
    """Requests that share one context: the context and the first `shared` continuation tokens
    (common to every option) need computing once. Every option keeps >= 1 token of its own,
    which is predicted from the last shared position."""

    context: tuple[int, ...]
    request_ids: list[int]
    continuations: list[tuple[int, ...]]
    shared: int

    @property
    def prefix(self) -> list[int]:
        return list(self.context) + list(self.continuations[0][: self.shared])


def _common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def group_by_context(requests: Sequence[Request]) -> list[ContextGroup]:
    """Requests grouped by identical context, in first-seen order; empty parts are an error."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both be non-empty")
        by_context.setdefault(tuple(ctx), []).append(i)
    groups = []
    for ctx, ids in by_context.items():
        conts = [tuple(requests[i][1]) for i in ids]
        shared = min(_common_prefix_len(conts), min(len(c) for c in conts) - 1)
        groups.append(ContextGroup(ctx, ids, conts, shared))
    return groups


@dataclass
class Timing:
    """Wall time and tokens processed per engine call kind (e.g. "loglikelihood")."""

    seconds: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, seconds: float, tokens: int) -> None:
        self.seconds[kind] = self.seconds.get(kind, 0.0) + seconds
        self.tokens[kind] = self.tokens.get(kind, 0) + tokens

    def timed(self, kind: str, tokens: int) -> _Timer:
        return _Timer(self, kind, tokens)


class _Timer:
    def __init__(self, timing: Timing, kind: str, tokens: int):
        self.timing, self.kind, self.tokens = timing, kind, tokens

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timing.add(self.kind, time.perf_counter() - self.start, self.tokens)


class Engine(Protocol):
    name: str
    timing: Timing

    def loglikelihood(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
        """For each request: the summed log-probability of the continuation given its context,
        float64 [n], and whether every continuation token is the greedy (argmax) choice, bool [n]."""
        ...

    def token_logprobs(self, windows: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """For each window of T token ids, the next-token log-probabilities at positions 0..T-2:
        float32 [T-1, vocab] (row t predicts token t+1). Yielded in order, one window at a time."""
        ...

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
        on_token: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy continuation token ids of each prompt; stops after end-of-sequence or any of
        stop_ids (the stop token is included). on_token, when given, is called as each token is
        known (economics.measure_round times the first token and the rest of a request from
        these calls; engines it measures in their own process take it)."""
        ...


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[T, V] float32 logits -> float64 log-probabilities (for engines that return numpy)."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def stop_after(token: int, generated: Sequence[int], ends: set[int], stops: set[int]) -> bool:
    """The stopping rule every engine's greedy generation shares: stop after an end-of-sequence
    token, or after a stop token once some other token has been generated (so leading newlines
    before a short answer are skipped over, not taken as an empty answer)."""
    return token in ends or (token in stops and any(t not in stops for t in generated))
