"""Tests for quantgate.evals.tasks (prepare/evaluate/KL) and quantgate.evals.metrics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from quantgate.methods.registry import candidate
from quantgate.engines.base import Timing
from quantgate.engines.torch import TorchEngine, loglikelihood_reference
from quantgate.errors import NothingHappened
from quantgate.evals.datasets import ChoiceItem, EvalSuite
from quantgate.evals.metrics import ModelMetrics, compare, flips, model_metrics, predictions
from quantgate.evals.tasks import ModelScores, PreparedSuite, evaluate, kl_divergence, prepare
from quantgate.methods.apply import make_candidate
from quantgate.models.arch import arch_of

from conftest import CharTokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


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
    assert [item.gold for item in suite.items] == [0, 0, 0, 0, 1]
    assert suite == _suite()  # the items, golds included, as given
    assert len(prepared.requests) == 13
    # no generation / prompt items: nothing to generate, no stop tokens
    assert prepared.prompts == {} and prepared.stop_ids == ()
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
    # windows: 32 tokens each, the tokenizer's BOS (it adds one) then consecutive, non-overlapping
    # runs of the perplexity text, as the tokenizer encodes a text
    ids = tok.encode(PPL_TEXT, add_special_tokens=False)
    bos = [tok.bos_token_id]
    assert prepared.windows == [bos + ids[0:31], bos + ids[31:62], bos + ids[62:93]]
    assert prepared.windows[0] == tok.encode(PPL_TEXT)[:32]
    assert prepared.n_window_tokens == 3 * 31
    assert prepared.n_text_windows == 3


# ---------------------------------------------------------------- evaluate


def test_evaluate_against_own_reference(tiny_llama, prepared):
    engine = TorchEngine(tiny_llama, max_batch_size=4, batch_tokens=128)
    base, kept = evaluate(engine, prepared, keep=True)
    assert base.kld is None and base.top1_agree is None
    assert len(kept) == 3 and all(k.shape == (31, 128) for k in kept)
    expected_ll, expected_greedy = loglikelihood_reference(tiny_llama, prepared.requests)
    np.testing.assert_allclose(base.option_ll, expected_ll, rtol=0, atol=1e-4)
    assert base.option_greedy.dtype == bool
    np.testing.assert_array_equal(base.option_greedy, expected_greedy)
    assert base.generations == {}  # no generation / prompt items
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
    np.testing.assert_array_equal(again.option_greedy, base.option_greedy)
    np.testing.assert_array_equal(again.token_nll, base.token_nll)

    # a 2-bit candidate drifts: KL > 0 somewhere, never negative, and some metrics computed
    cand = make_candidate(tiny_llama, arch_of("llama"), candidate(bits=2, group_size=32))
    cand_scores, _ = evaluate(TorchEngine(cand.model), prepared, reference=kept)
    assert np.all(cand_scores.kld >= 0) and cand_scores.kld.max() > 1e-3
    assert not np.all(cand_scores.top1_agree)
    tok = CharTokenizer()
    mb = model_metrics(base, prepared, "accuracy", tok)
    mc = model_metrics(cand_scores, prepared, "accuracy", tok)
    cmp = compare(mb, mc, cand_scores, prepared, n_boot=200)
    assert cmp.kld_mean == pytest.approx(float(np.mean(cand_scores.kld)))
    assert cmp.kld.n == 93
    assert cmp.top1_agreement == pytest.approx(float(np.mean(cand_scores.top1_agree)))
    assert set(cmp.tasks) == {"overall", "mc", "wino", "other"}
    assert cmp.flips == flips(mb, mc) and cmp.tasks["overall"].flips == cmp.flips
    assert cmp.tasks["mc"].n == 3 and cmp.tasks["mc"].labeled
    with pytest.raises(ValueError):
        compare(mb, mb, base, prepared)  # scores without a reference


def test_model_metrics_consistent(tiny_llama, prepared):
    scores, _ = evaluate(TorchEngine(tiny_llama), prepared)
    tok = CharTokenizer()
    items = prepared.suite.items
    gold = np.array([item.gold for item in items])
    m = model_metrics(scores, prepared, "accuracy", tok)
    raw = predictions(scores, prepared, normalize=False)
    assert m.answers == [item.answer(int(c)) for item, c in zip(items, raw)]
    assert m.score.tolist() == (raw == gold).astype(float).tolist()
    assert m.correct.tolist() == (raw == gold).tolist()
    assert m.accuracy == pytest.approx(np.mean(raw == gold))
    assert m.perplexity == pytest.approx(math.exp(np.mean(scores.token_nll)))
    assert set(m.per_task) == {"mc", "wino", "other"}
    assert m.per_task["mc"] == pytest.approx(np.mean(m.correct[:3]))
    mn = model_metrics(scores, prepared, "accuracy_norm", tok)
    norm = predictions(scores, prepared, normalize=True)
    assert mn.answers == [item.answer(int(c)) for item, c in zip(items, norm)]
    assert mn.score.tolist() == (norm == gold).astype(float).tolist()
    assert mn.accuracy_norm == pytest.approx(np.mean(norm == gold))
    assert mn.accuracy == m.accuracy and m.accuracy_norm == mn.accuracy_norm  # both reported either way
    assert mn.metric("accuracy_norm") == mn.accuracy_norm


# ---------------------------------------------------------------- predictions


def _scores(option_ll) -> ModelScores:
    empty = np.zeros(0)
    ll = np.asarray(option_ll, dtype=np.float64)
    return ModelScores(ll, np.zeros(len(ll), dtype=bool), {}, empty, None, None, empty.astype(int), 0.0)


def _prepared(offsets, chars, gold) -> PreparedSuite:
    sizes = np.diff(offsets)
    items = tuple(
        ChoiceItem.multiple_choice(f"i{i}", "t", "Q", [f"o{k}" for k in range(n)], g)
        for i, (n, g) in enumerate(zip(sizes, gold))
    )
    return PreparedSuite(
        suite=EvalSuite("hand", items, None), requests=[], offsets=np.array(offsets),
        option_chars=np.array(chars), prompts={}, windows=[], n_text_windows=0, stop_ids=(),
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
    return ModelMetrics(
        score=correct.astype(float), answers=[f"option {c}" for c in chosen],
        accuracy=float(correct.mean()), accuracy_norm=float(correct.mean()), per_task={}, perplexity=1.0,
    )


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
    # restricted to a mask: items 0..3 only
    mask = np.array([True] * 4 + [False] * 3)
    part = flips(base, cand, mask)
    assert (part.correct_to_wrong, part.wrong_to_correct, part.changed, part.n) == (1, 1, 3, 4)
    assert part.rate == pytest.approx(2 / 4)


def test_flips_skip_unlabeled_items():
    gold = [0, 1, 2, 0]
    base, cand = _metrics([0, 1, 0, 1], gold), _metrics([1, 1, 2, 0], gold)
    # item 3 unlabeled (score nan): not counted even though its correctness would change
    base = ModelMetrics(np.array([1.0, 1.0, 0.0, np.nan]), base.answers, 2 / 3, 2 / 3, {}, 1.0)
    assert base.correct.tolist() == [True, True, False, False]
    f = flips(base, cand)
    assert (f.correct_to_wrong, f.wrong_to_correct, f.changed, f.n) == (1, 1, 2, 3)


# ---------------------------------------------------------------- engines that measure nothing


class ConstantEngine:
    """Same methods as an engine; every option of every item gets the same score."""

    name = "constant"

    def __init__(self):
        self.timing = Timing()

    def loglikelihood(self, requests):
        return np.full(len(requests), -3.0), np.zeros(len(requests), dtype=bool)

    def token_logprobs(self, windows):
        for w in windows:
            yield torch.full((len(w) - 1, 128), -math.log(128))

    def generate(self, prompts, max_new_tokens, stop_ids=()):
        return [[] for _ in prompts]


def test_constant_engine_raises(prepared):
    with pytest.raises(NothingHappened):
        evaluate(ConstantEngine(), prepared)


def test_one_item_with_different_scores_is_enough(prepared):
    engine = ConstantEngine()
    engine.loglikelihood = lambda requests: (np.array([-3.0] * 12 + [-4.0]), np.zeros(13, dtype=bool))
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
