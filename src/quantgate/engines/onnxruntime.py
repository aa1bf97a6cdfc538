"""ONNX Runtime engine over an ONNX graph with a key/value cache, behind the same interface as
the other engines: token ids in, log-probabilities and greedy tokens out.

Graphs. The baseline is an fp32 graph written by onnxruntime-genai's model builder (fused
GroupQueryAttention with past_key_values inputs; q/k/v fused into one MatMul). A candidate is
that graph with each block linear's MatMul replaced by a `MatMulNBits` node (com.microsoft)
carrying the candidate's *own* integer codes, scales and zero points, recovered exactly from its
fake-quantized weights (export/codes.py): ORT's own quantizer would re-quantize from float
weights and lose GPTQ's or AWQ's codes. With quantize_embeddings the lm_head is one too (and
the embedding table the builder ties to it holds the candidate's dequantized values).
Artifacts are cached by content hash under <quantgate cache>/onnx/ and written atomically (a
temporary folder renamed into place).

MatMulNBits layout (checked against ORT itself in tests/test_onnxruntime.py): for B [N, K]
(output row n, input column k), w[n, k] = (code[n, k] - zero[n, k // block]) * scale[n, k // block];
codes uint8 [N, k_blocks, block * bits / 8] packed low bits first along K (the last block padded),
scales [N, k_blocks], zero points uint8 [N, ceil(k_blocks * bits / 8)] packed the same way along
the blocks, or absent (then 2^(bits - 1)). Bits 2, 4, 8; block sizes powers of two from 16 to 256.

The context's key/value cache is reused like llama.cpp's: an item's context plus the options'
common prefix is evaluated once, each option continues from its cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantgate.engines.base import Engine, Request, Timing, group_by_context, log_softmax, stop_after
from quantgate.engines.registry import Backend, RunContext, Served
from quantgate.errors import NothingHappened, NotSupportedYet, UserError
from quantgate.methods.registry import ComposeConfig

if TYPE_CHECKING:
    import onnx
    import torch

    from quantgate.config import RunConfig
    from quantgate.evals.tasks import PreparedSuite
    from quantgate.methods.registry import MethodConfig
    from quantgate.methods.rtn import QuantizedWeight
    from quantgate.models.load import Baseline

GRAPH = "model.onnx"
DATA = "model.onnx.data"
GENAI_CONFIG = "genai_config.json"  # the builder's description of the graph (heads, head size, eos)
BITS = (2, 4, 8)  # what MatMulNBits serves on CPU
BLOCK_SIZES = (16, 32, 64, 128, 256)
PER_CHANNEL_BLOCK = 32  # a per-channel scale repeated over blocks of this size: the same weights
ACCURACY_LEVELS = {0: "unset (fp32)", 1: "fp32", 2: "fp16", 3: "bf16", 4: "int8 activations"}

# The builder's MatMul nodes inside block i (/model/layers.{i}/<key>/MatMul) -> the Hugging Face
# linears under that block they hold, concatenated along N in this order (per-architecture data).
BUILDER_LINEARS = {
    "attn/qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn/q_proj": ("self_attn.q_proj",), "attn/k_proj": ("self_attn.k_proj",), "attn/v_proj": ("self_attn.v_proj",),
    "attn/o_proj": ("self_attn.o_proj",),
    "mlp/gate_proj": ("mlp.gate_proj",), "mlp/up_proj": ("mlp.up_proj",), "mlp/down_proj": ("mlp.down_proj",),
}
_BLOCK_NODE = re.compile(r"/model/layers\.(\d+)/(.+)/MatMul")
# The builder's MatMul nodes outside the blocks -> the linear they hold (quantize_embeddings: the
# lm_head, whose weight initializer the builder shares with the tied embedding's Gather).
OUTER_LINEARS = {"/lm_head/MatMul": "lm_head"}


# ---------------------------------------------------------------------------------------------
# MatMulNBits packing: pure array functions.


@dataclass(frozen=True)
class NBitsWeight:
    """One weight B [N, K] in MatMulNBits' layout (see the module docstring)."""

    packed: np.ndarray  # uint8 [N, k_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zeros: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)]; None: every zero point 2^(bits-1)
    bits: int
    block_size: int
    k: int  # input columns K (the last block holds K - (k_blocks - 1) * block_size of them)

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes)


def block_size_for(group_size: int | None) -> int:
    """The MatMulNBits block a quantgate group size is served with: the group itself, or for one
    scale per row (None) that scale repeated over PER_CHANNEL_BLOCK columns. Raises ValueError
    for a group size MatMulNBits cannot hold."""
    block = PER_CHANNEL_BLOCK if group_size is None else group_size
    if block not in BLOCK_SIZES:
        raise ValueError(f"group size {group_size} is not a MatMulNBits block size ({', '.join(map(str, BLOCK_SIZES))})")
    return block


def _pack_low_first(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values [..., m] (m a multiple of 8 / bits, each < 2^bits) -> uint8 [..., m * bits / 8],
    `8 / bits` values per byte, the first in the lowest bits."""
    per = 8 // bits
    grouped = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per)
    out = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for j in range(per):
        out |= grouped[..., j] << np.uint8(bits * j)
    return out


def _unpack_low_first(packed: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of _pack_low_first: uint8 [..., b] -> int16 [..., b * 8 / bits]."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> np.uint8(bits * j)) & np.uint8(mask) for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int16)


def pack_nbits(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int,
               group_size: int | None) -> NBitsWeight:
    """quantgate's grid (rtn.QuantizedWeight as arrays) in MatMulNBits' layout, the same weights.

    codes int [N, K] (symmetric: in ±(2^(bits-1) - 1); asymmetric: in [0, 2^bits - 1]);
    scales float16 [N, G]; zeros int [N, G] or None (symmetric); G = ceil(K / group_size), or 1
    per row when group_size is None (then repeated over blocks of PER_CHANNEL_BLOCK). Symmetric
    codes are shifted by 2^(bits-1) and served with MatMulNBits' default zero point 2^(bits-1),
    which leaves every code - zero unchanged. Raises ValueError for bits or a group size that
    MatMulNBits cannot serve."""
    if bits not in BITS:
        raise ValueError(f"{bits}-bit codes: MatMulNBits serves {', '.join(map(str, BITS))} bits")
    n, k = codes.shape
    block = block_size_for(group_size)
    k_blocks = math.ceil(k / block)
    repeat = k_blocks if group_size is None else 1  # per-channel: one group spread over every block
    scales = np.repeat(np.asarray(scales, dtype=np.float32), repeat, axis=1)  # [N, k_blocks], float16 -> exact
    shift = 0 if zeros is not None else 1 << (bits - 1)
    unsigned = np.zeros((n, k_blocks * block), dtype=np.int64)  # padding: code 0 against a zero input
    unsigned[:, :k] = np.asarray(codes, dtype=np.int64) + shift
    if unsigned.min() < 0 or unsigned.max() >= 1 << bits:
        raise ValueError(f"codes outside the {bits}-bit range")
    packed = _pack_low_first(unsigned.reshape(n, k_blocks, block), bits)
    packed_zeros = None
    if zeros is not None:
        per_block = np.repeat(np.asarray(zeros, dtype=np.int64), repeat, axis=1)  # [N, k_blocks]
        padded = np.zeros((n, math.ceil(k_blocks * bits / 8) * (8 // bits)), dtype=np.int64)
        padded[:, :k_blocks] = per_block
        packed_zeros = _pack_low_first(padded, bits)
    return NBitsWeight(packed, scales, packed_zeros, bits, block, k)


def unpack_nbits(w: NBitsWeight) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes int16 [N, K] and zero points int16 [N, k_blocks] (None when served with the default)
    on quantgate's grid: the inverse of pack_nbits (symmetric codes shifted back)."""
    n, k_blocks, _ = w.packed.shape
    codes = _unpack_low_first(w.packed, w.bits).reshape(n, -1)[:, : w.k]
    if w.zeros is None:
        return codes - np.int16(1 << (w.bits - 1)), None
    return codes, _unpack_low_first(w.zeros, w.bits)[:, :k_blocks]


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """float32 [N, K] weights a MatMulNBits node holds (its reference semantics)."""
    n, k_blocks, _ = w.packed.shape
    codes = _unpack_low_first(w.packed, w.bits).reshape(n, -1)[:, : w.k].astype(np.float32)
    zeros = (np.full((n, k_blocks), 1 << (w.bits - 1), dtype=np.float32) if w.zeros is None
             else _unpack_low_first(w.zeros, w.bits)[:, :k_blocks].astype(np.float32))
    expand = lambda x: np.repeat(x, w.block_size, axis=1)[:, : w.k]  # noqa: E731 [N, k_blocks] -> [N, K]
    return (codes - expand(zeros)) * expand(w.scales)


def concat_rows(weights: Sequence[NBitsWeight]) -> NBitsWeight:
    """Several weights on the same K and scheme stacked along N (the builder's fused q/k/v)."""
    first = weights[0]
    if any((w.bits, w.block_size, w.k, w.zeros is None) != (first.bits, first.block_size, first.k, first.zeros is None)
           for w in weights):
        raise ValueError("fused linears must share K, bits, block size and zero-point form")
    zeros = None if first.zeros is None else np.concatenate([w.zeros for w in weights])
    return NBitsWeight(np.concatenate([w.packed for w in weights]), np.concatenate([w.scales for w in weights]),
                       zeros, first.bits, first.block_size, first.k)


def from_quantized(q: QuantizedWeight) -> NBitsWeight:
    """A QuantizedWeight (torch tensors, methods/rtn.py) in MatMulNBits' layout."""
    zeros = None if q.zeros is None else q.zeros.numpy()
    return pack_nbits(q.codes.numpy(), q.scales.numpy(), zeros, q.spec.bits, q.spec.group_size)


# ---------------------------------------------------------------------------------------------
# Config-time checks: what ORT can serve (no numpy, no onnx imported).


def _nearest_block(group_size: int) -> int:
    return min(BLOCK_SIZES, key=lambda b: (abs(math.log2(b / group_size)), -b))


def unservable(cand: MethodConfig) -> str | None:
    """Why ORT cannot serve `cand` as evaluated (naming the nearest scheme it can), or None."""
    if cand.is_baseline:  # the baseline's own graph (the A/A check)
        return None
    q = cand.quantizer
    if q is None:
        return f"{cand.scheme}: only quantized candidates are served on onnxruntime (rtn, gptq, awq)"
    if isinstance(cand, ComposeConfig) and any(getattr(s, "structure", None) for s in cand.steps):
        return "structured pruning changes the graph's shapes; onnxruntime serves the baseline's graph shapes"
    if q.activation_bits:
        return (f"{q.scheme}: per-token int8 activations are not what ORT's int8 path computes "
                "(accuracy_level 4 quantizes activations per block of K); nearest servable: "
                "{method: rtn, bits: 8, accuracy_level: 4}")
    fixes = {}
    if q.bits not in BITS:
        fixes["bits"] = min((b for b in BITS if b >= q.bits), default=8)
    if q.group_size is not None and q.group_size not in BLOCK_SIZES:
        fixes["group_size"] = _nearest_block(q.group_size)
    if not fixes:
        return None
    nearest = q.model_copy(update=fixes)
    what = " and ".join(f"{k} {getattr(q, k)}" for k in fixes)
    return (f"{q.scheme}: {what} cannot be served by MatMulNBits (bits {', '.join(map(str, BITS))}; block sizes "
            f"{', '.join(map(str, BLOCK_SIZES))}); nearest servable: {nearest.scheme}")


def check_config(cfg: RunConfig) -> None:
    """One line per refusal: the first candidate ORT cannot serve, and why (unless
    serving.unservable is "simulate": then the run measures it on torch and fails its gate)."""
    if cfg.serving.unservable == "simulate":
        return
    for c in cfg.resolved_candidates:
        why = unservable(c)
        if why is not None:
            raise UserError(f"candidate {c.label}: {why} (or set serving.unservable: simulate to measure "
                            "its quality by fake quantization)")


# ---------------------------------------------------------------------------------------------
# The engine.


class OnnxRuntimeEngine:
    """An InferenceSession over a graph folder (GRAPH, its data file, GENAI_CONFIG), batch 1,
    on every core this process may run on (threads=None)."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(path)
        if not (folder / GRAPH).is_file():
            raise UserError(f"{folder}: no {GRAPH} (an ONNX graph folder quantgate wrote)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / GRAPH), opts, providers=["CPUExecutionProvider"])
        decoder = json.loads((folder / GENAI_CONFIG).read_text())["model"]
        eos = decoder.get("eos_token_id")
        self.ends = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.kv_heads, self.head_size = decoder["decoder"]["num_key_value_heads"], decoder["decoder"]["head_size"]
        self.outputs = [o.name for o in self.session.get_outputs()]  # logits, then present.{i}.{key,value}
        self.past = [n.replace("present.", "past_key_values.") for n in self.outputs[1:]]
        self.timing = Timing()

    def _empty(self) -> list[Any]:
        import onnxruntime as ort

        empty = np.zeros((1, self.kv_heads, 0, self.head_size), dtype=np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(empty)] * len(self.past)

    def _forward(self, tokens: Sequence[int], cache: list[Any], start: int) -> tuple[np.ndarray, list[Any]]:
        """tokens after `start` cached positions -> (logits float32 [len(tokens), V], the cache
        after them). The cache is a list of OrtValues kept in ORT's memory between steps."""
        import onnxruntime as ort

        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.array([list(tokens)], dtype=np.int64)),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, start + len(tokens)), dtype=np.int64))}
        feed.update(zip(self.past, cache))
        out = self.session.run_with_ort_values(self.outputs, feed)
        return out[0].numpy()[0], list(out[1:])

    def loglikelihood(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
        out = np.zeros(len(requests), dtype=np.float64)
        greedy = np.ones(len(requests), dtype=bool)
        with self.timing.timed("loglikelihood", sum(len(c) + len(x) for c, x in requests)):
            for group in group_by_context(requests):
                prefix = group.prefix
                logits, cache = self._forward(prefix, self._empty(), 0)
                head = log_softmax(logits[len(group.context) - 1 :])  # rows predicting shared + first own token
                for i, cont in zip(group.request_ids, group.continuations):
                    own = cont[group.shared :]
                    rows = head if len(own) == 1 else np.concatenate(
                        [head, log_softmax(self._forward(own[:-1], cache, len(prefix))[0])])
                    targets = np.array(cont)
                    out[i] = float(rows[np.arange(len(cont)), targets].sum())
                    greedy[i] = bool((rows.argmax(-1) == targets).all())
        return out, greedy

    def window_logprobs(self, window: Sequence[int]) -> np.ndarray:
        """token_logprobs of one window as numpy, float32 [T-1, V] (no torch needed)."""
        with self.timing.timed("token_logprobs", len(window)):
            logits, _ = self._forward(window, self._empty(), 0)
            return log_softmax(logits[: len(window) - 1]).astype(np.float32)

    def token_logprobs(self, windows: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        import torch

        for w in windows:
            yield torch.from_numpy(self.window_logprobs(w))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = (),
                 on_token: Callable[[], None] | None = None) -> list[list[int]]:
        """Greedy continuation ids (engines/base.py); on_token: called as each token is known."""
        stops, results = set(stop_ids), []
        for prompt in prompts:
            out: list[int] = []
            with self.timing.timed("generate", len(prompt)):
                logits, cache = self._forward(prompt, self._empty(), 0)
                position = len(prompt)
                for _ in range(max_new_tokens):
                    token = int(np.argmax(logits[-1]))
                    out.append(token)
                    if on_token is not None:
                        on_token()
                    if stop_after(token, out, self.ends, stops):
                        break
                    logits, cache = self._forward([token], cache, position)
                    position += 1
            self.timing.add("generate", 0.0, len(out))
            results.append(out)
        return results


# ---------------------------------------------------------------------------------------------
# Graphs: the builder's fp32 baseline, and candidates with MatMulNBits nodes.


def graph_bytes(folder: Path) -> int:
    """Bytes the engine loads: the graph and its data file(s)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(GRAPH))


def _finish(write: Callable[[Path], None], out: Path) -> Path:
    """Write a folder under a temporary name beside `out`, then rename it into place (a killed
    run never leaves a half-written graph where a cached one is expected)."""
    if (out / GRAPH).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cache_dir(baseline: Baseline) -> Path:
    from quantgate.models.load import cache_root

    return cache_root() / "onnx" / baseline.digest[:16]


def float_graph(baseline: Baseline, log: Path) -> Path:
    """The baseline as an fp32 ONNX graph with a KV cache, written by onnxruntime-genai's model
    builder from the loaded weights (saved with the tokenizer, which the builder reads);
    cached by the weights' sha256."""
    return _finish(lambda tmp: _build(baseline, tmp, log), _cache_dir(baseline) / "fp32")


def _build(baseline: Baseline, out: Path, log: Path) -> None:
    if not hasattr(baseline.tokenizer, "save_pretrained"):
        raise UserError("onnxruntime's model builder needs a Hugging Face tokenizer beside the weights")
    with tempfile.TemporaryDirectory(prefix="quantgate-onnx-") as stage:
        baseline.model.save_pretrained(stage, safe_serialization=True)
        baseline.tokenizer.save_pretrained(stage)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as err:
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", stage, "-o",
                                   str(out), "-p", "fp32", "-e", "cpu", "-c", str(Path(stage) / "hf-cache")],
                                  stdout=err, stderr=err, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or not (out / GRAPH).is_file():
        raise UserError(f"onnxruntime-genai's model builder failed (exit {done.returncode}); log: {log}")
    for extra in out.iterdir():  # keep the graph and what the engine reads; tokenizer files are quantgate's
        if not (extra.name.startswith(GRAPH) or extra.name == GENAI_CONFIG):
            extra.unlink()


def block_weights(node_names: Sequence[str], blocks: str) -> dict[str, tuple[str, ...]]:
    """The builder's MatMul nodes -> the full names of the Hugging Face linears each holds
    (`blocks`: the architecture's block list, e.g. "model.layers"): the blocks' (BUILDER_LINEARS)
    and the lm_head (OUTER_LINEARS); a block MatMul the table does not know is an error."""
    found = {}
    for name in node_names:
        m = _BLOCK_NODE.fullmatch(name)
        if m is None:
            if name in OUTER_LINEARS:
                found[name] = (OUTER_LINEARS[name],)
            continue
        if m.group(2) not in BUILDER_LINEARS:
            raise ValueError(f"{name}: a block MatMul the builder table (BUILDER_LINEARS) does not know")
        found[name] = tuple(f"{blocks}.{m.group(1)}.{sub}" for sub in BUILDER_LINEARS[m.group(2)])
    return found


def nbits_node(node: onnx.NodeProto, w: NBitsWeight, accuracy_level: int) -> tuple[onnx.NodeProto, list]:
    """A MatMulNBits node computing what the MatMul `node` computed, with `w` as its weight, and
    its initializers."""
    from onnx import helper, numpy_helper

    prefix = node.name.removesuffix("/MatMul").lstrip("/").replace("/", ".")
    names = [f"{prefix}.MatMulNBits.{part}" for part in ("qweight", "scales", "qzeros")]
    inits = [numpy_helper.from_array(w.packed, names[0]), numpy_helper.from_array(w.scales.reshape(-1), names[1])]
    if w.zeros is not None:
        inits.append(numpy_helper.from_array(w.zeros.reshape(-1), names[2]))
    new = helper.make_node("MatMulNBits", [node.input[0], *names[: len(inits)]], list(node.output),
                           name=node.name.removesuffix("MatMul") + "MatMulNBits", domain="com.microsoft",
                           K=w.k, N=w.n, bits=w.bits, block_size=w.block_size, accuracy_level=accuracy_level)
    return new, inits


def quantized_graph(base: onnx.ModelProto, weights: dict[str, NBitsWeight], blocks: str,
                    accuracy_level: int, floats: Mapping[str, np.ndarray] | None = None) -> int:
    """Replace, in place, every MatMul of the builder's graph `base` whose linears `weights` holds
    (full HF linear name -> its packed weight; a fused node's linears are stacked along N) by a
    MatMulNBits node, and the float initializers named in `floats` (HF parameter name, which
    the builder uses for norms -> the candidate's values, same shape: e.g. AWQ's folded norms).
    A replaced MatMul's weight initializer that other nodes still read (the tied embedding's
    table, read through a Transpose) keeps the candidate's dequantized values, [K, N].
    Returns the linears replaced; zero, or a linear or float left unmatched, is an error."""
    inits = {t.name: t for t in base.graph.initializer}
    _replace_floats(inits, floats or {})
    holders = block_weights([n.name for n in base.graph.node], blocks)
    nodes, added, dropped, used = [], [], {}, set()
    for node in base.graph.node:
        if node.name not in holders or not all(h in weights for h in holders[node.name]):
            nodes.append(node)
            continue
        w = concat_rows([weights[h] for h in holders[node.name]])
        dims = tuple(inits[node.input[1]].dims)  # the fp32 MatMul's weight [K, N]
        if dims != (w.k, w.n):
            raise ValueError(f"{node.name}: the graph's weight is {dims}, the candidate's [K, N] is {(w.k, w.n)}")
        new, new_inits = nbits_node(node, w, accuracy_level)
        nodes.append(new)
        added += new_inits
        dropped[node.input[1]] = w
        used.update(holders[node.name])
    _dequantize_shared(inits, dropped, nodes)
    kept = [t for t in base.graph.initializer if t.name not in dropped]
    del base.graph.node[:], base.graph.initializer[:]
    base.graph.node.extend(nodes)
    base.graph.initializer.extend(kept + added)
    if set(weights) - used:
        raise ValueError(f"no graph node holds {sorted(set(weights) - used)[0]}")
    if not used:
        raise NothingHappened("no block MatMul of the ONNX graph was replaced")
    return len(used)


def _dequantize_shared(inits: dict[str, Any], dropped: dict[str, NBitsWeight], nodes: Sequence[Any]) -> None:
    """Initializers of replaced MatMuls that `nodes` still read get their weight's dequantized
    values [K, N] and leave `dropped` (the tied embedding reads what the lm_head's codes hold)."""
    from onnx import numpy_helper

    read = {name for node in nodes for name in node.input}
    for name in [n for n in dropped if n in read]:
        inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(dequantize_nbits(dropped.pop(name)).T), name))


def _replace_floats(inits: dict[str, Any], floats: Mapping[str, np.ndarray]) -> None:
    from onnx import numpy_helper

    for name, value in floats.items():
        old = inits.get(name)
        if old is None or tuple(old.dims) != value.shape:
            raise NotSupportedYet(f"the candidate changes {name} {value.shape}, which the ONNX graph does not hold "
                                  "under that name and shape")
        old.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def content_key(base: Path, weights: dict[str, NBitsWeight], accuracy_level: int,
                floats: Mapping[str, np.ndarray] | None = None) -> str:
    """sha256 of what a candidate graph holds: the baseline graph it starts from, the packed
    weights and their layout, the accuracy level, and the float tensors it replaces."""
    h = hashlib.sha256((base / GRAPH).read_bytes())
    h.update(json.dumps({"accuracy_level": accuracy_level}).encode())
    for name in sorted(weights):
        w = weights[name]
        h.update(json.dumps([name, w.bits, w.block_size, w.k]).encode())
        for a in (w.packed, w.scales, w.zeros):
            h.update(b"-" if a is None else a.tobytes())
    for name in sorted(floats or {}):
        h.update(name.encode() + floats[name].astype(np.float32).tobytes())
    return h.hexdigest()


def graph_weights(folder: Path, model: Any, blocks: str) -> tuple[dict[str, NBitsWeight], int]:
    """A candidate graph's MatMulNBits weights per Hugging Face linear (a fused node's rows split
    back by each linear's out_features in `model`), and their accuracy level: what
    quantized_graph wrote."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(folder / GRAPH), load_external_data=True).graph
    inits = {t.name: t for t in graph.initializer}
    nodes = {n.name.removesuffix("NBits"): n for n in graph.node if n.op_type == "MatMulNBits"}
    weights, level = {}, 0
    for node_name, linears in block_weights(list(nodes), blocks).items():
        node = nodes[node_name]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        level = attrs.get("accuracy_level", 0)
        arrays = [numpy_helper.to_array(inits[name]) for name in node.input[1:]]
        n, bits, block, k = attrs["N"], attrs["bits"], attrs["block_size"], attrs["K"]
        packed, scales = arrays[0], arrays[1].reshape(n, -1)
        zeros = arrays[2].reshape(n, -1) if len(arrays) > 2 else None
        start = 0
        for name in linears:
            rows = model.get_submodule(name).out_features
            part = slice(start, start + rows)
            weights[name] = NBitsWeight(packed[part], scales[part], None if zeros is None else zeros[part], bits, block, k)
            start += rows
    return weights, level


def candidate_graph(base: Path, weights: dict[str, NBitsWeight], blocks: str, accuracy_level: int,
                    floats: Mapping[str, np.ndarray] | None = None) -> Path:
    """The baseline graph folder `base` with MatMulNBits over `weights`, cached by content hash."""
    out = base.parent / f"nbits-{content_key(base, weights, accuracy_level, floats)[:24]}"
    return _finish(lambda tmp: _write_candidate(base, weights, blocks, accuracy_level, tmp, floats), out)


def _write_candidate(base: Path, weights: dict[str, NBitsWeight], blocks: str, accuracy_level: int,
                     out: Path, floats: Mapping[str, np.ndarray] | None = None) -> None:
    import onnx

    model = onnx.load(str(base / GRAPH), load_external_data=True)
    quantized_graph(model, weights, blocks, accuracy_level, floats)
    onnx.save_model(model, str(out / GRAPH), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=1024)
    shutil.copyfile(base / GENAI_CONFIG, out / GENAI_CONFIG)


# ---------------------------------------------------------------------------------------------
# The backend: baseline and candidates as ONNX graphs, each evaluated and timed in an engine
# process of its own. torch-side work (making the candidate, recovering its codes) is imported
# on use: an engine process imports this module and must not import torch.


class OnnxRuntimeBackend(Backend):
    def _served(self, ctx: RunContext, label: str, folder: Path, scheme: str, **made: Any) -> Served:
        from quantgate.engines.process import EngineProcess

        return Served(label, graph_bytes(folder), "the ONNX graph and its data file", scheme,
                      artifact=folder / GRAPH, serves_from=folder,
                      opener=lambda: EngineProcess(self.name, label=label, log=ctx.log(label), path=str(folder)),
                      **made)

    def prepare(self, ctx: RunContext, prepared: PreparedSuite) -> tuple[PreparedSuite, list[str]]:
        notes = [f"{c.label} is not servable on onnxruntime ({why}): its quality is measured by fake "
                 "quantization on torch, its speed is not, and its gate fails"
                 for c in ctx.cfg.resolved_candidates if (why := unservable(c)) is not None]
        return prepared, notes

    def baseline(self, ctx: RunContext, label: str = "baseline") -> Served:
        return self._served(ctx, label, float_graph(ctx.baseline, ctx.log("onnx-builder")), "ONNX fp32")

    def candidate(self, ctx: RunContext, cand: MethodConfig) -> Served:
        """The candidate made as on torch (methods/apply.py), its exact codes recovered from the
        fake-quantized weights and written into MatMulNBits nodes of the baseline's graph."""
        from quantgate.engines.torch import make_with_progress

        why = unservable(cand)
        if why is not None:  # (check_config let it through: serving.unservable is "simulate")
            return self.simulated(ctx, cand, why)
        t0 = time.perf_counter()
        made, step, _ = make_with_progress(ctx, cand, later_steps=3)
        folder = candidate_folder(ctx.baseline, made.model, cand, ctx.log("onnx-builder"))
        step(1)
        return self._served(ctx, cand.label, folder, served_scheme(cand.scheme, cand.quantizer.accuracy_level),
                            modules_changed=made.modules_changed, make_seconds=time.perf_counter() - t0, step=step)

    def exported(self, ctx: RunContext, label: str, directory: Path, files: list[str],
                 scheme: Mapping[str, Any]) -> Served:
        """An exported graph folder (quantgate export --format onnx), opened as the run opened it."""
        return self._served(ctx, label, directory, served_scheme(scheme.get("scheme", ""), scheme.get("accuracy_level")))

    def stored_weights(self, artifact: Path, baseline: Any) -> dict[str, Any] | None:
        """The candidate's block linears from its graph's MatMulNBits nodes (its exact codes),
        dequantized; None when the graph is gone or its weights no longer give the folder's
        content key (the folder is named by the hash of what it holds)."""
        import torch

        folder = artifact.parent
        if not (folder / GRAPH).is_file() or not folder.name.startswith("nbits-"):
            return None
        weights, level = graph_weights(folder, baseline.model, baseline.arch.blocks)
        if content_key(folder.parent / "fp32", weights, level)[:24] != folder.name.removeprefix("nbits-"):
            return None
        return {name: torch.from_numpy(dequantize_nbits(w)) for name, w in weights.items()}

    def resumed(self, ctx: RunContext, cand: MethodConfig, meta: Mapping[str, Any]) -> Served:
        """As stored; it serves from its graph's folder (the artifact is the graph file in it)."""
        served = super().resumed(ctx, cand, meta)
        served.serves_from = served.artifact.parent if served.artifact is not None else None
        return served

    def artifact_bytes(self, served: Served) -> int | None:
        return graph_bytes(served.serves_from) if served.serves_from is not None else None

    def noise_reference(self, ctx: RunContext) -> tuple[Engine, str]:
        """PyTorch float32 over the same weights: graph conversion and kernels."""
        from quantgate.engines.torch import TorchEngine

        return TorchEngine(ctx.baseline.model), "torch float32"


def served_scheme(scheme: str, accuracy_level: int | None) -> str:
    """The scheme column of a graph: the weights' scheme and MatMulNBits' accuracy level."""
    return f"{scheme}, ORT acc{accuracy_level or 0}"  # (ACCURACY_LEVELS says what each level computes)


def candidate_folder(baseline: Baseline, model: torch.nn.Module, cand: MethodConfig, log: Path) -> Path:
    """The graph folder of a made candidate (its fake-quantized `model`): the baseline's fp32
    graph with MatMulNBits over the candidate's exact codes, cached by content hash."""
    weights = candidate_weights(model, baseline.arch, cand)
    base = float_graph(baseline, log)
    return candidate_graph(base, weights, baseline.arch.blocks, cand.quantizer.accuracy_level or 0,
                           changed_floats(baseline.model, model, set(weights)))


def changed_floats(base: torch.nn.Module, made: torch.nn.Module, coded: set[str]) -> dict[str, np.ndarray]:
    """Parameters of the made candidate, other than the weights of the `coded` linears (and
    what is tied to them: a tied embedding), that differ from the baseline's (e.g. the norms
    AWQ folds its scales into, an untied quantized embedding): HF name -> values."""
    import torch

    ref = dict(base.named_parameters())
    tied = {id(made.get_submodule(n).weight) for n in coded}
    return {name: p.detach().float().numpy() for name, p in made.named_parameters()
            if id(p) not in tied and not torch.equal(p, ref[name])}


def export_scheme(cand: MethodConfig) -> dict[str, Any]:
    """The manifest's scheme of a graph exported as evaluated: the weights' grid, the MatMulNBits
    block they are served with, and the accuracy level (what the kernels compute)."""
    q = cand.quantizer
    return {"method": q.method, "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric,
            "format": "onnx", "scheme": cand.scheme, "block_size": block_size_for(q.group_size),
            "accuracy_level": q.accuracy_level or 0, "input_activations": None}


def copy_graph(graph: Path, out: Path, tokenizer: Any) -> Path:
    """The evaluated graph folder (graph, data file, genai config) copied into `out`, with the
    baseline's tokenizer files so that onnxruntime-genai opens the folder as it is. Returns the
    copied graph file."""
    out.mkdir(parents=True, exist_ok=True)
    for f in graph.parent.iterdir():
        if f.name.startswith(GRAPH) or f.name == GENAI_CONFIG:
            shutil.copyfile(f, out / f.name)
    tokenizer.save_pretrained(out)
    return out / GRAPH


def candidate_weights(model: torch.nn.Module, arch: Any, cand: MethodConfig) -> dict[str, NBitsWeight]:
    """Every quantized linear of a made candidate (the blocks', and the lm_head with
    quantize_embeddings) as MatMulNBits weights, from its exact codes."""
    from quantgate.export.codes import NotOnGrid, recover_codes
    from quantgate.methods.apply import spec_of, targets

    spec = spec_of(cand.quantizer)
    names = [n for n in targets(model, arch, cand.quantizer)
             if arch.is_block_linear(n) or n in OUTER_LINEARS.values()]
    try:
        return {n: from_quantized(recover_codes(model.get_submodule(n).weight.detach(), spec)) for n in names}
    except NotOnGrid as e:
        raise UserError(f"candidate {cand.label}: a weight is not on its {spec} grid ({e})") from None
    except ValueError as e:
        raise NotSupportedYet(f"candidate {cand.label} on onnxruntime: {e}") from None
