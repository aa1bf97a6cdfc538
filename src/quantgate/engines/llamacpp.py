"""llama.cpp engine (through llama-cpp-python) over a GGUF file, behind the same interface as
the torch engine: token ids in, log-probabilities and greedy tokens out.

The context's key/value cache is reused: for an item, the context plus the options' common prefix
is evaluated once; each option then rewinds the cache to that point and evaluates only its own
tokens (llama-cpp-python's `eval` drops cache entries past `n_tokens` before it runs).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantgate.engines.base import Engine, Request, Timing, group_by_context, log_softmax, stop_after
from quantgate.engines.registry import Backend, RunContext, Served
from quantgate.errors import NothingHappened, UserError

if TYPE_CHECKING:
    import torch

    from quantgate.economics import Economics
    from quantgate.evals.tasks import PreparedSuite
    from quantgate.methods.registry import MethodConfig


class LlamaCppEngine:
    name = "llamacpp"

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None, n_batch: int = 512,
                 logits_all: bool = True):
        """logits_all=False is the serving configuration: only the last position's logits are
        kept (generation works, scoring does not), and no [n_ctx, vocab] buffers are allocated."""
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError("serving.engine llamacpp needs the package llama-cpp-python") from None
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: GGUF file not found")
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, logits_all=logits_all,
                             n_threads=n_threads or len(os.sched_getaffinity(0)), verbose=False, seed=0)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"{path}: llama.cpp cannot load this GGUF file: {e}") from None
        self.timing = Timing()

    def _eval_from(self, start: int, tokens: Sequence[int]) -> np.ndarray:
        """Keep the first `start` cached tokens, evaluate `tokens` after them; logits of the new
        positions, float32 [len(tokens), V]."""
        self.llm.n_tokens = start
        self.llm.eval(list(tokens))
        return np.asarray(self.llm.scores[start : start + len(tokens)])

    def loglikelihood(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros(len(requests), dtype=np.float64)
        greedy = np.ones(len(requests), dtype=bool)
        n_tokens = sum(len(c) + len(x) for c, x in requests)
        with self.timing.timed("loglikelihood", n_tokens):
            for group in group_by_context(requests):
                prefix, ctx_len = group.prefix, len(group.context)
                # rows predicting the shared tokens and each option's first own token
                head = log_softmax(self._eval_from(0, prefix)[ctx_len - 1 :])
                for i, cont in zip(group.request_ids, group.continuations):
                    own = cont[group.shared :]
                    rows = head if len(own) == 1 else np.concatenate(
                        [head, log_softmax(self._eval_from(len(prefix), own[:-1]))])
                    targets = np.array(cont)
                    lp = rows[np.arange(len(cont)), targets]
                    out[i] = float(lp.sum())
                    greedy[i] = bool((rows.argmax(-1) == targets).all())
        return out, greedy

    def window_logprobs(self, window: Sequence[int]) -> np.ndarray:
        """token_logprobs of one window as numpy, float32 [T-1, V] (no torch needed)."""
        with self.timing.timed("token_logprobs", len(window)):
            return log_softmax(self._eval_from(0, window)[: len(window) - 1]).astype(np.float32)

    def token_logprobs(self, windows: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        import torch

        for w in windows:
            yield torch.from_numpy(self.window_logprobs(w))

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[list[int]]:
        ends, stops = {self.llm.token_eos()}, set(stop_ids)
        results = []
        for prompt in prompts:
            out: list[int] = []
            with self.timing.timed("generate", len(prompt)):
                logits = self._eval_from(0, prompt)[-1]
                for _ in range(max_new_tokens):
                    token = int(np.argmax(logits))
                    out.append(token)
                    if stop_after(token, out, ends, stops):
                        break
                    logits = self._eval_from(self.llm.n_tokens, [token])[-1]
            self.timing.add("generate", 0.0, len(out))
            results.append(out)
        return results


# ---------------------------------------------------------------------------------------------
# The llama.cpp backend: baseline and candidates are GGUF files (the baseline written as F32 by
# quantgate, each candidate made by llama.cpp's own quantizer), each evaluated and then timed in an
# engine process of its own. Everything torch-side is imported on use: an engine process over a
# GGUF file imports this module and must not import torch.


class LlamaCppBackend(Backend):
    def prepare(self, ctx: RunContext, prepared: PreparedSuite) -> tuple[PreparedSuite, list[str]]:
        """Refuse sequences longer than llama.cpp runs this architecture exactly (a sliding window
        it does not implement, models/gguf_export.exact_length)."""
        from quantgate.models.gguf_export import exact_length

        limit = exact_length(ctx.baseline.arch, ctx.baseline.model.config)
        longest = longest_sequence(prepared)
        if limit is not None and longest > limit:
            raise UserError(f"llama.cpp runs model type '{ctx.baseline.model_type}' without its sliding window of "
                            f"{limit} tokens, and this eval set has sequences of up to {longest} tokens: shorten "
                            "them (evaluation.window_tokens, limits) or evaluate on serving.engine torch")
        return prepared, []

    def _served(self, ctx: RunContext, label: str, path: Path, scheme: str, **made: Any) -> Served:
        from quantgate.engines.process import EngineProcess

        return Served(label, path.stat().st_size, "the GGUF file's bytes", scheme, artifact=path, serves_from=path,
                      opener=lambda: EngineProcess(self.name, label=label, log=ctx.log(label), path=str(path),
                                                   n_ctx=_context_length(ctx)), **made)

    def baseline(self, ctx: RunContext) -> Served:
        from quantgate.methods.gguf_quant import float_gguf

        return self._served(ctx, "baseline", float_gguf(ctx.baseline), "GGUF F32")

    def candidate(self, ctx: RunContext, cand: MethodConfig) -> Served:
        """llama.cpp's quantizer makes the file from the F32 GGUF (an importance matrix from the
        calibration text when cand.imatrix)."""
        from quantgate.methods.gguf_quant import quantized_gguf

        step = ctx.progress(cand.label, 3)
        t0 = time.perf_counter()
        path = quantized_gguf(ctx.baseline, cand.type, ctx.calib if cand.imatrix else None)
        seconds = time.perf_counter() - t0
        step(1)
        return self._served(ctx, cand.label, path, cand.scheme, modules_changed=quantized_tensors(path),
                            make_seconds=seconds, step=step)

    def exported(self, ctx: RunContext, label: str, directory: Path, files: list[str],
                 scheme: Mapping[str, Any]) -> Served:
        """An exported GGUF: the one file in the export."""
        (name,) = [f for f in files if f.endswith(".gguf")]
        return self._served(ctx, label, directory / name, f"GGUF {scheme.get('gguf_type', '')}".strip())

    def economics(self, ctx: RunContext, served: Served) -> Economics:
        """Serving configuration: only the last position's logits, a context of one request."""
        econ = ctx.cfg.economics
        return self.measured_in_process(ctx, served, n_ctx=econ.prompt_tokens + econ.new_tokens + 1,
                                        logits_all=False)

    def noise_reference(self, ctx: RunContext) -> tuple[Engine, str]:
        """PyTorch float32 over the same weights: conversion and kernels."""
        from quantgate.engines.torch import TorchEngine

        return TorchEngine(ctx.baseline.model), "torch float32"


def longest_sequence(prepared: PreparedSuite) -> int:
    """The longest token sequence an engine sees on the suite: a window, a context with its
    continuation, or a prompt with the most tokens it may generate."""
    items = prepared.suite.items
    return max([len(w) for w in prepared.windows] + [len(c) + len(x) for c, x in prepared.requests]
               + [len(p) + prepared.suite.spec(items[i].task).max_new_tokens for i, p in prepared.prompts.items()]
               or [0])


def _context_length(ctx: RunContext) -> int:
    """Enough positions for the longest window, prompt + generation, or benchmark request."""
    ev, econ = ctx.cfg.evaluation, ctx.cfg.economics
    return max(2048, ev.window_tokens + 1, econ.prompt_tokens + econ.new_tokens + 1)


def quantized_tensors(path: Path) -> int:
    """Tensors of a GGUF file stored in a quantized type; zero means llama.cpp changed nothing."""
    from quantgate.methods.gguf_quant import tensor_types

    counts = tensor_types(path)
    changed = sum(n for t, n in counts.items() if t not in ("F32", "F16", "BF16"))
    if not changed:
        raise NothingHappened(f"{path.name}: llama.cpp stored every tensor unquantized")
    return changed
