"""Turn a baseline into a candidate: walk the modules the architecture table names and apply a
method's pure tensor functions to their weights (calibrated methods through the one
layer-by-layer driver in calibrate.py). Counts what changed; nothing changed is an error.

A candidate with `steps` runs them in order on one copy: prune steps (methods/prune.py), then
at most one quantize step, which keeps the pruned zeros exactly zero (RTN, AWQ and SmoothQuant
map 0 to 0 on their grids, the asymmetric zero point being an integer code; GPTQ is given the
mask and stores the code of 0, compensating like a rounding error).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from quantgate.errors import NothingHappened, NotSupportedYet, UserError
from quantgate.export.codes import recover_codes
from quantgate.methods import awq, gptq, prune, qat, smoothquant
from quantgate.methods.registry import (
    METHODS, PRUNE_PATTERNS, AwqConfig, ComposeConfig, GptqConfig, MethodConfig, PruneConfig, QatConfig,
    SmoothQuantConfig,
)
from quantgate.methods.calibrate import (
    MICRO_BATCH, BlockInputs, BlockMethod, CalibrationSet, GroupInputs, ReconstructMethod, run_blocks,
)
from quantgate.methods.rtn import QuantSpec, dequantize, fake_quantize, packed_bytes
from quantgate.models.arch import ArchInfo, Group, Units, part_rows


@dataclass(frozen=True)
class CandidateModel:
    model: torch.nn.Module
    modules_changed: int  # summed over steps (a linear pruned, then quantized, counts twice)
    # Packed bytes of quantized tensors + baseline-precision bytes of the rest. Unstructured
    # sparsity saves nothing here: the zeros are stored densely (no sparse format is written);
    # structured pruning's smaller shapes are counted as they are.
    weight_bytes: int
    quantized_params: int  # number of weights stored as integers


def spec_of(cand: MethodConfig) -> QuantSpec:
    return QuantSpec(bits=cand.bits, group_size=cand.group_size, symmetric=bool(cand.symmetric))


def targets(model: torch.nn.Module, arch: ArchInfo, cand: MethodConfig) -> list[str]:
    """Names of modules whose `.weight` the candidate quantizes."""
    names = block_linears(model, arch)
    if cand.quantize_embeddings:
        names += [n for n in arch.embeddings if _has_module(model, n)]
    return names


def block_linears(model: torch.nn.Module, arch: ArchInfo) -> list[str]:
    """Names of every Linear inside the architecture's blocks."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and arch.is_block_linear(n)]


def make_candidate(
    baseline: torch.nn.Module, arch: ArchInfo, cand: MethodConfig, calib: CalibrationSet | None = None,
    *, seed: int = 0, on_block: Callable[[int], None] | None = None,
) -> CandidateModel:
    """A quantized and/or pruned copy of `baseline` (which is left untouched), made by the
    driver the method's registry entry names; candidates that need_calibration need `calib`.
    Raises NothingHappened when a step matched no module of the architecture table or changed
    no weight."""
    if cand.needs_calibration and calib is None:
        raise ValueError(f"candidate {cand.label} needs calibration data")
    model = copy.deepcopy(baseline)
    with torch.no_grad():
        changed, specs = METHODS[cand.method].driver()(model, arch, cand, calib, seed, on_block, False)
    total, qparams = weight_bytes(model, specs)
    return CandidateModel(model=model, modules_changed=changed, weight_bytes=total, quantized_params=qparams)


# -- drivers: f(model, arch, cfg, calib, seed, on_block, keep_zeros) -> (linears changed, specs) --
# (the contract of MethodSpec.apply; keep_zeros: exact zeros are pruned weights to keep at 0)

Changed = tuple[int, dict[int, QuantSpec]]


def apply_compose(model: torch.nn.Module, arch: ArchInfo, cand: ComposeConfig, calib: CalibrationSet | None,
            seed: int, on_block: Callable[[int], None] | None, keep_zeros: bool) -> Changed:
    """The steps in order on one model; changes summed (a linear pruned, then quantized, counts
    twice); a quantize step after a prune step keeps the pruned zeros."""
    changed, specs, pruned = 0, {}, keep_zeros
    for step in cand.steps:
        n, step_specs = METHODS[step.method].driver()(model, arch, step, calib, seed, on_block, pruned)
        changed, specs = changed + n, {**specs, **step_specs}
        pruned = pruned or step.quantized_bits is None
    return changed, specs


def apply_rtn(model, arch, cand, calib, seed, on_block, keep_zeros) -> Changed:  # noqa: ANN001 (the driver contract)
    """keep_zeros needs nothing here: RTN maps 0 to 0 (the asymmetric zero point is a code)."""
    return _quantize(model, arch, cand, None)


def apply_gptq(model, arch, cand, calib, seed, on_block, keep_zeros) -> Changed:  # noqa: ANN001
    return _quantize(model, arch, cand, _calibrated(gptq_block(cand, arch, keep_zeros=keep_zeros), cand, calib, seed, on_block))


def apply_awq(model, arch, cand, calib, seed, on_block, keep_zeros) -> Changed:  # noqa: ANN001
    return _quantize(model, arch, cand, _calibrated(awq_block(cand, arch, model.config), cand, calib, seed, on_block))


def apply_smoothquant(model, arch, cand, calib, seed, on_block, keep_zeros) -> Changed:  # noqa: ANN001
    return _quantize(model, arch, cand, _calibrated(_smoothquant_block(cand, arch, model.config), cand, calib, seed, on_block))


def apply_w8a8(model, arch, cand, calib, seed, on_block, keep_zeros) -> Changed:  # noqa: ANN001
    return _quantize(model, arch, cand, None)


# A calibrated block pass: model -> linears changed (run_blocks with the method's statistics).
BlockPass = Callable[[torch.nn.Module, ArchInfo], int]


def _calibrated(method: BlockMethod, cand: MethodConfig, calib: CalibrationSet | None, seed: int,
                on_block: Callable[[int], None] | None) -> BlockPass:
    needs = set(cand.calibration_needs())
    return lambda model, arch: run_blocks(model, arch, calib, needs, method, seed, on_block)


def _quantize(model: torch.nn.Module, arch: ArchInfo, cand: MethodConfig, blocks: BlockPass | None) -> Changed:
    """Quantize `model` in place: block linears by the calibrated pass `blocks` when given, every
    other target (all of them without one) by RTN. Returns (linears changed, {id of each
    quantized weight: its spec})."""
    spec = spec_of(cand)
    names = targets(model, arch, cand)
    changed = blocks(model, arch) if blocks is not None else 0
    seen: set[int] = set()
    for name in names:
        weight = model.get_submodule(name).weight
        if (blocks is not None and arch.is_block_linear(name)) or id(weight) in seen:
            continue  # done block by block above, or tied to a tensor already quantized
        seen.add(id(weight))
        changed += _write(weight, fake_quantize(weight, spec))
    if not names or changed == 0:
        raise NothingHappened(
            f"candidate {cand.label}: quantized 0 modules "
            f"({len(names)} matched the architecture table, none changed)"
        )
    if cand.activation_bits:  # activations of linears only: an embedding's input is token ids
        for name in names:
            module = model.get_submodule(name)
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(_quantize_input)
    return changed, {id(model.get_submodule(n).weight): spec for n in names}


def _write(weight: torch.nn.Parameter, new: torch.Tensor) -> int:
    """Copy new values into a weight; 1 if anything changed."""
    new = new.to(weight.dtype)
    changed = not torch.equal(new, weight)
    weight.data.copy_(new)
    return int(changed)


def _quantize_input(_module: torch.nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: int8 per-token dynamic fake quantization of a linear's input (W8A8)."""
    return (smoothquant.fake_quantize_activations(args[0], bits=8), *args[1:])


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """GPTQ's column loop runs many small ops: one thread is faster than several here."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _linear_groups(arch: ArchInfo, block: torch.nn.Module) -> list[tuple[str, ...]]:
    """Names of the linears that read one tensor, per group: the row's groups, or (an architecture
    without a row) every Linear of the block on its own."""
    if arch.groups:
        return [g.linears for g in arch.groups]
    return [(n,) for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]


def _inputs(stats: dict[str, GroupInputs], linears: Sequence[str]) -> GroupInputs:
    s = stats[linears[0]]
    if s.n_rows == 0 and s.absmax is None and not s.rows:
        raise NothingHappened(f"no calibration inputs reached {linears[0]}")
    return s


@dataclass(frozen=True)
class _Feeder:
    """Where a group's input scales fold: the feeder module's rows `rows`; `offset` is the
    architecture's norm offset for a norm (Gemma's 1 + w), 0 for a linear."""

    module: torch.nn.Module
    rows: slice
    offset: float

    @property
    def is_norm(self) -> bool:
        return self.module.weight.dim() == 1

    def fold(self, scales: torch.Tensor) -> None:
        """Divide what the feeder produces (its rows) by scales [rows]: the group then reads x / s."""
        weight, bias = self.module.weight, getattr(self.module, "bias", None)
        _write_rows(weight, self.rows, awq.fold_into_previous(weight.data[self.rows], scales, self.offset))
        if bias is not None:
            _write_rows(bias, self.rows, awq.fold_into_previous(bias.data[self.rows], scales))


def _feeder(arch: ArchInfo, config, block: torch.nn.Module, group: Group) -> _Feeder | None:
    """The group's feeder, or None when it has none or its width is not the linears' input width
    (e.g. grouped-query v_proj -> o_proj)."""
    if group.feeder is None:
        return None
    module = block.get_submodule(group.feeder)
    rows = part_rows(arch, group.feeder, group.part, config) if group.part else slice(None)
    width = module.weight[rows].shape[0]
    if width != block.get_submodule(group.linears[0]).weight.shape[1]:
        return None
    return _Feeder(module, rows, arch.norm_offset if module.weight.dim() == 1 else 0.0)


def _write_rows(param: torch.nn.Parameter, rows: slice, new: torch.Tensor) -> None:
    param.data[rows] = new.to(param.dtype)


def gptq_block(cand: GptqConfig, arch: ArchInfo, config: object = None, keep_zeros: bool = False) -> BlockMethod:
    """(config: the model's, unused; the block_pass contract of methods/registry.MethodSpec.)"""
    spec = spec_of(cand)

    def apply(block: torch.nn.Module, stats: dict[str, GroupInputs]) -> int:
        changed = 0
        for linears in _linear_groups(arch, block):
            hessian = _inputs(stats, linears).hessian
            for name in linears:
                weight = block.get_submodule(name).weight
                keep = weight.data != 0 if keep_zeros else None
                with _threads(1):
                    q = gptq.gptq_quantize(weight.data, hessian, spec, damp=cand.damp, act_order=cand.act_order,
                                           keep=keep)
                changed += _write(weight, dequantize(q))
        return changed
    return apply


def awq_block(cand: AwqConfig, arch: ArchInfo, config, quantize: bool = True) -> BlockMethod:
    """Scales searched and folded (the float function unchanged), then, when `quantize`, clip
    search and RTN. Returns linears changed (by scaling alone when not quantizing).
    (A pruned zero needs nothing here: scaling and RTN map 0 to 0.)"""
    spec = spec_of(cand)

    def apply(block: torch.nn.Module, stats: dict[str, GroupInputs]) -> int:
        scales: dict[str, torch.Tensor] = {}  # linear name -> the scales its input now carries
        changed = 0
        for group in arch.groups:  # 1. scales, folded so the float model is unchanged
            feeder = _feeder(arch, config, block, group)
            if feeder is None:
                continue
            weights = [block.get_submodule(n).weight for n in group.linears]
            found = awq.search_scales(_inputs(stats, group.linears).sample, [w.data for w in weights], spec,
                                      grid=cand.grid)
            feeder.fold(found.scales)
            for name, w in zip(group.linears, weights):
                changed += _write(w, awq.apply_scales(w.data, found.scales)) * (not quantize)
                scales[name] = found.scales
        for linears in _linear_groups(arch, block) if quantize else ():  # 2. clip search and quantize
            x = _inputs(stats, linears).sample
            for name in linears:
                weight = block.get_submodule(name).weight
                x_seen = x / scales[name] if name in scales else x
                changed += _write(weight, fake_quantize(awq.search_clip(x_seen, weight.data, spec), spec))
        return changed
    return apply


def _smoothquant_block(cand: SmoothQuantConfig, arch: ArchInfo, config, quantize: bool = True) -> BlockMethod:
    """Smoothing folded into norm-fed groups, then (when `quantize`) int8 weights. Returns the
    count of linears changed (smoothing alone changes the function by rounding only).
    (A pruned zero needs nothing here: scaling and RTN map 0 to 0.)"""
    spec = spec_of(cand)

    def apply(block: torch.nn.Module, stats: dict[str, GroupInputs]) -> int:
        changed = 0
        for group in arch.groups:
            weights = [block.get_submodule(n).weight for n in group.linears]
            feeder = _feeder(arch, config, block, group)
            if feeder is not None and feeder.is_norm:  # smooth only inputs that come from a norm
                s = smoothquant.smoothing_scales(_inputs(stats, group.linears).absmax,
                                                 smoothquant.weight_absmax([w.data for w in weights]), cand.alpha)
                feeder.fold(s)
                for w in weights:
                    changed += _write(w, awq.apply_scales(w.data, s)) * (not quantize)
            for w in weights if quantize else ():
                changed += _write(w, fake_quantize(w.data, spec))
        return changed
    return apply


def rtn_block(cand: MethodConfig, arch: ArchInfo, config: object = None) -> BlockMethod:
    """RTN on every linear of one block (a qat candidate's init; plain RTN needs no block pass)."""
    spec = spec_of(cand)

    def apply(block: torch.nn.Module, stats: dict[str, GroupInputs]) -> int:
        return sum(_write(w, fake_quantize(w.data, spec)) for w in _block_linears(arch, block).values())
    return apply


def _block_linears(arch: ArchInfo, block: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{parameter name inside the block ("mlp.up_proj.weight"): weight} of every block linear."""
    return {f"{name}.weight": block.get_submodule(name).weight for linears in _linear_groups(arch, block)
            for name in linears}


# -- quantization-aware recovery (methods/qat.py) -------------------------------------------------

def apply_qat(model, arch, cand, calib, seed, on_block, keep_zeros) -> Changed:  # noqa: ANN001
    """(Trains float32 blocks: its gradients, and the codes read back from the init's weights,
    assume float32; a bf16/fp16 baseline is refused.)"""
    dtype = next(model.get_submodule(arch.blocks).parameters()).dtype
    if dtype != torch.float32:
        raise NotSupportedYet(f"{cand.label}: qat trains a float32 model; this baseline is {dtype} "
                              "(quality_gate.verified_against: fp32)")
    teacher = copy.deepcopy(model) if cand.e2e_steps else None  # the full-precision model
    changed = _quantize(model, arch, cand, _calibrated(_qat_block(cand, arch, model.config, seed), cand, calib, seed,
                                                       on_block))
    if teacher is not None:
        _qat_end_to_end(model, teacher, arch, cand, calib.windows, seed)
    return changed


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _qat_block(cand: QatConfig, arch: ArchInfo, config, seed: int, report: Callable[[str], None] = _to_stderr
               ) -> ReconstructMethod:
    """Per block: the full-precision block's output on the full-precision model's inputs (the
    target), the init method's pass (on-grid weights), then the codes and scales read back
    from those weights (export/codes.recover_codes) and trained by qat.reconstruct on the
    block's own inputs (the quantized model's), which run_blocks then feeds forward.
    Reports the loss per block through `report`."""
    init = METHODS[cand.init.method].block_method()(cand.init, arch, config)
    spec = spec_of(cand)
    state: dict[str, Any] = {"fp": None, "block": 0}  # the full-precision model's next inputs [N, L, D]

    def apply(block: torch.nn.Module, stats: dict[str, GroupInputs], batches: BlockInputs) -> int:
        t0, i = time.perf_counter(), state["block"]
        with torch.inference_mode(False):  # plain tensors: autograd may save them
            inputs = torch.cat([h for h, _ in batches])  # [N, L, D], the quantized model's
            kwargs = _shared_kwargs(batches[0][1])
            fp_inputs = inputs if state["fp"] is None else state["fp"]
            state["fp"] = targets = _block_outputs(block, fp_inputs, kwargs)
        weights = _block_linears(arch, block)
        floats = {n: w.detach().clone() for n, w in weights.items()}  # the weights before quantization
        changed = init(block, stats)
        with torch.inference_mode(False), torch.enable_grad():
            learn = {n: qat.learnable(recover_codes(w.data, spec), floats[n]) for n, w in weights.items()}
            frozen = {n: p.detach() for n, p in block.named_parameters()}
            extra = {n: p.clone().requires_grad_(True) for n, p in frozen.items() if n not in learn} if cand.norms else {}
            forward = lambda params, idx: _call_block(block, {**frozen, **params}, inputs[idx], kwargs)  # noqa: E731
            fit = qat.reconstruct(qat.output_error(forward, targets), len(inputs), learn, extra, steps=cand.steps,
                                  lr=cand.lr, rounding_lr=cand.rounding_lr, batch=cand.batch, seed=seed + i,
                                  probe=range(min(cand.PROBE_WINDOWS, len(inputs))))
        for n, w in weights.items():
            _write(w, dequantize(qat.finalize(learn[n])))
        for n, p in extra.items():
            _write(block.get_parameter(n), p.detach())
        report(f"{cand.label} block {i}: loss {fit.loss_before:.4g} -> {fit.loss_after:.4g} ({fit.steps} steps, "
               f"{time.perf_counter() - t0:.1f} s)" + (": higher, the init's parameters kept" if fit.kept_init else ""))
        state["block"] = i + 1
        return changed
    return apply


def _qat_end_to_end(model: torch.nn.Module, teacher: torch.nn.Module, arch: ArchInfo, cand: QatConfig,
                    windows: torch.Tensor, seed: int, report: Callable[[str], None] = _to_stderr) -> None:
    """After the blocks: every block linear's scales (codes and zero points kept) trained jointly
    for cand.e2e_steps Adam steps of one calibration window (windows: long [N, L]) to lower the
    KL divergence from `teacher`'s next-token distribution to `model`'s (qat.distillation).
    Writes the finalized grid back into `model`; reports the loss every 16 steps and on probe
    windows before and after."""
    t0, spec = time.perf_counter(), spec_of(cand)
    names = [f"{n}.weight" for n in block_linears(model, arch)]
    with torch.inference_mode(False), torch.enable_grad():
        learn = {n: qat.learnable(recover_codes(model.get_parameter(n).data, spec), rounding=False) for n in names}
        frozen = {n: p.detach() for n, p in model.named_parameters()}

        def student(params: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(model, {**frozen, **params}, (windows[idx],), {"use_cache": False}).logits

        def reference(idx: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.log_softmax(teacher(windows[idx], use_cache=False).logits.float(), dim=-1)

        def progress(step: int, loss: float) -> None:
            if (step + 1) % 16 == 0:
                report(f"{cand.label} end to end: step {step + 1}/{cand.e2e_steps}, KL {loss:.4g}")

        fit = qat.reconstruct(qat.distillation(student, reference), len(windows), learn, {}, steps=cand.e2e_steps,
                              lr=cand.e2e_lr, rounding_lr=0.0, batch=1, seed=seed,
                              probe=range(min(cand.E2E_PROBE_WINDOWS, len(windows))), on_step=progress)
    if not fit.kept_init:  # (kept: the model holds the blocks' weights already)
        for n in names:
            _write(model.get_parameter(n), dequantize(qat.finalize(learn[n])))
    report(f"{cand.label} end to end: KL {fit.loss_before:.4g} -> {fit.loss_after:.4g} ({fit.steps} steps, "
           f"{time.perf_counter() - t0:.1f} s)" + (": higher, the blocks' scales kept" if fit.kept_init else ""))


def _shared_kwargs(kwargs: dict) -> dict:
    """The block's keyword arguments as plain tensors with leading dimension 1, broadcast over
    any minibatch of windows. They must be the same for every window (positions and masks of
    windows of one length without padding); a tensor given per window (a sliding-window mask
    [b, 1, L, L]) is kept as its first row when every row equals it."""
    def plain(key: str, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(plain(key, v) for v in value)
        if isinstance(value, torch.Tensor):
            if value.dim() and value.shape[0] != 1:
                if not bool((value == value[:1]).all()):
                    raise ValueError(f"qat: the block's argument {key} differs per window (shape {tuple(value.shape)})")
                value = value[:1]
            return value.clone()
        return value
    return {k: plain(k, v) for k, v in kwargs.items()}


def _call_block(block: torch.nn.Module, params: dict[str, torch.Tensor], hidden: torch.Tensor,
                kwargs: dict) -> torch.Tensor:
    """The block's output [b, L, D] with its parameters replaced by `params` (all of them)."""
    out = torch.func.functional_call(block, params, (hidden,), kwargs)
    return out[0] if isinstance(out, tuple) else out


def _block_outputs(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output over every window of hidden [N, L, D], in micro-batches, no gradients."""
    with torch.no_grad():
        out = [_call_block(block, dict(block.named_parameters()), hidden[i : i + MICRO_BATCH], kwargs)
               for i in range(0, len(hidden), MICRO_BATCH)]
    return torch.cat(out)


# -- pruning ------------------------------------------------------------------------------------


def apply_prune(model: torch.nn.Module, arch: ArchInfo, cand: PruneConfig, calib: CalibrationSet | None,
                seed: int, on_block: Callable[[int], None] | None, keep_zeros: bool = False) -> Changed:
    """Prune `model` in place (block linears only); returns (linears changed, {}). Wanda and
    SparseGPT (and wanda-ranked units) read each group's input Hessian through run_blocks, so a
    block sees the inputs that the blocks pruned before it produce."""
    units = None
    if cand.structure is None:
        method = _unstructured_block(cand, arch)
    else:
        units = dict(arch.units).get(cand.structure)
        if units is None:
            raise UserError(f"candidate {cand.label}: the architecture table has no '{cand.structure}' units")
        n_units = getattr(model.config, units.counts[0])
        kept = n_units - prune.count_of(cand.sparsity, n_units)
        if kept < 1:
            raise UserError(f"candidate {cand.label}: would remove all {n_units} {cand.structure} units of a block")
        method = _structured_block(units, n_units, kept)
    if cand.needs_calibration:
        changed = run_blocks(model, arch, calib, {"hessian"}, method, seed, on_block)
    else:
        changed = sum(method(block, {}) for block in model.get_submodule(arch.blocks))
    if changed == 0:
        raise NothingHappened(f"candidate {cand.label}: pruned 0 modules")
    if units is not None:
        shrink_config(model.config, units, n_units, kept)
    return changed, {}


def _unstructured_block(cand: PruneConfig, arch: ArchInfo) -> BlockMethod:
    nm = PRUNE_PATTERNS.get(cand.pattern)
    sparsity = None if nm else cand.sparsity

    def apply(block: torch.nn.Module, stats: dict[str, GroupInputs]) -> int:
        changed = 0
        for linears in _linear_groups(arch, block):
            hessian = _inputs(stats, linears).hessian if stats else None
            for name in linears:
                weight = block.get_submodule(name).weight
                with _threads(1):
                    pruned = prune.prune_weight(weight.data, cand.prune, hessian, sparsity, nm, damp=cand.damp)
                changed += _write(weight, pruned)
        return changed
    return apply


def _structured_block(units: Units, n_units: int, kept: int) -> BlockMethod:
    """Keep the `kept` most important of each block's `n_units` units (prune.unit_importance on
    the reading projection, with its input Hessian when calibrated)."""

    def apply(block: torch.nn.Module, stats: dict[str, GroupInputs]) -> int:
        weight = block.get_submodule(units.cols).weight.data  # [out, in]
        hessian = _inputs(stats, [units.cols]).hessian if stats else None
        keep = prune.units_to_keep(prune.unit_importance(weight, n_units, hessian), n_units - kept)
        return shrink_units(block, units, n_units, keep)
    return apply


def shrink_units(block: torch.nn.Module, units: Units, n_units: int, keep: torch.Tensor) -> int:
    """Keep only units `keep` (long, ascending) of the block's `n_units`: the output rows of
    units.rows and the input columns of units.cols they own. Returns linears changed (0 when
    every unit is kept: the block is then untouched)."""
    if keep.numel() == n_units:
        return 0
    for name in units.rows:
        _shrink_linear(block.get_submodule(name), 0, keep, n_units)
    _shrink_linear(block.get_submodule(units.cols), 1, keep, n_units)
    return len(units.rows) + 1


def _shrink_linear(linear: torch.nn.Linear, dim: int, keep: torch.Tensor, n_units: int) -> None:
    """Keep the channels of units `keep` along dim (0: output rows and bias, 1: input columns).
    The new parameters are ordinary tensors even under run_blocks' inference mode."""
    index = prune.unit_channels(keep, linear.weight.shape[dim] // n_units)
    weight = linear.weight
    with torch.inference_mode(False):
        linear.weight = torch.nn.Parameter(weight.data.index_select(dim, index).clone(), weight.requires_grad)
        if dim == 0 and linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data[index].clone(), linear.bias.requires_grad)
    linear.out_features, linear.in_features = linear.weight.shape


def shrink_config(config, units: Units, n_units: int, kept: int) -> None:
    """Scale the config's unit counts (units.counts) by kept / n_units, every block having been
    shrunk alike. The head size is pinned first, or it would be re-derived as hidden_size /
    num_attention_heads."""
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    for key in units.counts:
        setattr(config, key, getattr(config, key) * kept // n_units)


def weight_bytes(model: torch.nn.Module, specs: dict[int, QuantSpec] | None = None) -> tuple[int, int]:
    """(bytes, quantized parameter count): packed size for parameters in `specs` (keyed by id of
    the tensor), element size × count for the rest; tied tensors counted once."""
    specs = specs or {}
    total = qparams = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in specs:
            total += packed_bytes(tuple(p.shape), specs[id(p)])
            qparams += p.numel()
        else:
            total += p.numel() * p.element_size()
    return total, qparams


def _has_module(model: torch.nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
