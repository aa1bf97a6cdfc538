"""Tests for quantgate.evals.tasks (prepare/evaluate/KL) and quantgate.evals.metrics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from quantgate.config import CandidateConfig
from quantgate.engines.base import Timing
from quantgate.engines.torch import TorchEngine, loglikelihood_reference
from quantgate.errors import NothingHappened
from quantgate.evals.datasets import ChoiceItem, EvalSuite
from quantgate.evals.metrics import ModelMetrics, compare, flips, model_metrics, predictions
from quantgate.evals.tasks import ModelScores, PreparedSuite, evaluate, kl_divergence, prepare
from quantgate.methods.apply import make_candidate
from quantgate.models.arch import arch_of

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class CharTokenizer:
    """One token per character, ids in [3, 128); BOS = 1, EOS = 2."""

    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [3 + ord(c) % 125 for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids


PPL_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Every cloud has a silver lining, and every lining has a cloud. "
) * 3


def _suite() -> EvalSuite:
    items = (
        ChoiceItem.multiple_choice(
            "q1", "mc", "Question: The sky is\nAnswer:", ["blue", "green", "made of cheese"], 0
        ),
        ChoiceItem.multiple_choice("q2", "mc", "2 + 2 =", ["4", "5"], 0),
        ChoiceItem.multiple_choice("q3", "mc", "Cats say", ["meow", "woof", "moo", "quack"], 0),
        ChoiceItem.winograd(
            "w1", "wino", ["The cup fell because the cup", "The cup fell because the table"], "was fragile.", 0
        ),
        ChoiceItem.multiple_choice("q4", "other", "A trailing space ", ["x", "yy"], 1),
    )
    return EvalSuite("tiny", items, PPL_TEXT)


@pytest.fixture(scope="module")
def prepared() -> PreparedSuite:
    return prepare(_suite(), CharTokenizer(), window_tokens=32, n_windows=3)


# ---------------------------------------------------------------- KL divergence


def test_kl_of_a_distribution_with_itself_is_exactly_zero():
    lp = torch.log_softmax(torch.randn(7, 128, generator=torch.Generator().manual_seed(0)), -1)
    kld = kl_divergence(lp, lp.clone())
    assert kld.dtype == np.float64 and kld.shape == (7,)
    assert np.all(kld == 0.0)


def test_kl_matches_hand_computation():
    # KL([1/2, 1/2] || [1/4, 3/4]) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.1438410362...
    two = kl_divergence(torch.tensor([[0.5, 0.5]]).log(), torch.tensor([[0.25, 0.75]]).log())
    assert two[0] == pytest.approx(0.5 * math.log(4 / 3), abs=1e-7)
    assert two[0] == pytest.approx(0.1438410362, abs=1e-7)

    p = [0.9, 0.05, 0.05]
    q = [0.2, 0.5, 0.3]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))  # KL(p || q)
    reverse = sum(b * math.log(b / a) for a, b in zip(p, q))  # KL(q || p)
    assert abs(expected - reverse) > 0.1
    ref, other = torch.tensor([p]).log(), torch.tensor([q]).log()
    assert kl_divergence(ref, other)[0] == pytest.approx(expected, abs=1e-6)  # reference first
    # row-wise: [KL(p||q), KL(q||q)]
    both = kl_divergence(torch.cat([ref, other]), torch.cat([other, other]))
    assert both[0] == pytest.approx(expected, abs=1e-6) and both[1] == 0.0


def test_kl_is_never_negative():
    gen = torch.Generator().manual_seed(1)
    a = torch.log_softmax(torch.randn(50, 128, generator=gen), -1)
    b = torch.log_softmax(a + 1e-7 * torch.randn(50, 128, generator=gen), -1)
    assert np.all(kl_divergence(a, b) >= 0.0)


# ---------------------------------------------------------------- prepare


def test_prepare_layout(prepared):
    suite = prepared.suite
    assert prepared.offsets.tolist() == [0, 3, 5, 9, 11, 13]
    assert prepared.gold.tolist() == [0, 0, 0, 0, 1]
    assert len(prepared.requests) == 13
    # characters of each continuation (" " + choice), used by accuracy_norm
    assert prepared.option_chars.tolist()[:3] == [5, 6, 15]
    assert prepared.option_chars.tolist()[3:5] == [2, 2]
    tok = CharTokenizer()
    ctx, cont = prepared.requests[0]
    assert ctx == tuple(tok.encode(suite.items[0].contexts[0])) and ctx[0] == tok.bos_token_id
    assert cont == tuple(tok.encode(" blue", add_special_tokens=False))
    # a trailing space of the context moves into the continuation
    ctx, cont = prepared.requests[11]
    assert ctx == tuple(tok.encode("A trailing space")) and cont == tuple(tok.encode("  x", add_special_tokens=False))
    # windows: consecutive, non-overlapping, 32 tokens each, of the perplexity text without BOS
    ids = tok.encode(PPL_TEXT, add_special_tokens=False)
    assert prepared.windows == [ids[0:32], ids[32:64], ids[64:96]]
    assert prepared.n_window_tokens == 3 * 31


# ---------------------------------------------------------------- evaluate


def test_evaluate_against_own_reference(tiny_llama, prepared):
    engine = TorchEngine(tiny_llama, max_batch_size=4, batch_tokens=128)
    base, kept = evaluate(engine, prepared, keep=True)
    assert base.kld is None and base.top1_agree is None
    assert len(kept) == 3 and all(k.shape == (31, 128) for k in kept)
    expected_ll = loglikelihood_reference(tiny_llama, prepared.requests)
    np.testing.assert_allclose(base.option_ll, expected_ll, rtol=0, atol=1e-4)
    assert base.token_nll.shape == (93,) and np.all(base.token_nll > 0)
    assert base.window_of.tolist() == [0] * 31 + [1] * 31 + [2] * 31
    # token_nll is -log p of the actual next token
    w = prepared.windows[1]
    assert base.token_nll[31 + 4] == pytest.approx(-kept[1][4, w[5]].item(), abs=1e-6)

    steps = []
    again, none_kept = evaluate(engine, prepared, reference=kept, on_step=steps.append)
    assert none_kept == [] and steps == [1, 1]
    assert again.kld.shape == (93,) and np.all(again.kld == 0.0)
    assert again.top1_agree.dtype == bool and bool(np.all(again.top1_agree))
    np.testing.assert_array_equal(again.option_ll, base.option_ll)
    np.testing.assert_array_equal(again.token_nll, base.token_nll)

    # a 2-bit candidate drifts: KL > 0 somewhere, never negative, and some metrics computed
    cand = make_candidate(tiny_llama, arch_of("llama"), CandidateConfig(bits=2, group_size=32))
    cand_scores, _ = evaluate(TorchEngine(cand.model), prepared, reference=kept)
    assert np.all(cand_scores.kld >= 0) and cand_scores.kld.max() > 1e-3
    assert not np.all(cand_scores.top1_agree)
    mb = model_metrics(base, prepared, "accuracy")
    mc = model_metrics(cand_scores, prepared, "accuracy")
    cmp = compare(mb, mc, cand_scores, "accuracy")
    assert cmp.kld_mean == pytest.approx(float(np.mean(cand_scores.kld)))
    assert cmp.top1_agreement == pytest.approx(float(np.mean(cand_scores.top1_agree)))
    with pytest.raises(ValueError):
        compare(mb, mb, base, "accuracy")  # scores without a reference


def test_model_metrics_consistent(tiny_llama, prepared):
    scores, _ = evaluate(TorchEngine(tiny_llama), prepared)
    m = model_metrics(scores, prepared, "accuracy")
    raw = predictions(scores, prepared, normalize=False)
    assert m.chosen.tolist() == raw.tolist()
    assert m.accuracy == pytest.approx(np.mean(raw == prepared.gold))
    assert m.perplexity == pytest.approx(math.exp(np.mean(scores.token_nll)))
    assert set(m.per_task) == {"mc", "wino", "other"}
    assert m.per_task["mc"] == pytest.approx(np.mean(m.correct[:3]))
    mn = model_metrics(scores, prepared, "accuracy_norm")
    assert mn.chosen.tolist() == predictions(scores, prepared, normalize=True).tolist()
    assert mn.metric("accuracy_norm") == mn.accuracy_norm


# ---------------------------------------------------------------- predictions


def _scores(option_ll) -> ModelScores:
    empty = np.zeros(0)
    return ModelScores(np.asarray(option_ll, dtype=np.float64), empty, None, None, empty.astype(int), 0.0)


def _prepared(offsets, chars, gold) -> PreparedSuite:
    return PreparedSuite(
        suite=EvalSuite("hand", (), None), requests=[], offsets=np.array(offsets),
        option_chars=np.array(chars), gold=np.array(gold), windows=[],
    )


def test_predictions_normalize_by_continuation_characters():
    # item 0: raw -10 vs -12 -> option 0; per character -10/2 = -5 vs -12/6 = -2 -> option 1
    # item 1: three options, raw picks 2; per character: -3/3 = -1, -8/2 = -4, -2/1 = -2 -> 0
    # item 2: tie -> lowest index under both
    prep = _prepared([0, 2, 5, 7], [2, 6, 3, 2, 1, 4, 4], [1, 0, 0])
    scores = _scores([-10.0, -12.0, -3.0, -8.0, -2.0, -5.0, -5.0])
    assert predictions(scores, prep, normalize=False).tolist() == [0, 2, 0]
    assert predictions(scores, prep, normalize=True).tolist() == [1, 0, 0]


# ---------------------------------------------------------------- flips


def _metrics(chosen, gold) -> ModelMetrics:
    chosen = np.array(chosen)
    correct = chosen == np.array(gold)
    return ModelMetrics(float(correct.mean()), float(correct.mean()), {}, 1.0, correct, chosen)


def test_flips_counts_each_direction_and_changes():
    gold = [0, 1, 2, 0, 1, 2, 3]
    base = _metrics([0, 1, 0, 1, 1, 2, 0], gold)  # correct: T T F F T T F
    cand = _metrics([1, 1, 2, 2, 1, 0, 0], gold)  # correct: F T T F T F F
    f = flips(base, cand)
    assert f.correct_to_wrong == 2  # items 0 and 5
    assert f.wrong_to_correct == 1  # item 2
    assert f.changed == 4  # items 0, 2, 5 and item 3 (wrong -> another wrong answer)
    assert f.n == 7
    assert f.rate == pytest.approx(3 / 7)
    same = flips(base, base)
    assert (same.correct_to_wrong, same.wrong_to_correct, same.changed, same.rate) == (0, 0, 0, 0.0)
    back = flips(cand, base)
    assert (back.correct_to_wrong, back.wrong_to_correct, back.changed) == (1, 2, 4)


# ---------------------------------------------------------------- engines that measure nothing


class ConstantEngine:
    """Same methods as an engine; every option of every item gets the same score."""

    name = "constant"

    def __init__(self):
        self.timing = Timing()

    def loglikelihood(self, requests):
        return np.full(len(requests), -3.0)

    def token_logprobs(self, windows):
        for w in windows:
            yield torch.full((len(w) - 1, 128), -math.log(128))

    def generate(self, prompts, max_new_tokens):
        return [[] for _ in prompts]


def test_constant_engine_raises(prepared):
    with pytest.raises(NothingHappened):
        evaluate(ConstantEngine(), prepared)


def test_one_item_with_different_scores_is_enough(prepared):
    engine = ConstantEngine()
    engine.loglikelihood = lambda requests: np.array([-3.0] * 12 + [-4.0])
    scores, _ = evaluate(engine, prepared)
    assert scores.option_ll[-1] == -4.0


def test_zeroed_lm_head_with_equal_length_options_raises(tiny_llama):
    model = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    items = (
        ChoiceItem.multiple_choice("a", "t", "Pick one:", ["cat", "dog", "emu"], 0),
        ChoiceItem.winograd("b", "t", ["Ann", "Bob"], "left.", 1),
    )
    prep = prepare(EvalSuite("flat", items, PPL_TEXT), CharTokenizer(), window_tokens=16, n_windows=2)
    with pytest.raises(NothingHappened):
        evaluate(TorchEngine(model), prep)
    # the untouched model does separate the options
    scores, _ = evaluate(TorchEngine(tiny_llama), prep)
    assert np.ptp(scores.option_ll[:3]) > 0
