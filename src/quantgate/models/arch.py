"""Per-architecture facts as data. Adding a family is adding a row, not a code path.

A row (ArchInfo, keyed by the Hugging Face config's model_type) holds what the calibrated methods
and the GGUF writer need to know about a decoder family: which module feeds which linears (AWQ,
SmoothQuant, the Hessian groups of GPTQ / Wanda / SparseGPT), how its norms store their weight,
its fused projections, its biases, how its decoder takes attention masks for sliding-window and
full-attention layers, its rope layout in llama.cpp, and which llama.cpp architecture reads it
(tensor names come from the `gguf` package's own map, as llama.cpp's converter takes them).

A model without a row still gets a *discovered* ArchInfo (`arch_for`): its transformer blocks and
every Linear inside them, enough for round-to-nearest and magnitude pruning. Everything that needs
the facts above (calibrated methods, GGUF writing) calls `require_row` and stops with one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import torch

from quantgate.errors import UserError


@dataclass(frozen=True)
class Units:
    """Structured-pruning units inside a block: unit u owns an equal share of the output rows of
    each of `rows` and of the input columns of `cols` (the projection that reads them)."""

    rows: tuple[str, ...]
    cols: str
    # Config attributes that count widths per block; the first is the number of units, the others
    # shrink in proportion (e.g. query heads with their KV groups).
    counts: tuple[str, ...]


@dataclass(frozen=True)
class Group:
    """Linears (names inside a block) that read one and the same tensor, and the module that
    produces it: a norm (its weight scales the input) or a linear (its output rows do); None when
    nothing can absorb a scale. `part` names the feeder's rows when the feeder is a fused
    projection (ArchInfo.fused): Phi-3's down_proj reads the "up" half of gate_up_proj."""

    linears: tuple[str, ...]
    feeder: str | None = None
    part: str | None = None


@dataclass(frozen=True)
class ArchInfo:
    # Regex (full match) over module names: the Linear layers inside the transformer blocks.
    block_linears: str
    # Names of the input embedding and output head modules (tied in some models).
    embeddings: tuple[str, ...]
    # The ModuleList of transformer blocks.
    blocks: str = "model.layers"
    # Every group of linears that read one tensor, in forward order (see Group). Scales are folded
    # into the feeder only where its output width equals the linears' input width (a grouped-query
    # v_proj does not match o_proj, so that pair is skipped for such models).
    groups: tuple[Group, ...] = ()
    # A norm computes (norm_offset + weight) ⊙ x̂: Gemma stores w and applies 1 + w (every norm of
    # the model, q_norm/k_norm included). Folding s into it must give (offset + w)/s - offset, and
    # llama.cpp wants offset + w written.
    norm_offset: float = 0.0
    # llama.cpp's rope for this family: "permute" (the Llama arch's interleaved pairs; its
    # converter permutes the q/k rows of the Hugging Face layout) or "neox" (the halves layout
    # transformers uses: rows written as they are).
    rope: Literal["permute", "neox"] = "neox"
    # The decoder takes {layer kind: 4-D mask} (kinds from config.layer_types: "full_attention",
    # "sliding_attention"); False: one mask serves every layer (all sliding when the config has a
    # sliding_window, else all full).
    per_layer_masks: bool = False
    # Fused projections: name -> its parts in row order ("q", "k", "v", "gate", "up"; widths from
    # the config, see part_rows).
    fused: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Linears that carry a bias in this family (written to GGUF as <name>.bias).
    biases: tuple[str, ...] = ()
    # llama.cpp's architecture (a gguf.MODEL_ARCH member name); None: no GGUF writing.
    gguf_arch: str | None = None
    # llama.cpp's architecture runs the config's sliding window (per layer, with its own rope
    # base). False: llama.cpp attends to everything, so it equals transformers only on sequences
    # no longer than the window (measured: mistral, qwen2, qwen3 and phi3 differ past it).
    gguf_sliding_window: bool = False
    # Structured pruning: unit kind ("mlp", "heads") -> its layout (see Units).
    units: tuple[tuple[str, Units], ...] = ()
    # The row's key; None for an architecture discovered from a model that has no row.
    model_type: str | None = None

    def is_block_linear(self, name: str) -> bool:
        return re.fullmatch(self.block_linears, name) is not None

    @property
    def has_row(self) -> bool:
        return self.model_type is not None


_LLAMA_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_UNITS = (
    # one intermediate neuron: a row of gate and up, a column of down
    ("mlp", Units(_LLAMA_MLP, "mlp.down_proj", ("intermediate_size",))),
    # one KV group: a key head and a value head with the query heads that share them (their q rows
    # and o columns), so the query-per-KV ratio, and the attention code, are unchanged
    ("heads", Units(_LLAMA_ATTN, "self_attn.o_proj", ("num_key_value_heads", "num_attention_heads"))),
)


def _llama_groups(attn_norm: str, mlp_norm: str) -> tuple[Group, ...]:
    return (
        Group(_LLAMA_ATTN, attn_norm),
        Group(("self_attn.o_proj",), "self_attn.v_proj"),
        Group(_LLAMA_MLP, mlp_norm),
        Group(("mlp.down_proj",), "mlp.up_proj"),
    )


def _llama_like(model_type: str, **facts) -> ArchInfo:
    """A row of the Llama layout (separate q/k/v/o and gate/up/down projections)."""
    defaults = dict(
        block_linears=r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
        embeddings=("model.embed_tokens", "lm_head"),
        groups=_llama_groups("input_layernorm", "post_attention_layernorm"),
        units=_LLAMA_UNITS,
        model_type=model_type,
    )
    return ArchInfo(**{**defaults, **facts})


# Keyed by the Hugging Face config's model_type.
ARCHITECTURES: dict[str, ArchInfo] = {
    "llama": _llama_like("llama", rope="permute", gguf_arch="LLAMA"),
    # llama.cpp's converter reads Mistral as its Llama architecture (q/k permuted)
    "mistral": _llama_like("mistral", rope="permute", gguf_arch="LLAMA"),
    "qwen2": _llama_like("qwen2", per_layer_masks=True, biases=_LLAMA_ATTN, gguf_arch="QWEN2"),
    # q_norm / k_norm (per head, after q_proj / k_proj) change no fold: they read the projections
    "qwen3": _llama_like("qwen3", per_layer_masks=True, gguf_arch="QWEN3"),
    # attention output -> post_attention_layernorm -> residual; pre_feedforward_layernorm feeds the
    # MLP, post_feedforward_layernorm follows it; every norm stores w for (1 + w)
    "gemma3_text": _llama_like("gemma3_text", groups=_llama_groups("input_layernorm", "pre_feedforward_layernorm"),
                               norm_offset=1.0, per_layer_masks=True, gguf_arch="GEMMA3", gguf_sliding_window=True),
    # fused qkv_proj and gate_up_proj (gate rows first); down_proj reads act(gate) * up, so its
    # scales fold into the up half; structured pruning would have to split the fused rows: no units
    "phi3": ArchInfo(
        block_linears=r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)",
        embeddings=("model.embed_tokens", "lm_head"),
        groups=(Group(("self_attn.qkv_proj",), "input_layernorm"),
                Group(("self_attn.o_proj",), "self_attn.qkv_proj", part="v"),
                Group(("mlp.gate_up_proj",), "post_attention_layernorm"),
                Group(("mlp.down_proj",), "mlp.gate_up_proj", part="up")),
        fused=(("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("gate", "up"))),
        gguf_arch="PHI3", model_type="phi3",
    ),
}


def arch_of(model_type: str) -> ArchInfo:
    """The row of a model type; UserError naming the known ones when there is none."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UserError(_no_row(model_type, "")) from None


def arch_for(model: torch.nn.Module) -> ArchInfo:
    """The model's row, or an ArchInfo discovered from the model itself (has_row False): its
    blocks (the ModuleList of config.num_hidden_layers modules), every Linear inside them, and its
    input/output embeddings. Enough for round-to-nearest and magnitude pruning."""
    model_type = getattr(model.config, "model_type", "")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    n_layers = getattr(model.config, "num_hidden_layers", None)
    blocks = next((name for name, m in model.named_modules()
                   if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and name), None)
    if blocks is None:
        raise UserError(f"model type '{model_type}': no list of {n_layers} transformer blocks found "
                        f"({_no_row(model_type, '')})")
    modules = {id(m): name for name, m in model.named_modules()}
    embeddings = tuple(modules[id(e)] for e in (model.get_input_embeddings(), model.get_output_embeddings())
                       if e is not None and id(e) in modules)
    return ArchInfo(block_linears=rf"{re.escape(blocks)}\.\d+\..+", embeddings=embeddings, blocks=blocks)


def require_row(arch: ArchInfo, model_type: str, needs: str) -> None:
    """UserError (one line) when `arch` was discovered rather than read from a row."""
    if not arch.has_row:
        raise UserError(_no_row(model_type, f"{needs} needs it; "))


def _no_row(model_type: str, needs: str) -> str:
    known = ", ".join(sorted(ARCHITECTURES))
    return (f"model type '{model_type}' has no entry in quantgate.models.arch.ARCHITECTURES ({needs}"
            f"known: {known}; rtn and magnitude pruning run without one)")


def layer_kinds(config) -> list[str]:
    """Each block's attention kind, "full_attention" or "sliding_attention": config.layer_types
    where the config has it, else every layer sliding when config.sliding_window is set."""
    n = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds[:n])
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * n


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def part_rows(arch: ArchInfo, fused: str, part: str, config) -> slice:
    """Rows of `part` inside the fused projection `fused` (output rows in the row's order)."""
    d = head_dim(config)
    widths = {"q": config.num_attention_heads * d, "k": config.num_key_value_heads * d,
              "v": config.num_key_value_heads * d, "gate": config.intermediate_size, "up": config.intermediate_size}
    start = 0
    for name in dict(arch.fused)[fused]:
        if name == part:
            return slice(start, start + widths[name])
        start += widths[name]
    raise ValueError(f"{fused} has no part '{part}'")
