"""The one executor interface: where a run's models are made and scored.

run.py hands an executor the serving backend (engines/registry.py: *what* making and scoring a
model means on that engine) and asks it for the baseline's scores, then each candidate's. An
executor returns per-item results only; comparisons, intervals and the gate are computed by
run.py from them, the same whichever executor produced them.

Store records (resume.py) are written by the executor as results arrive, in the pieces
evals.tasks.item_chunks names, so a killed run resumes with nothing lost or repeated whichever
executor ran it and whichever resumes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

    from quantgate.engines.registry import Backend, RunContext, Served
    from quantgate.evals.tasks import ModelScores, PreparedSuite, ScoreCache
    from quantgate.methods.registry import MethodConfig

    Reference = list[torch.Tensor]  # the baseline's log-probs per window, float32 [T-1, vocab] each


class Executor(Protocol):
    """Entered for the run (`with`); closed after it, releasing whatever it started."""

    def __enter__(self) -> Executor: ...

    def __exit__(self, *exc: object) -> None: ...

    def baseline(self, backend: Backend, ctx: RunContext, prepared: PreparedSuite,
                 cache: ScoreCache | None) -> tuple[Served, ModelScores, PreparedSuite, Reference]:
        """The baseline made and scored: its Served (for economics, in this process), its scores,
        the suite extended with its responses to prompt items (evals.tasks.with_response_windows)
        and its log-probs over every window of that suite, the reference of every candidate."""
        ...

    def start(self, backend: Backend, ctx: RunContext, cand: MethodConfig, prepared: PreparedSuite,
              reference: Reference, cache: ScoreCache | None) -> None:
        """Begin making and scoring a candidate that `candidate` will be asked for; an executor
        that runs one model at a time does nothing here."""
        ...

    def candidate(self, backend: Backend, ctx: RunContext, cand: MethodConfig, prepared: PreparedSuite,
                  reference: Reference, cache: ScoreCache | None) -> tuple[Served, ModelScores]:
        """The candidate made and scored against the reference (started now if it was not)."""
        ...
