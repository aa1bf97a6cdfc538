"""Shared fixtures: a tiny randomly initialised Llama and a character tokenizer for it (no
downloads, fast on CPU)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers


def _tiny_llama_config(*, tie: bool) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        tie_word_embeddings=tie,
    )


@contextlib.contextmanager
def single_thread():
    """One intra-op thread inside the block, the previous setting restored after it. The tiny
    model's matrices are so small that OpenMP start-up and spinning dominate (about 100x slower
    on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_tiny_llama(*, tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    with single_thread():
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(_tiny_llama_config(tie=tie)).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> transformers.LlamaForCausalLM:
    """2 layers, vocab 128, untied embeddings, float32, eval mode. Treat as read-only."""
    return build_tiny_llama(tie=False)


@pytest.fixture(scope="session")
def tiny_llama_tied() -> transformers.LlamaForCausalLM:
    """The same architecture with lm_head tied to the input embedding. Treat as read-only."""
    model = build_tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.fixture
def torch_single_thread():
    """Run a test with one intra-op thread (see single_thread); other tests are unaffected."""
    with single_thread():
        yield


class CharTokenizer:
    """One token per character, for the tiny Llama's 128-token vocabulary: character c is id
    3 + ord(c) % 125 (a round trip for ASCII below '}'); PAD = 0, BOS = 1, EOS = 2 (the tiny
    Llama's generation config ends at 2). Implements the methods quantgate calls on a tokenizer:
    encode, decode, get_vocab, convert_tokens_to_string."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = 2
    SPECIAL = {0: "<pad>", 1: "<s>", 2: "</s>"}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + ord(c) % 125 for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def _token(self, i: int) -> str:
        return self.SPECIAL.get(i, chr(i - 3) if i >= 3 else "")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if skip_special_tokens and i in self.SPECIAL else self._token(i) for i in ids)

    def get_vocab(self) -> dict[str, int]:
        return {self._token(i): i for i in range(128)}

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


@pytest.fixture(scope="session")
def char_tokenizer() -> CharTokenizer:
    return CharTokenizer()


def gen(seed: int) -> torch.Generator:
    """A seeded CPU random generator (tests draw every random tensor from one)."""
    return torch.Generator().manual_seed(seed)


def outlier_activations(n: int, cols: int, seed: int, channels: list[int], scale: float,
                        shift: float = 0.0) -> torch.Tensor:
    """LLM-like activations [n, cols]: standard normal, except `channels`, which are
    x * scale + shift in every row (a few large channels, as in real transformer inputs)."""
    x = torch.randn(n, cols, generator=gen(seed))
    x[:, channels] = x[:, channels] * scale + shift
    return x


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny Llama (seed 0, untied) saved as a Hugging Face directory with a character
    tokenizer: a model.base quantgate loads like any local model. Treat as read-only."""
    from test_export import char_tokenizer_files

    path = tmp_path_factory.mktemp("tiny-dir") / "tiny-llama"
    build_tiny_llama().save_pretrained(path)
    char_tokenizer_files(path)
    return path
