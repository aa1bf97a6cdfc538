"""Tests for quantgate.engines.torch: the batched, prefix-sharing engine against the plain loop."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from quantgate.engines.torch import TorchEngine, loglikelihood_reference

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = 1e-4


def _mixed_requests() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    rng = random.Random(0)

    def toks(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, 128) for _ in range(n))

    reqs = []
    # several options sharing one context, different lengths, no common prefix
    ctx_a = toks(12)
    reqs += [(ctx_a, toks(3)), (ctx_a, toks(1)), (ctx_a, toks(5)), (ctx_a, toks(2))]
    # options sharing a common prefix of tokens (3 shared, then diverging)
    ctx_b = toks(7)
    shared = toks(3)
    reqs += [(ctx_b, shared + toks(2)), (ctx_b, shared + toks(4)), (ctx_b, shared + toks(1))]
    # one option a prefix of another (and an exact duplicate)
    ctx_c = toks(20)
    long = toks(6)
    reqs += [(ctx_c, long[:2]), (ctx_c, long), (ctx_c, long[:4]), (ctx_c, long)]
    # single-token continuations only
    ctx_d = toks(4)
    reqs += [(ctx_d, (t,)) for t in (5, 77, 120, 3)]
    # a context with only one option (single and multi token)
    reqs += [(toks(9), toks(4)), (toks(2), (42,))]
    # one-token context
    reqs += [((1,), toks(3)), ((1,), toks(3))]
    # contexts of very different lengths
    ctx_long = toks(150)
    reqs += [(ctx_long, toks(3)), (ctx_long, toks(2)), (toks(60), toks(5))]
    # all options identical in their first tokens but one longer: shared prefix limited by the shortest
    ctx_e = toks(5)
    reqs += [(ctx_e, (9, 9, 9)), (ctx_e, (9, 9, 9, 9, 9)), (ctx_e, (9, 9, 8))]
    # interleave the groups: requests of one context need not be adjacent
    reqs.insert(3, (ctx_b, shared + toks(3)))
    reqs.append((ctx_a, toks(4)))
    return reqs


@pytest.fixture(scope="module")
def mixed():
    return _mixed_requests()


@pytest.fixture(scope="module")
def reference(tiny_llama, mixed):
    # module-scoped, so set up before the per-test single-thread fixture: do the same here
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ll, greedy = loglikelihood_reference(tiny_llama, mixed)
        assert ll.dtype == np.float64 and greedy.dtype == bool and ll.shape == greedy.shape == (len(mixed),)
        return ll, greedy
    finally:
        torch.set_num_threads(before)


def test_reference_is_a_plain_sum_of_log_softmax(tiny_llama):
    ctx, cont = (1, 7, 9), (11, 13)
    with torch.no_grad():
        logits = tiny_llama(torch.tensor([list(ctx + cont)])).logits[0]
    lp = torch.log_softmax(logits, -1)
    expected = lp[2, 11].item() + lp[3, 13].item()
    ll, greedy = loglikelihood_reference(tiny_llama, [(ctx, cont)])
    assert ll.shape == greedy.shape == (1,)
    assert ll[0] == pytest.approx(expected, abs=1e-5)
    # greedy: every continuation token is the row's argmax
    assert bool(greedy[0]) == (lp[2].argmax().item() == 11 and lp[3].argmax().item() == 13)
    # the model's own argmax continuation is greedy by construction; one wrong token breaks it
    first = int(lp[2].argmax())
    with torch.no_grad():
        second = int(tiny_llama(torch.tensor([list(ctx) + [first]])).logits[0, -1].argmax())
    wrong = (second + 1) % 128
    ll2, greedy2 = loglikelihood_reference(tiny_llama, [(ctx, (first, second)), (ctx, (first, wrong)), (ctx, (first,))])
    assert greedy2.tolist() == [True, False, True]
    assert ll2[1] < ll2[0] <= ll2[2] <= 0


@pytest.mark.parametrize(
    "max_batch_size,batch_tokens",
    [(16, 4096), (1, 4096), (2, 64), (3, 16), (4096, 1 << 20)],
    ids=["default", "batch1", "small", "tiny-tokens", "one-chunk"],
)
def test_loglikelihood_matches_reference(tiny_llama, mixed, reference, max_batch_size, batch_tokens):
    ref_ll, ref_greedy = reference
    engine = TorchEngine(tiny_llama, max_batch_size=max_batch_size, batch_tokens=batch_tokens)
    got, greedy = engine.loglikelihood(mixed)
    assert got.dtype == np.float64 and got.shape == (len(mixed),)
    assert greedy.dtype == bool and greedy.shape == (len(mixed),)
    assert np.max(np.abs(got - ref_ll)) < TOL
    np.testing.assert_array_equal(greedy, ref_greedy)
    # duplicate requests get identical scores; a prefix option scores higher than its extension
    assert got[9] == pytest.approx(got[11], abs=TOL)
    assert got[8] > got[10] > got[9]
    assert engine.timing.tokens["loglikelihood"] == sum(len(c) + len(x) for c, x in mixed)


@pytest.mark.parametrize("max_batch_size,batch_tokens", [(1, 4096), (2, 64)])
def test_small_batch_limits_force_many_forward_passes(
    tiny_llama, mixed, reference, max_batch_size, batch_tokens
):
    """Counted with a hook on the decoder (public API only), so the test holds for any batching
    strategy: the limits must be respected by splitting the work into many passes, and every
    pass stays within max_batch_size sequences."""
    engine = TorchEngine(tiny_llama, max_batch_size=max_batch_size, batch_tokens=batch_tokens)
    shapes = []
    def record(module, args, kwargs, output):
        ids = kwargs["input_ids"] if "input_ids" in kwargs else args[0]
        shapes.append(tuple(ids.shape))

    hook = tiny_llama.get_decoder().register_forward_hook(record, with_kwargs=True)
    try:
        got, greedy = engine.loglikelihood(mixed)
    finally:
        hook.remove()
    n_contexts = len({tuple(c) for c, _ in mixed})
    assert len(shapes) >= n_contexts // max_batch_size > 1
    assert all(rows <= max_batch_size for rows, _ in shapes)
    assert np.max(np.abs(got - reference[0])) < TOL
    np.testing.assert_array_equal(greedy, reference[1])


def test_results_follow_request_order(tiny_llama, mixed, reference):
    engine = TorchEngine(tiny_llama, max_batch_size=3, batch_tokens=128)
    perm = list(range(len(mixed)))
    random.Random(1).shuffle(perm)
    ref_ll, ref_greedy = reference
    got, greedy = engine.loglikelihood([mixed[i] for i in perm])
    assert np.max(np.abs(got - ref_ll[perm])) < TOL
    np.testing.assert_array_equal(greedy, ref_greedy[perm])
    # scores differ between requests, so a misordering would show
    assert len(set(np.round(ref_ll, 3))) > len(mixed) // 2


def test_single_request_and_list_inputs(tiny_llama):
    engine = TorchEngine(tiny_llama)
    reqs = [([5, 6, 7], [8, 9])]  # lists, not tuples
    got, greedy = engine.loglikelihood(reqs)
    ref, ref_greedy = loglikelihood_reference(tiny_llama, reqs)
    assert got.shape == greedy.shape == (1,)
    assert abs(got[0] - ref[0]) < TOL
    assert greedy.tolist() == ref_greedy.tolist()


def _greedy_requests(model) -> tuple[list, list[bool]]:
    """Requests whose continuations are the model's own greedy tokens (some), or that greedy path
    with one token changed at the start, middle or end (not greedy), sharing contexts and
    prefixes so the packed engine credits shared tokens to several options; with the truth."""
    rng = random.Random(3)
    reqs, truth = [], []
    for n_ctx in (1, 6, 23):
        ctx = tuple(rng.randrange(3, 128) for _ in range(n_ctx))
        path = _manual_greedy(model, list(ctx), 5, eos=-1)
        for k in (1, 3, 5):
            reqs.append((ctx, tuple(path[:k])))
            truth.append(True)
        for pos in (0, 2, 4):  # one wrong token breaks "greedy" wherever it is
            bad = list(path)
            bad[pos] = (bad[pos] + 1) % 128
            reqs.append((ctx, tuple(bad)))
            truth.append(False)
    return reqs, truth


@pytest.mark.parametrize("max_batch_size,batch_tokens", [(16, 4096), (1, 4096), (3, 16)])
def test_greedy_flags_match_reference_and_truth(tiny_llama, max_batch_size, batch_tokens):
    reqs, truth = _greedy_requests(tiny_llama)
    ref_ll, ref_greedy = loglikelihood_reference(tiny_llama, reqs)
    assert ref_greedy.tolist() == truth
    got, greedy = TorchEngine(tiny_llama, max_batch_size=max_batch_size, batch_tokens=batch_tokens).loglikelihood(reqs)
    assert greedy.dtype == bool and greedy.tolist() == truth
    np.testing.assert_array_equal(greedy, ref_greedy)
    assert np.max(np.abs(got - ref_ll)) < TOL


@pytest.mark.parametrize("bad", [((), (1, 2)), ((1, 2), ()), ((), ())])
def test_empty_context_or_continuation_rejected(tiny_llama, bad):
    engine = TorchEngine(tiny_llama)
    with pytest.raises(ValueError):
        engine.loglikelihood([((1, 2), (3,)), bad])


# ---------------------------------------------------------------- token_logprobs


@pytest.mark.parametrize("max_batch_size,batch_tokens", [(16, 4096), (2, 4096), (16, 40)])
def test_token_logprobs_equal_log_softmax(tiny_llama, max_batch_size, batch_tokens):
    rng = random.Random(2)
    windows = [[rng.randrange(128) for _ in range(n)] for n in (32, 5, 17, 32, 2, 64)]
    engine = TorchEngine(tiny_llama, max_batch_size=max_batch_size, batch_tokens=batch_tokens)
    rows = list(engine.token_logprobs(windows))
    assert len(rows) == len(windows)
    for w, lp in zip(windows, rows):
        assert lp.dtype == torch.float32 and lp.shape == (len(w) - 1, 128)
        with torch.no_grad():
            expected = torch.log_softmax(tiny_llama(torch.tensor([w])).logits[0, :-1].float(), -1)
        assert torch.max(torch.abs(lp - expected)).item() < 1e-5
        assert torch.allclose(lp.exp().sum(-1), torch.ones(len(w) - 1), atol=1e-5)
    assert engine.timing.tokens["token_logprobs"] == sum(len(w) for w in windows)


# ---------------------------------------------------------------- generate


def _manual_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == eos:
                break
    return out


def test_generate_is_greedy(tiny_llama):
    engine = TorchEngine(tiny_llama)
    prompts = [[1, 50, 60, 70], [1, 3], [1] + list(range(10, 40))]
    got = engine.generate(prompts, max_new_tokens=8)
    eos = tiny_llama.generation_config.eos_token_id
    assert len(got) == len(prompts)
    for prompt, new in zip(prompts, got):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            hf = tiny_llama.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8, pad_token_id=0
            )
        assert new == hf[0, len(prompt):].tolist()
        assert new == _manual_greedy(tiny_llama, prompt, 8, eos)
        assert 1 <= len(new) <= 8
