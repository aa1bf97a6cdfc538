"""The local executor: every model made and scored in this process, one after the other."""

from __future__ import annotations

from typing import TYPE_CHECKING

from quantgate.evals.tasks import evaluate, with_response_windows

if TYPE_CHECKING:
    from quantgate.engines.registry import Backend, RunContext, Served
    from quantgate.evals.tasks import ModelScores, PreparedSuite, ScoreCache
    from quantgate.executors.base import Reference
    from quantgate.executors.registry import LocalConfig
    from quantgate.methods.registry import MethodConfig


class LocalExecutor:
    def __init__(self, cfg: LocalConfig):
        self.cfg = cfg

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def baseline(self, backend: Backend, ctx: RunContext, prepared: PreparedSuite,
                 cache: ScoreCache | None) -> tuple[Served, ModelScores, PreparedSuite, Reference]:
        step = ctx.progress("baseline", 3)
        served = backend.baseline(ctx)
        with served.open() as engine:
            scores, reference = evaluate(engine, prepared, keep=True, on_step=step, cache=cache, model="baseline")
            prepared = with_response_windows(prepared, scores.generations)
            reference += list(engine.token_logprobs(prepared.windows[len(reference):]))
        step(1)
        return served, scores, prepared, reference

    def start(self, backend: Backend, ctx: RunContext, cand: MethodConfig, prepared: PreparedSuite,
              reference: Reference, cache: ScoreCache | None) -> None:
        pass  # one model at a time: each is made when it is asked for

    def candidate(self, backend: Backend, ctx: RunContext, cand: MethodConfig, prepared: PreparedSuite,
                  reference: Reference, cache: ScoreCache | None) -> tuple[Served, ModelScores]:
        served = backend.candidate(ctx, cand)
        with served.open() as engine:
            scores, _ = evaluate(engine, prepared, reference, cache=cache,
                                 on_step=served.step or ctx.progress(cand.label, 2), model=cand.label)
        return served, scores
