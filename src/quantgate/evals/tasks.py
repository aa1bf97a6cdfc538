"""Turn an eval suite into token-level requests once, and run one engine over them.

Tokenization happens here, with the baseline's tokenizer, so the baseline and every candidate see
identical token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from quantgate.engines.base import Engine, Request
from quantgate.errors import NothingHappened, UserError
from quantgate.evals.datasets import EvalSuite


@dataclass(frozen=True)
class PreparedSuite:
    suite: EvalSuite
    requests: list[Request]  # every option of every item, flattened
    offsets: np.ndarray  # int [n_items + 1]: item i owns requests[offsets[i]:offsets[i + 1]]
    option_chars: np.ndarray  # int [n_requests]: characters of each continuation (for acc_norm)
    gold: np.ndarray  # int [n_items]
    windows: list[list[int]]  # perplexity/KLD windows of token ids

    @property
    def n_window_tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Token ids of (context, continuation), split the way the whole string tokenizes: encode
    context + continuation once and cut after the context's tokens, moving trailing spaces of the
    context into the continuation first. An empty context is conditioned on the BOS/EOS token."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    ctx = tokenizer.encode(stripped, add_special_tokens=True) if stripped else []
    whole = tokenizer.encode(stripped + continuation, add_special_tokens=True)
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encoding
        whole = ctx + tokenizer.encode(continuation, add_special_tokens=False)
    if not ctx:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx, whole = [start], [start] + whole
    return tuple(ctx), tuple(whole[len(ctx):])


def prepare(suite: EvalSuite, tokenizer, *, window_tokens: int, n_windows: int) -> PreparedSuite:
    if not suite.items:
        raise UserError(f"eval set '{suite.name}' has no items")
    requests, offsets, chars = [], [0], []
    for item in suite.items:
        for ctx, cont in zip(item.contexts, item.continuations):
            pair = encode_pair(tokenizer, ctx, cont)
            if not pair[1]:
                raise UserError(f"eval item '{item.id}': an option's continuation is empty")
            requests.append(pair)
            chars.append(len(cont))
        offsets.append(len(requests))
    return PreparedSuite(
        suite=suite,
        requests=requests,
        offsets=np.array(offsets),
        option_chars=np.array(chars),
        gold=np.array([item.gold for item in suite.items]),
        windows=make_windows(tokenizer, suite.perplexity_text or "", window_tokens, n_windows),
    )


def make_windows(tokenizer, text: str, window_tokens: int, n_windows: int) -> list[list[int]]:
    """The first n_windows consecutive, non-overlapping windows of window_tokens tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    need = window_tokens * n_windows
    if len(ids) < need:
        raise UserError(
            f"evaluation: {n_windows} windows of {window_tokens} tokens need {need} tokens of "
            f"held-out text; it has {len(ids)}"
        )
    return [ids[i * window_tokens : (i + 1) * window_tokens] for i in range(n_windows)]


@dataclass
class ModelScores:
    """One model on one prepared suite."""

    option_ll: np.ndarray  # float64 [n_requests]: summed log-prob of each option's continuation
    token_nll: np.ndarray  # float64 [n_window_tokens]: -log p(actual next token)
    kld: np.ndarray | None  # float64 [n_window_tokens]: KL(reference || this model) per position
    top1_agree: np.ndarray | None  # bool [n_window_tokens]: same argmax as the reference
    window_of: np.ndarray  # int [n_window_tokens]: which window each position belongs to
    seconds: float


def evaluate(
    engine: Engine,
    prepared: PreparedSuite,
    reference: Sequence[torch.Tensor] | None = None,
    *,
    keep: bool = False,
    on_step: Callable[[int], None] | None = None,
) -> tuple[ModelScores, list[torch.Tensor]]:
    """Score every option and every window. With `reference` (the baseline's per-window
    log-probs), also per-position KL divergence and top-1 agreement. With keep=True the model's
    own per-window log-probs are returned (to serve as the reference of later models)."""
    before = sum(engine.timing.seconds.values())
    option_ll = engine.loglikelihood(prepared.requests)
    _check_not_constant(option_ll, prepared.offsets, engine.name)
    if on_step:
        on_step(1)
    nll, kld, agree, window_of, kept = [], [], [], [], []
    for w, lp in enumerate(engine.token_logprobs(prepared.windows)):
        targets = torch.tensor(prepared.windows[w][1:])
        nll.append(-lp[torch.arange(len(targets)), targets].double())
        window_of.append(np.full(len(targets), w))
        if reference is not None:
            kld.append(kl_divergence(reference[w], lp))
            agree.append((reference[w].argmax(-1) == lp.argmax(-1)).numpy())
        if keep:
            kept.append(lp)
    if on_step:
        on_step(1)
    scores = ModelScores(
        option_ll=option_ll,
        token_nll=torch.cat(nll).numpy(),
        kld=np.concatenate(kld) if kld else None,
        top1_agree=np.concatenate(agree) if agree else None,
        window_of=np.concatenate(window_of),
        seconds=sum(engine.timing.seconds.values()) - before,
    )
    return scores, kept


def kl_divergence(ref_lp: torch.Tensor, lp: torch.Tensor) -> np.ndarray:
    """KL(ref || model) per row of two [T, V] log-prob tensors -> float64 [T], clamped at 0
    (tiny negative values are float rounding)."""
    ref, other = ref_lp.double(), lp.double()
    return (ref.exp() * (ref - other)).sum(-1).clamp(min=0.0).numpy()


def _check_not_constant(option_ll: np.ndarray, offsets: np.ndarray, engine: str) -> None:
    """An engine whose every item scores all options the same measured nothing."""
    spreads = [np.ptp(option_ll[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    if spreads and max(spreads) == 0.0:
        raise NothingHappened(f"engine '{engine}' returned identical scores for every option of every item")
