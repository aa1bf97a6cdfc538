"""Calibration: the data calibrated methods see, and the one layer-by-layer driver they share.

The driver captures, on the calibration windows, the first transformer block's hidden states and
every block's own keyword arguments (its attention mask and position embeddings: a sliding-window
layer and a full-attention layer get different ones, and Gemma 3's use different rope bases). Then
for each block in turn it runs the block once with forward hooks that collect what the method
needs about each group of linears that read the same input (Hessian, sample rows, per-channel
max), lets the method change the block, and runs the *changed* block to produce the next block's
inputs. Blocks run in the model's own dtype (a bf16 model is never copied to float32); the
statistics are float32.

Peak memory beyond the model being changed (N windows of L tokens, hidden width D, b bytes per
element of the model's dtype, MICRO_BATCH = m):
    2·N·L·D·b                     one block's inputs and outputs for every window
  + Σ_groups in_g²·4              float32 Hessians of one block (gptq, wanda, sparsegpt; awq keeps
                                  SAMPLE_ROWS·in_g·4 sampled rows per group instead, smoothquant in_g·4)
  + one micro-batch through one block (m·L·max(D, intermediate)·b and its m·heads·L² attention)
  + the method's float32 working copies of one weight (gptq: about 3·out·in·4)
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from quantgate import readers
from quantgate.config import CalibrationConfig
from quantgate.errors import UserError
from quantgate.evals import prose
from quantgate.methods.gptq import accumulate_hessian
from quantgate.methods.smoothquant import accumulate_absmax
from quantgate.models.arch import ArchInfo, require_row

MICRO_BATCH = 8  # calibration windows per forward pass
SAMPLE_ROWS = 4096  # activation rows kept per input group (AWQ's search data)


@dataclass(frozen=True)
class CalibrationSet:
    windows: torch.Tensor  # long [samples, seq_len]
    source: str
    digest: str  # sha256 of the token ids


def calibration_text(cfg: CalibrationConfig) -> tuple[str, str]:
    """(text, source description) of the configured calibration data."""
    if cfg.data == "default":
        return prose.pool_text("calibration"), "offline prose, calibration pool (pydoc_data topics)"
    path = Path(cfg.data)
    if path.suffix == ".jsonl":
        texts = []
        for lineno, obj in readers.read_jsonl(path, "calibration data"):
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' string")
            texts.append(obj["text"])
        return "\n\n".join(texts), str(path)
    return readers.read_text(path, "calibration data"), str(path)


def check_disjoint(calibration: str, eval_texts: Iterable[str]) -> None:
    """Refuse calibration text that shares a run of prose.OVERLAP_WORDS words with the eval text."""
    calib = prose.word_ngrams(calibration)
    for text in eval_texts:
        shared = calib & prose.word_ngrams(text)
        if shared:
            example = " ".join(min(shared))
            raise UserError(f"calibration data overlaps the eval set ({len(shared)} shared "
                            f"{prose.OVERLAP_WORDS}-word runs, e.g. '{example}'): calibrating on evaluated "
                            "text would flatter the candidate")


def calibration_set(tokenizer, cfg: CalibrationConfig, eval_texts: Iterable[str]) -> CalibrationSet:
    """`samples` non-overlapping windows of `seq_len` tokens, drawn with `seed`, after checking
    that the text is disjoint from the eval text. Each window starts with the tokenizer's text
    prefix (its BOS, when it adds one), as every sequence the model is evaluated on does."""
    from quantgate.evals.tasks import text_prefix, token_windows

    text, source = calibration_text(cfg)
    check_disjoint(text, eval_texts)
    ids = tokenizer.encode(text, add_special_tokens=False)
    n_runs = len(ids) // max(1, cfg.seq_len - len(text_prefix(tokenizer)))
    chosen = sorted(random.Random(cfg.seed).sample(range(n_runs), cfg.samples)) if n_runs >= cfg.samples else None
    windows = torch.tensor(token_windows(tokenizer, ids, cfg.seq_len, cfg.samples, "calibration", source, chosen))
    return CalibrationSet(windows, source, hashlib.sha256(windows.numpy().tobytes()).hexdigest())


# -- the layer-by-layer driver -------------------------------------------------------------------


@dataclass
class GroupInputs:
    """What was seen at the input of one group of linears that read the same tensor."""

    hessian: torch.Tensor | None = None  # [in, in] = 2/n Σ xᵀx (gptq)
    n_rows: int = 0
    absmax: torch.Tensor | None = None  # [in] max |x| per channel (smoothquant)
    rows: list[torch.Tensor] = field(default_factory=list)  # sampled [k, in] rows (awq)

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


# (block, {first linear name of each group: GroupInputs}) -> number of linears changed
BlockMethod = Callable[[torch.nn.Module, dict[str, GroupInputs]], int]


def _block_inputs(model: torch.nn.Module, blocks: torch.nn.ModuleList,
                  windows: torch.Tensor) -> list[tuple[torch.Tensor, list[dict]]]:
    """Per micro-batch: (block 0's hidden states [b, L, D], each block's own keyword arguments).

    The decoder runs once per micro-batch with every block stubbed out (it records what it is
    called with and passes its input through), so each block's attention mask and position
    embeddings are the ones the real model gives it: Gemma 3 interleaves sliding-window and
    full-attention layers with different rope bases. Those arguments depend on the token
    positions only, never on the blocks' weights; blocks of one kind share the same tensors."""
    seen: list[tuple[torch.Tensor, list[dict]]] = []

    def stub(i: int) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == 0:
                seen.append((hidden, []))
            seen[-1][1].append(kwargs)
            return hidden
        return forward

    for i, block in enumerate(blocks):
        block.forward = stub(i)
    try:
        for start in range(0, len(windows), MICRO_BATCH):
            model.get_decoder()(input_ids=windows[start : start + MICRO_BATCH], use_cache=False)
    finally:
        for block in blocks:
            del block.forward
    return seen


def _run_block(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def collect(block: torch.nn.Module, groups: list[str], batches: list[tuple[torch.Tensor, dict]],
            needs: set[str], seed: int) -> dict[str, GroupInputs]:
    """Run the block over every micro-batch with hooks on the first linear of each group."""
    stats = {name: GroupInputs() for name in groups}
    rng = torch.Generator().manual_seed(seed)
    per_batch = -(-SAMPLE_ROWS // max(1, len(batches)))  # rows kept per micro-batch

    def hook_for(name: str) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [rows, in]
            s = stats[name]
            if "hessian" in needs:
                s.hessian, s.n_rows = accumulate_hessian(s.hessian, x, s.n_rows)
            if "absmax" in needs:
                s.absmax = accumulate_absmax(s.absmax, x)
            if "rows" in needs:
                s.rows.append(x[torch.randperm(x.shape[0], generator=rng)[:per_batch]])
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in groups]
    try:
        for hidden, kwargs in batches:
            _run_block(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    return stats


def walk_blocks(model: torch.nn.Module, arch: ArchInfo,
                windows: torch.Tensor) -> Iterator[tuple[int, torch.nn.Module, list[tuple[torch.Tensor, dict]]]]:
    """(index, block, its inputs per micro-batch: (hidden [b, L, D], keyword arguments)) for each
    block in order. When the caller asks for the next block, the current one (as the caller left
    it) is run on its inputs to make the next block's hidden states."""
    blocks = model.get_submodule(arch.blocks)
    captured = _block_inputs(model, blocks, windows)
    hidden = [h for h, _ in captured]
    for i, block in enumerate(blocks):
        inputs = [(h, kwargs[i]) for h, (_, kwargs) in zip(hidden, captured)]
        yield i, block, inputs
        hidden = [_run_block(block, h, kw) for h, kw in inputs]  # the (changed) block's outputs


def run_blocks(model: torch.nn.Module, arch: ArchInfo, calib: CalibrationSet, needs: set[str],
               method: BlockMethod, seed: int, on_block: Callable[[int], None] | None = None) -> int:
    """Apply `method` block by block (see the module docstring). Returns linears changed. Needs
    the architecture's row (its groups of linears)."""
    require_row(arch, getattr(model.config, "model_type", ""), "calibrated methods (gptq, awq, smoothquant, "
                "wanda, sparsegpt, imatrix)")
    groups = [g.linears[0] for g in arch.groups]
    changed = 0
    with torch.inference_mode():
        for i, block, inputs in walk_blocks(model, arch, calib.windows):
            stats = collect(block, groups, inputs, needs, seed + i)
            changed += method(block, stats)
            if on_block:
                on_block(i)
    return changed
