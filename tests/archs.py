"""Tiny random models of every architecture quantgate has a row for, and tokenizers that follow
each family's rule for BOS and chat templates. Made offline from a transformers config (2 layers,
a vocabulary of a few hundred tokens); norm weights and biases are randomised so that a wrong
norm offset or a dropped bias changes the outputs.

Widths: mistral's MLP is 576 wide (the awkward width of the default model); qwen3 and gemma3 have
an explicit head_dim different from hidden / heads; gemma3 alternates a sliding-window layer
(window 4) and a full-attention layer with different rope bases; mistral slides too (window 6).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers

from conftest import single_thread

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
VOCAB = 320  # the embedding's rows (the tokenizer has fewer: the rest are unused, as in real models)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.",
    "Quantization maps each weight to a small grid; calibration data shows which channels matter.",
    "Sliding-window attention looks back a fixed number of tokens; full attention sees them all.",
    "Hello world! Numbers: 0 1 2 3 4 5 6 7 8 9, and punctuation; like this? Yes: indeed.",
] * 4


@dataclass(frozen=True)
class Family:
    """A tokenizer family's rule: its special tokens, whether encode() puts BOS before a text,
    and its chat template (whether the template writes the BOS itself)."""

    bos: str | None
    eos: str
    extra: tuple[str, ...]
    adds_bos: bool
    chat_template: str


_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
           "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = {
    # Llama 3: the post-processor adds <|begin_of_text|>, and the template writes it too
    "llama": Family("<|begin_of_text|>", "<|end_of_text|>", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
                    True, "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                          "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                          "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "mistral": Family("<s>", "</s>", ("[INST]", "[/INST]"), True,
                      "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"),
    # Qwen: no BOS at all
    "qwen2": Family(None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>"), False, _CHATML),
    "qwen3": Family(None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>"), False, _CHATML),
    "gemma3_text": Family("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>"), True,
                          "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
                          "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
    # a family whose tokenizer adds no BOS although it has one
    "phi3": Family("<s>", "<|endoftext|>", ("<|user|>", "<|assistant|>", "<|end|>"), False,
                   "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
}


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(arch: str) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (trained on a few sentences, fewer than VOCAB tokens) with the
    family's special tokens, BOS rule and chat template."""
    fam = FAMILIES[arch]
    specials = [t for t in (fam.bos, fam.eos, *fam.extra) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 40, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    if fam.adds_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B", special_tokens=[(fam.bos, tok.token_to_id(fam.bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.eos,
        additional_special_tokens=list(fam.extra), chat_template=fam.chat_template)


def tiny_config(arch: str, **overrides) -> transformers.PretrainedConfig:
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  initializer_range=0.2, tie_word_embeddings=False)
    tok = tiny_tokenizer(arch)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    per_arch = {
        "llama": dict(),
        "mistral": dict(intermediate_size=576, sliding_window=6),
        "qwen2": dict(),  # q/k/v biases always
        "qwen3": dict(head_dim=32),
        "gemma3_text": dict(head_dim=32, query_pre_attn_scalar=32, num_key_value_heads=1, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                             "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
        "phi3": dict(num_key_value_heads=4, original_max_position_embeddings=256),  # v -> o folds
    }[arch]
    return transformers.AutoConfig.for_model(arch, **{**common, **ids, **per_arch, **overrides})


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 *ForCausalLM in eval mode with random weights, random norm weights (around 1, or
    around 0 for a (1 + w) norm) and random biases."""
    with single_thread():
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    centre = 0.0 if arch == "gemma3_text" else 1.0
                    p.copy_(centre + 0.3 * torch.randn(p.shape, generator=g))
                elif name.endswith(".bias"):
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model
