"""In-process PyTorch engine for Hugging Face causal LMs (on CPU here; in the model's own dtype:
float32, or bfloat16/float16 for a baseline verified against that precision).

Scoring continuations is the hot path of every eval, so it is not a naive loop:
  1. requests with the same context form one item; the context plus the longest common prefix of
     its continuations (the "prefix") is computed once;
  2. the item is packed into one sequence: prefix, then each option's remaining tokens as its own
     segment, with positions restarting after the prefix and an attention mask that lets a segment
     see the prefix and itself only (so options never see each other);
  3. packed items of similar length run in one batch;
  4. the vocabulary projection (lm_head, ~20% of this model's FLOPs) runs only at rows whose next
     token is scored, and log-probabilities are taken without materialising a log-softmax.
`loglikelihood_reference` is the plain one-request-at-a-time loop it is checked and benchmarked
against.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import DynamicCache

from quantgate.config import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_BATCH_SIZE
from quantgate.engines.base import ContextGroup, Request, Timing, group_by_context, stop_after
from quantgate.engines.registry import Backend, RunContext, Served, ready
from quantgate.errors import UserError
from quantgate.models.arch import arch_for, layer_kinds

if TYPE_CHECKING:
    from quantgate.methods.apply import CandidateModel
    from quantgate.methods.registry import MethodConfig
    from quantgate.models.load import Baseline


@dataclass
class _Packed:
    """One item packed into a single sequence.

    tokens/positions/segments: [L] each; segment 0 is the shared prefix, segment i >= 1 the
    remaining input tokens of option i-1. rows/targets/owners: which output rows are scored, the
    token each row predicts, and the request ids credited with that row's log-probability."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]
    rows: list[int]
    targets: list[int]
    owners: list[tuple[int, ...]]


def _pack(group: ContextGroup) -> _Packed:
    """The group as one sequence: the prefix, then each option's own inputs as a segment."""
    prefix, shared = group.prefix, group.shared
    p = len(prefix)
    tokens, positions, segments = prefix, list(range(p)), [0] * p
    rows = list(range(len(group.context) - 1, p - 1))  # rows predicting the shared tokens
    targets = prefix[len(group.context) :]
    owners = [tuple(group.request_ids)] * shared
    for seg, (rid, cont) in enumerate(zip(group.request_ids, group.continuations), start=1):
        own = cont[shared:]
        rows.append(p - 1)  # the last prefix row predicts the option's first own token
        start = len(tokens)
        tokens = tokens + list(own[:-1])  # inputs: all but the last own token
        positions += range(p, p + len(own) - 1)
        segments += [seg] * (len(own) - 1)
        rows += range(start, start + len(own) - 1)  # each input row predicts the next own token
        targets += list(own)
        owners += [(rid,)] * len(own)
    return _Packed(tokens, positions, segments, rows, targets, owners)


def _segment_mask(segments: torch.Tensor, positions: torch.Tensor | None = None,
                  window: int | None = None) -> torch.Tensor:
    """segments [B, L] (-1 = padding) -> bool [B, 1, L, L]: row a may attend to column b when b <= a
    and b is in the prefix or in a's own segment; with a sliding `window` also only when
    positions[a] - positions[b] < window (transformers' sliding-window rule, on the positions of
    the unpacked sequence). Padding rows attend to themselves (no empty row)."""
    a, b = segments.unsqueeze(2), segments.unsqueeze(1)
    causal = torch.ones(segments.shape[1], segments.shape[1], dtype=torch.bool).tril()
    mask = causal & (b >= 0) & ((b == 0) | (b == a))
    if window is not None:
        mask &= (positions.unsqueeze(2) - positions.unsqueeze(1)) < window
    return (mask | torch.eye(segments.shape[1], dtype=torch.bool)).unsqueeze(1)


def _mask_kinds(model: torch.nn.Module) -> tuple[dict[str, int | None], bool]:
    """({attention kind: its sliding window (None: full)}, whether the decoder takes one mask per
    kind). A model without an architecture row whose layers mix kinds cannot be given one mask."""
    cfg = model.config
    kinds = set(layer_kinds(cfg))
    per_layer = arch_for(model).per_layer_masks
    if len(kinds) > 1 and not per_layer:
        raise UserError(f"model type '{cfg.model_type}' mixes {' and '.join(sorted(kinds))} layers; the torch "
                        "engine's packed scoring needs its architecture row (quantgate.models.arch)")
    return {k: getattr(cfg, "sliding_window", None) if k == "sliding_attention" else None for k in kinds}, per_layer


class _OneDNNLinears:
    """While active, every float32 nn.Linear of a model multiplies with oneDNN's fp32 GEMM on a
    weight packed once (here about 2x MKL's sgemm throughput; same float32 math, different
    summation order). Assumes the weights do not change while the engine lives (candidates are
    built before their engine); an in-place change through the parameter itself bumps its version
    and is repacked on entry, a change through `.data` is not seen. Modules are left exactly as
    they were on exit. Does nothing where oneDNN is unavailable."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        usable = enabled and torch.backends.mkldnn.is_available()
        self.linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)
                        and usable and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
        self.packed: dict[int, tuple[int, torch.Tensor]] = {}  # id(module) -> (weight version, packed)

    def __enter__(self) -> None:
        for m in self.linears:
            version, packed = self.packed.get(id(m), (-1, None))
            if version != m.weight._version:
                packed = m.weight.detach().to_mkldnn()
                self.packed[id(m)] = (m.weight._version, packed)
            m.forward = functools.partial(_onednn_linear, packed, m.weight, m.bias)

    def __exit__(self, *exc: object) -> None:
        for m in self.linears:
            del m.forward


# Below this many rows the layout conversions cost more than the faster GEMM saves (decoding).
ONEDNN_MIN_ROWS = 64


def _onednn_linear(
    packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor
) -> torch.Tensor:
    """x [..., in] -> [..., out] with a oneDNN-packed copy of weight [out, in]."""
    if x.numel() < ONEDNN_MIN_ROWS * x.shape[-1]:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch._C._nn.mkldnn_linear(x.reshape(-1, x.shape[-1]).to_mkldnn(), packed, None).to_dense()
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y + bias if bias is not None else y


class TorchEngine:
    name = "torch"

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, onednn: bool = True):
        self.model = model.eval()
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.max_batch_size = max_batch_size
        self.batch_tokens = batch_tokens
        self.pad_id = 0
        self.timing = Timing()
        self.fast_linears = _OneDNNLinears(model, enabled=onednn)
        self.windows, self.per_layer_masks = _mask_kinds(model)

    # -- continuation scoring -------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros(len(requests), dtype=np.float64)
        greedy = np.ones(len(requests), dtype=bool)
        items = sorted((_pack(g) for g in group_by_context(requests)), key=lambda x: len(x.tokens))
        n_tokens = sum(len(c) + len(x) for c, x in requests)
        with self.timing.timed("loglikelihood", n_tokens), torch.inference_mode(), self.fast_linears:
            for batch in self._batches(items):
                self._score_batch(batch, out, greedy)
        return out, greedy

    def _batches(self, items: list[_Packed]) -> Iterator[list[_Packed]]:
        """Consecutive items (sorted by packed length) within max_batch_size and batch_tokens."""
        batch: list[_Packed] = []
        for item in items:
            if batch and (len(batch) == self.max_batch_size or (len(batch) + 1) * len(item.tokens) > self.batch_tokens):
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch

    def _score_batch(self, batch: list[_Packed], out: np.ndarray, greedy: np.ndarray) -> None:
        width = max(len(x.tokens) for x in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros((len(batch), width), dtype=torch.long)
        segments = torch.full((len(batch), width), -1, dtype=torch.long)
        for r, x in enumerate(batch):  # right padding
            ids[r, : len(x.tokens)] = torch.tensor(x.tokens)
            positions[r, : len(x.tokens)] = torch.tensor(x.positions)
            segments[r, : len(x.tokens)] = torch.tensor(x.segments)
        hidden = self.decoder(
            input_ids=ids, attention_mask=self._masks(segments, positions), position_ids=positions, use_cache=False
        ).last_hidden_state  # [B, width, D]
        flat = torch.tensor([r * width + row for r, x in enumerate(batch) for row in x.rows])
        targets = torch.tensor([t for x in batch for t in x.targets])
        lp, is_max = self._target_logprobs(hidden.reshape(-1, hidden.shape[-1]), flat, targets)
        owners = [o for x in batch for o in x.owners]
        for value, top, rids in zip(lp.tolist(), is_max.tolist(), owners):
            for rid in rids:
                out[rid] += value
                greedy[rid] &= top

    def _masks(self, segments: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The packed batch's 4-D mask (segments, positions [B, L]): one per attention kind
        ({"full_attention": ..., "sliding_attention": ...}) for decoders that take them, else the
        one mask every layer uses (sliding when every layer is)."""
        masks = {kind: self._mask(_segment_mask(segments, positions, window)) for kind, window in self.windows.items()}
        return masks if self.per_layer_masks else next(iter(masks.values()))

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean [B, 1, L, L] mask in the form the model's attention implementation takes."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed
        dtype = self.model.dtype
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def _target_logprobs(
        self, hidden: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N, D]; rows, targets [M] -> (log p(targets[m] | hidden[rows[m]]) float32 [M],
        whether targets[m] is the row's argmax, bool [M]). A row scored for several targets goes
        through the vocabulary projection once; no [M, V] log-softmax is materialised."""
        unique, inverse = torch.unique(rows, return_inverse=True)
        logits = self.head(hidden[unique]).float()  # [U, V]
        chosen = logits[inverse, targets]
        return chosen - torch.logsumexp(logits, dim=-1)[inverse], chosen >= logits.amax(-1)[inverse]

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., D] hidden states -> [..., V] float32 log-probabilities."""
        return torch.log_softmax(self.head(hidden).float(), dim=-1)

    # -- full distributions ---------------------------------------------------------------------

    def token_logprobs(self, windows: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        if not windows:
            return
        per_batch = max(1, min(self.max_batch_size, self.batch_tokens // max(len(w) for w in windows)))
        for start in range(0, len(windows), per_batch):
            batch = windows[start : start + per_batch]
            width = max(len(w) for w in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, w in enumerate(batch):
                ids[r, : len(w)] = torch.tensor(w)
                mask[r, : len(w)] = 1
            with self.timing.timed("token_logprobs", int(mask.sum())), torch.inference_mode(), self.fast_linears:
                hidden = self.decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                logprobs = [self._logprobs(hidden[r, : len(w) - 1]) for r, w in enumerate(batch)]
            yield from logprobs  # outside the `with`: the model is never left patched while suspended

    # -- generation -----------------------------------------------------------------------------

    def generate_batch(self, prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        """Greedy decoding of all prompts at once (left-padded, one KV cache), exactly
        `new_tokens` each with no stopping: the load a server sees at this batch size. Padding can
        change low bits of the outputs, so evaluation uses `generate`, never this."""
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(list(p))
            mask[r, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = []
        with self.timing.timed("generate_batch", int(mask.sum())), torch.inference_mode(), self.fast_linears:
            cache = DynamicCache(config=self.model.config)
            for _ in range(new_tokens):
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                    use_cache=True, logits_to_keep=1).logits
                ids = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
                out.append(ids)
                mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
                positions = positions[:, -1:] + 1
        return torch.cat(out, dim=1).tolist()

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
        on_token: Callable[[], None] | None = None,
    ) -> list[list[int]]:
        """Greedy decoding with a key/value cache, one prompt at a time (no padding, so a prompt's
        output does not depend on its neighbours). Stops after end-of-sequence, or after a token of
        stop_ids once some other token has been generated (leading stop tokens, e.g. newlines
        before the answer, are kept and skipped over). on_token: called as each token is known."""
        eos = self.model.generation_config.eos_token_id
        ends = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        stops = set(stop_ids)
        results = []
        for prompt in prompts:
            out: list[int] = []
            with self.timing.timed("generate", len(prompt)), torch.inference_mode(), self.fast_linears:
                cache = DynamicCache(config=self.model.config)
                step = torch.tensor([list(prompt)])
                for _ in range(max_new_tokens):
                    logits = self.model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1).logits
                    token = int(logits[0, -1].argmax())
                    out.append(token)
                    if on_token is not None:
                        on_token()
                    if stop_after(token, out, ends, stops):
                        break
                    step = torch.tensor([[token]])
            self.timing.add("generate", 0.0, len(out))
            results.append(out)
        return results


def open_engine(path: str, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                onednn: bool = True, threads: int | None = None, precision: str = "fp32") -> TorchEngine:
    """A TorchEngine over a local Hugging Face directory of safetensors weights, loaded in
    `precision` (models/load.PRECISIONS): how an engine process (engines/process.py) opens the
    torch engine. onednn=False serves with plain PyTorch linears: no packed second copy of the
    weights. threads: torch's intra-op threads in that process (None: torch's default, every
    core)."""
    from transformers import AutoModelForCausalLM

    from quantgate.models.load import PRECISIONS

    if threads is not None:
        torch.set_num_threads(threads)  # (the engine process's own setting: it serves nothing else)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=PRECISIONS[precision], use_safetensors=True)
    return TorchEngine(model, max_batch_size=max_batch_size, batch_tokens=batch_tokens, onednn=onednn)


def loglikelihood_reference(model: torch.nn.Module, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
    """The plain loop: one forward pass per request over context + continuation, full logits at
    every position. Correct by construction; the yardstick for TorchEngine.loglikelihood."""
    out = np.zeros(len(requests), dtype=np.float64)
    greedy = np.zeros(len(requests), dtype=bool)
    with torch.inference_mode():
        for i, (ctx, cont) in enumerate(requests):
            ids = torch.tensor([list(ctx) + list(cont)])
            logits = model(ids).logits[0, len(ctx) - 1 : -1]  # rows predicting the continuation
            lp = torch.log_softmax(logits.float(), dim=-1)
            target = torch.tensor(cont)
            out[i] = lp[torch.arange(len(cont)), target].double().sum().item()
            greedy[i] = bool((lp.argmax(-1) == target).all())
    return out, greedy


def make_with_progress(ctx: RunContext, cand: MethodConfig, later_steps: int,
                       baseline: Baseline | None = None) -> tuple[CandidateModel, Callable[[int], None], float]:
    """The candidate made from `baseline` (default: the run's; methods/apply.py) under a progress
    bar of its own (one step per calibrated block, else one), with `later_steps` left for the
    caller; returns it, the bar and the seconds it took."""
    from quantgate.methods.apply import make_candidate

    base = baseline or ctx.baseline
    calibrated = cand.needs_calibration
    n_blocks = len(base.model.get_submodule(base.arch.blocks)) if calibrated else 1
    step = ctx.progress(cand.label, later_steps + n_blocks)
    t0 = time.perf_counter()
    made = make_candidate(base.model, base.arch, cand, ctx.calib if calibrated else None,
                          seed=ctx.cfg.seed, on_block=lambda i: step(1))
    if not calibrated:
        step(1)
    return made, step, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# The torch backend: candidates are fake-quantized PyTorch copies of the baseline, scored in this
# process; only the baseline's speed is measured (in an engine process over its safetensors).


class TorchBackend(Backend):
    def scoring_engine(self, ctx: RunContext, model: torch.nn.Module) -> TorchEngine:
        ev = ctx.cfg.evaluation
        return TorchEngine(model, max_batch_size=ev.batch_size, batch_tokens=ev.batch_tokens)

    def baseline(self, ctx: RunContext, label: str = "baseline") -> Served:
        from quantgate.methods.apply import weight_bytes

        model = ctx.baseline.model
        return Served(label, weight_bytes(model)[0], "every parameter at the baseline's precision",
                      f"{ctx.baseline.precision} (baseline)", serves_from=ctx.baseline.weights_dir,
                      opener=lambda: ready(self.scoring_engine(ctx, model)))

    def full_precision(self, ctx: RunContext) -> Served:
        """The checkpoint's weights loaded again in float32 (models/load.at_precision)."""
        from quantgate.methods.apply import weight_bytes
        from quantgate.models.load import at_precision

        model = at_precision(ctx.baseline, "fp32").model
        return Served("fp32", weight_bytes(model)[0], "every parameter in float32",
                      f"fp32 (the checkpoint at full precision, against the {ctx.baseline.precision} baseline)",
                      opener=lambda: ready(self.scoring_engine(ctx, model)))

    def candidate(self, ctx: RunContext, cand: MethodConfig) -> Served:
        """A fake-quantized copy of the baseline (methods/apply.py), in this process."""
        made, step, seconds = make_with_progress(ctx, cand, later_steps=2)
        return Served(cand.label, made.weight_bytes, "packed integer codes and scales of the quantized weights, "
                      "the other parameters at the baseline's precision (no artifact written)", cand.scheme,
                      made.modules_changed, seconds, opener=lambda: ready(self.scoring_engine(ctx, made.model)),
                      step=step)

    def exported(self, ctx: RunContext, label: str, directory: Path, files: list[str],
                 scheme: Mapping[str, Any]) -> Served:
        """A compressed-tensors or hf export, loaded by plain transformers."""
        from quantgate.export.formats import load_torch_artifact

        model = load_torch_artifact(directory, dict(scheme))
        size = sum((directory / f).stat().st_size for f in files)
        return Served(label, size, "the exported files' bytes", str(scheme.get("format", "")),
                      opener=lambda: ready(self.scoring_engine(ctx, model)))

    def serving_options(self, ctx: RunContext, served: Served) -> dict[str, Any]:
        """Only the baseline (and its A/A twin) is served from files, in the baseline's precision;
        fake-quantized candidates (weights at the baseline's precision: quality only) have nothing
        to serve from (Backend.serving: not measured). Plain PyTorch linears: the oneDNN-packed
        weights that speed up scoring are a second copy of every linear (+540 MB peak RSS on the
        default model for 8-17% more throughput)."""
        return {"max_batch_size": ctx.cfg.serving.max_batch_size, "onednn": False,
                "precision": ctx.baseline.precision}

    def noise_reference(self, ctx: RunContext) -> tuple[TorchEngine, str]:
        """Itself, one window per pass with the default GEMM: batching and kernel choice."""
        return TorchEngine(ctx.baseline.model, max_batch_size=1, onednn=False), "torch, one window per pass"
