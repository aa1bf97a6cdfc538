"""Calibration: the data calibrated methods see, and the one layer-by-layer driver they share.

The driver captures the first transformer block's inputs on the calibration windows, then for each
block in turn: runs it once with forward hooks that collect what the method needs about each
group of linears that read the same input (Hessian, sample rows, per-channel max), lets the method
change the block, and runs the *changed* block to produce the next block's inputs. Memory stays at
one block's activations for all samples. A method that needs the statistic "blocks" (qat's
reconstruction) is also handed the block's inputs.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantgate.config import CalibrationConfig
from quantgate.errors import UserError
from quantgate.evals import prose
from quantgate.methods.gptq import accumulate_hessian
from quantgate.methods.smoothquant import accumulate_absmax
from quantgate.models.arch import ArchInfo

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
    if not path.is_file():
        raise UserError(f"calibration.data: file not found: {path}")
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{path}:{lineno}: expected a JSON object with a 'text' string") from None
        return "\n\n".join(texts), str(path)
    return path.read_text(encoding="utf-8"), str(path)


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
    that the text is disjoint from the eval text."""
    text, source = calibration_text(cfg)
    check_disjoint(text, eval_texts)
    ids = tokenizer.encode(text, add_special_tokens=False)
    n_windows = len(ids) // cfg.seq_len
    if n_windows < cfg.samples:
        raise UserError(f"calibration: {cfg.samples} samples of {cfg.seq_len} tokens need "
                        f"{cfg.samples * cfg.seq_len} tokens; {source} has {len(ids)}")
    chosen = sorted(random.Random(cfg.seed).sample(range(n_windows), cfg.samples))
    windows = torch.tensor([ids[i * cfg.seq_len : (i + 1) * cfg.seq_len] for i in chosen])
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
# The block's inputs per micro-batch: (hidden states [b, L, D], the block's keyword arguments).
BlockInputs = list[tuple[torch.Tensor, dict]]
# With the statistic "blocks", the method also gets the block's inputs: (block, stats, inputs).
ReconstructMethod = Callable[[torch.nn.Module, dict[str, GroupInputs], BlockInputs], int]


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after block 0's inputs are seen."""


def _block_inputs(model: torch.nn.Module, first_block: torch.nn.Module,
                  windows: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Per micro-batch: (hidden states [b, L, D], the block's keyword arguments)."""
    seen: list[tuple[torch.Tensor, dict]] = []

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), MICRO_BATCH):
            try:
                model(input_ids=windows[start : start + MICRO_BATCH], use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
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


def run_blocks(model: torch.nn.Module, arch: ArchInfo, calib: CalibrationSet, needs: set[str],
               method: BlockMethod | ReconstructMethod, seed: int,
               on_block: Callable[[int], None] | None = None) -> int:
    """Apply `method` block by block (see the module docstring). Returns linears changed."""
    blocks = model.get_submodule(arch.blocks)
    groups = [linears[0] for _, linears in arch.scaling_groups]
    changed = 0
    with torch.inference_mode():
        batches = _block_inputs(model, blocks[0], calib.windows)
        for i, block in enumerate(blocks):
            stats = collect(block, groups, batches, needs, seed + i)
            changed += method(block, stats, batches) if "blocks" in needs else method(block, stats)
            batches = [(_run_block(block, h, kw), kw) for h, kw in batches]  # the changed block's outputs
            if on_block:
                on_block(i)
    return changed
