"""Full-vocabulary rows from the top-k log-probabilities a server reports, and the KL divergence
estimate they allow.

A server that returns only the k most likely tokens per position (OpenAI-compatible servers:
`logprobs=k`, vLLM caps k at its `max_logprobs`, 20 by default) gives, per row, exact values on a
set S of known tokens (the top-k, plus the token that actually follows) and only the remaining
mass r = 1 - sum_S q on the tail T = vocabulary \\ S.

Fill scheme (`fill_row`): known entries exact; the tail mass spread uniformly, log(r / |T|) on
every tail token. The tail's entries thus share one value, far more often than any known value
repeats, so `tail_mask` recovers T from a filled row as the entries equal to its most frequent
value. (Not its minimum: the token that actually follows can be known and below the fill.)

Bias of the KL divergence from truncation. With P the reference (full vocabulary) and Q the
server's true distribution, Q~ its filled row, and T the tail of Q~:

    exact        KL(P || Q)  = sum_S p log(p/q) + P(T) log(P(T)/Q(T)) + P(T) KL(P_T || Q_T)
    kld_topk     KL(P^ || Q~) = sum_S p log(p/q) + P(T) log(P(T)/Q(T))
    naive        KL(P || Q~)  = kld_topk + P(T) KL(P_T || U_T)

where P^ is P with its mass on T spread uniformly (`coarsen`), P_T, Q_T are P and Q renormalised
on T and U_T is uniform on T. Hence, per row and for every k:

    0 <= exact - kld_topk = P(T) KL(P_T || Q_T)          (a lower bound, by the log-sum inequality)
    kld_topk is non-decreasing in k and equals the exact value when T is empty.

The gap cannot be bounded from the top-k alone (Q's shape on its tail is unknown); it shrinks as
k grows. Measured on SmolLM2-135M against its RTN w4/g64 candidate (2 windows of 128 tokens):
exact 0.357 nats; kld_topk 0.095 / 0.158 / 0.227 at k = 1 / 5 / 20. So a KL ceiling judged at
small k is optimistic: report k with the value.

The naive value (the plain full-vocabulary formula on a filled row) is always >= kld_topk, and
naive - exact = P(T) [KL(P_T || U_T) - KL(P_T || Q_T)]: a language model's tail is far from
uniform, so for two close models it overestimates badly (same measurement, k = 20: 1.35 nats).
Use `kld_topk` against a filled row. It needs a full reference (the baseline on an in-process
engine); with both sides top-k there is no such guarantee. Top-1 agreement needs only the argmax,
which a filled row keeps exactly (k >= 1).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from quantgate.evals.tasks import kl_rows

# Smallest tail mass kept: reported top-k probabilities can sum to 1 + rounding error.
_MIN_TAIL = 1e-12


def fill_row(known: Mapping[int, float], vocab: int) -> torch.Tensor:
    """A full row of log-probabilities, float32 [vocab], from the known entries {token id:
    log-probability}: known entries as given, the remaining mass uniform over the other ids."""
    row = torch.empty(vocab, dtype=torch.float64)
    ids = torch.tensor(list(known), dtype=torch.long)
    values = torch.tensor(list(known.values()), dtype=torch.float64)
    tail = vocab - len(known)
    if tail > 0:
        mass = max(1.0 - float(values.exp().sum()), _MIN_TAIL)
        row.fill_(torch.log(torch.tensor(mass / tail, dtype=torch.float64)))
    row[ids] = values
    return row.float()


def tail_mask(filled: torch.Tensor) -> torch.Tensor:
    """bool [..., V]: the filled (tail) entries of rows made by fill_row, i.e. the entries equal to
    each row's most frequent value. A row whose values are all distinct has no tail (k = V; with
    one tail token, its filled value is exact anyway)."""
    mode = filled.mode(-1, keepdim=True).values
    mask = filled == mode
    return mask & (mask.sum(-1, keepdim=True) > 1)


def coarsen(logprobs: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """[T, V] log-probabilities with each row's mass on its `tail` (bool [T, V]) spread uniformly
    over that tail; other entries unchanged. float64."""
    lp = logprobs.double()
    p = lp.exp()
    size = tail.sum(-1, keepdim=True).clamp(min=1)
    tail_mass = (p * tail).sum(-1, keepdim=True).clamp(min=_MIN_TAIL)
    return torch.where(tail, torch.log(tail_mass / size), lp)


def kld_topk(reference: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
    """KL(reference || model) per row, float64 [T], where `reference` is a full [T, V] log-prob
    tensor and `filled` the model's [T, V] rows made by fill_row: the reference is coarsened on the
    model's tail first, so the value is the exact divergence minus P(T) KL(P_T || Q_T) (see the
    module docstring): never above the exact value."""
    ref = coarsen(reference, tail_mask(filled))
    return kl_rows(ref, filled.double()).clamp(min=0.0)
