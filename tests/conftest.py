"""Shared fixtures: a tiny randomly initialised Llama (no downloads, fast on CPU)."""

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
