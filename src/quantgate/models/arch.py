"""Per-architecture facts as data. Adding a family is adding a row, not a code path."""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantgate.errors import UserError


@dataclass(frozen=True)
class ArchInfo:
    # Regex (full match) over module names: the Linear layers inside the transformer blocks.
    block_linears: str
    # Names of the input embedding and output head modules (tied in some models).
    embeddings: tuple[str, ...]

    def is_block_linear(self, name: str) -> bool:
        return re.fullmatch(self.block_linears, name) is not None


_LLAMA_LIKE = ArchInfo(
    block_linears=r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)",
    embeddings=("model.embed_tokens", "lm_head"),
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
