"""Per-architecture facts as data. Adding a family is adding a row, not a code path."""

from __future__ import annotations

import re
from dataclasses import dataclass

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
class ArchInfo:
    # Regex (full match) over module names: the Linear layers inside the transformer blocks.
    block_linears: str
    # Names of the input embedding and output head modules (tied in some models).
    embeddings: tuple[str, ...]
    # The ModuleList of transformer blocks.
    blocks: str = "model.layers"
    # Inside a block: (the module whose output feeds them, the linears that read it). The feeder is
    # a norm (its weight scales the input) or a linear (its output rows do). Scales are folded
    # into the feeder only where its output width equals the linears' input width (a grouped-
    # query v_proj does not match o_proj, so that pair is skipped for such models).
    scaling_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # (regex over Hugging Face parameter names, GGUF tensor name with {} for the regex groups).
    gguf_names: tuple[tuple[str, str], ...] = ()
    # Structured pruning: unit kind ("mlp", "heads") -> its layout (see Units).
    units: tuple[tuple[str, Units], ...] = ()

    def is_block_linear(self, name: str) -> bool:
        return re.fullmatch(self.block_linears, name) is not None


_LLAMA_LIKE = ArchInfo(
    block_linears=r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    embeddings=("model.embed_tokens", "lm_head"),
    blocks="model.layers",
    scaling_groups=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
    gguf_names=(
        (r"model\.embed_tokens\.weight", "token_embd.weight"),
        (r"model\.norm\.weight", "output_norm.weight"),
        (r"lm_head\.weight", "output.weight"),
        (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{}.attn_norm.weight"),
        (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{}.ffn_norm.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", "blk.{}.attn_q.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", "blk.{}.attn_k.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", "blk.{}.attn_v.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{}.attn_output.weight"),
        (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{}.ffn_gate.weight"),
        (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{}.ffn_up.weight"),
        (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{}.ffn_down.weight"),
    ),
    units=(
        # one intermediate neuron: a row of gate and up, a column of down
        ("mlp", Units(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", ("intermediate_size",))),
        # one KV group: a key head and a value head with the query heads that share them (their
        # q rows and o columns), so the query-per-KV ratio, and the attention code, are unchanged
        ("heads", Units(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj",
                        ("num_key_value_heads", "num_attention_heads"))),
    ),
)

# Keyed by the Hugging Face config's model_type.
ARCHITECTURES: dict[str, ArchInfo] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
}


def arch_of(model_type: str) -> ArchInfo:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UserError(
            f"model type '{model_type}' has no entry in quantgate.models.arch.ARCHITECTURES "
            f"(known: {known})"
        ) from None
