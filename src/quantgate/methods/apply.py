"""The driver that turns a baseline into a candidate: walks the modules the architecture table
names and applies a method's pure tensor function to each weight. Counts what it changed."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from quantgate.config import CandidateConfig
from quantgate.errors import NothingHappened
from quantgate.methods.rtn import QuantSpec, fake_quantize, packed_bytes
from quantgate.models.arch import ArchInfo


@dataclass(frozen=True)
class CandidateModel:
    model: torch.nn.Module
    modules_changed: int
    weight_bytes: int  # packed bytes of quantized tensors + baseline-precision bytes of the rest
    quantized_params: int  # number of weights stored as integers


def spec_of(cand: CandidateConfig) -> QuantSpec:
    return QuantSpec(bits=cand.bits, group_size=cand.group_size, symmetric=bool(cand.symmetric))


def targets(model: torch.nn.Module, arch: ArchInfo, cand: CandidateConfig) -> list[str]:
    """Names of modules whose `.weight` the candidate quantizes."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and arch.is_block_linear(n)]
    if cand.quantize_embeddings:
        names += [n for n in arch.embeddings if _has_module(model, n)]
    return names


def make_candidate(baseline: torch.nn.Module, arch: ArchInfo, cand: CandidateConfig) -> CandidateModel:
    """A quantized copy of `baseline` (which is left untouched). Raises NothingHappened when no
    module matched the architecture table or no weight changed."""
    model = copy.deepcopy(baseline)
    spec = spec_of(cand)
    names = targets(model, arch, cand)
    changed, specs = 0, {}
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            if id(weight) in specs:  # tied to a tensor already quantized (embeddings / lm_head)
                continue
            new = fake_quantize(weight, spec)
            changed += int(not torch.equal(new, weight))
            weight.copy_(new)
            specs[id(weight)] = spec
    if not names or changed == 0:
        raise NothingHappened(
            f"candidate {cand.label}: quantized 0 modules "
            f"({len(names)} matched the architecture table, none changed)"
        )
    total, qparams = weight_bytes(model, specs)
    return CandidateModel(model=model, modules_changed=changed, weight_bytes=total, quantized_params=qparams)


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
