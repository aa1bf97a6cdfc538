"""The quality gate (quantgate.gate): rules judged on intervals, verdicts, the recommendation — and
the acceptance test: a candidate whose accuracy holds while 5% of its answers flipped is stopped
by the flip budget, which a gate on accuracy alone would ship. Ends with a baseline judged
against itself through the whole evaluate() path on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantgate.config import QualityGateConfig
from quantgate.engines.torch import TorchEngine, loglikelihood_reference
from quantgate.errors import UserError
from quantgate.evals import stats
from quantgate.evals.datasets import ChoiceItem, ClozeItem, EvalSuite, GenerationItem, PromptItem, TaskSpec
from quantgate.evals.metrics import OVERALL, Comparison, Flips, TaskComparison, compare, flips, model_metrics
from quantgate.evals.scoring import normalize
from quantgate.evals.tasks import ModelScores, PreparedSuite, evaluate, prepare, with_response_windows
from quantgate.gate import CandidateVerdict, RuleKind, RuleResult, at_least, at_most, check_tasks, decide, judge

from conftest import CharTokenizer

NAN = float("nan")


# ---------------------------------------------------------------- single rules at the edges


@pytest.mark.parametrize(
    "value,interval,status",
    [
        (0.97, (0.94, 0.99), "pass"),  # lo == floor passes
        (0.96, (0.9400001, 0.98), "pass"),
        (0.92, (0.90, 0.9399999), "fail"),  # hi < floor fails
        (0.95, (0.93, 0.96), "inconclusive"),  # straddles
        (0.93, (0.92, 0.94), "inconclusive"),  # hi == floor is not below it
        (0.946, (0.946, 0.946), "fail"),  # never rounded: 0.946 is not 0.95
        (NAN, (0.95, 0.99), "fail"),  # nothing measured
        (NAN, (NAN, NAN), "fail"),
    ],
)
def test_at_least(value, interval, status):
    floor = 0.94 if value != 0.946 else 0.95
    r = at_least(RuleKind.RECOVERY, "x >= floor", value, interval, floor)
    assert r.status == status
    assert r.passed == (status == "pass")
    assert (r.rule, r.interval, r.threshold) == ("x >= floor", interval, floor)
    assert r.value == value or (math.isnan(r.value) and math.isnan(value))


@pytest.mark.parametrize(
    "value,interval,status",
    [
        (0.01, (0.005, 0.02), "pass"),  # hi == ceiling passes
        (0.01, (0.0, 0.0199), "pass"),
        (0.04, (0.0200001, 0.06), "fail"),  # lo > ceiling fails
        (0.02, (0.015, 0.03), "inconclusive"),  # straddles
        (0.03, (0.02, 0.04), "inconclusive"),  # lo == ceiling is not above it
        (NAN, (0.0, 0.01), "fail"),
    ],
)
def test_at_most(value, interval, status):
    r = at_most(RuleKind.FLIP_RATE, "y <= ceiling", value, interval, 0.02)
    assert r.status == status and r.passed == (status == "pass") and r.threshold == 0.02


def _rule(status: str) -> RuleResult:
    return RuleResult(f"rule {status}", status, 0.5, (0.4, 0.6), 0.5)


def test_inconclusive_fails_unless_configured_to_pass():
    rules = (_rule("pass"), _rule("inconclusive"))
    strict = CandidateVerdict("c", 10, rules)
    assert not strict.passed
    assert [r.status for r in strict.failed_rules] == ["inconclusive"]
    lenient = CandidateVerdict("c", 10, rules, inconclusive_passes=True)
    assert lenient.passed
    # a failed rule fails either way
    assert not CandidateVerdict("c", 10, rules + (_rule("fail"),), inconclusive_passes=True).passed
    assert CandidateVerdict("c", 10, (_rule("pass"),)).passed


# ---------------------------------------------------------------- judge on hand-made comparisons


def _task(task="overall", *, recovery=1.0, ci=(0.98, 1.02), flip=(0, 0), n=1000, flip_ci=None,
          labeled=True, base=0.7) -> TaskComparison:
    c2w, w2c = flip
    f = Flips(c2w, w2c, c2w + w2c, n)
    return TaskComparison(
        task=task, n=n, labeled=labeled, base=base, cand=base * recovery, recovery=recovery, recovery_ci=ci,
        diff=base * (recovery - 1), diff_ci=(base * (ci[0] - 1), base * (ci[1] - 1)), flips=f,
        flip_rate_ci=flip_ci or stats.wilson_interval(c2w + w2c, n), mcnemar_p=stats.mcnemar_exact(c2w, w2c),
        min_detectable_drop=0.01,
    )


def _comparison(*tasks: TaskComparison, kld=None) -> Comparison:
    by_name = {t.task: t for t in tasks}
    values = np.full(64, 0.01) if kld is None else kld
    head = by_name.get(OVERALL, tasks[0])
    return Comparison(
        recovery=head.recovery, tasks=by_name, flips=head.flips,
        kld=stats.bootstrap_mean_quantile(values, q=0.99, n_boot=200), top1_agreement=0.99,
    )


def _statuses(verdict: CandidateVerdict) -> list[str]:
    return [r.status for r in verdict.rules]


def test_judge_recovery_inconclusive_passes_only_when_configured():
    cmp = _comparison(_task(recovery=0.95, ci=(0.92, 0.97)))
    strict = judge("c", 100, cmp, QualityGateConfig(min_acceptable=0.94))
    assert _statuses(strict) == ["inconclusive"] and not strict.passed
    assert "recovery >= 0.94" in strict.rules[0].rule
    lenient = judge("c", 100, cmp, QualityGateConfig(min_acceptable=0.94, inconclusive="pass"))
    assert _statuses(lenient) == ["inconclusive"] and lenient.passed
    # a clear fail stays a fail under inconclusive: pass
    low = _comparison(_task(recovery=0.90, ci=(0.88, 0.93)))
    assert not judge("c", 100, low, QualityGateConfig(min_acceptable=0.94, inconclusive="pass")).passed


def test_judge_every_rule_kind():
    cmp = _comparison(
        _task(), _task("mc", recovery=0.99, ci=(0.97, 1.0), base=0.8),
        _task("chat", recovery=0.9, ci=(0.85, 0.94), labeled=False, base=1.0),
        kld=np.linspace(0.0, 0.2, 101),
    )
    gate = QualityGateConfig(
        min_acceptable=0.94, task_floors={"mc": 0.96, "chat": 0.95}, absolute_floors={"mc": 0.5},
        max_flip_rate=0.05, max_kld_mean=0.5, max_kld_p99=0.01,
    )
    v = judge("c", 100, cmp, gate)
    by_rule = {r.rule: r.status for r in v.rules}
    assert by_rule == {
        "accuracy recovery >= 0.94": "pass",
        "mc recovery >= 0.96": "pass",
        "chat agreement with baseline >= 0.95": "fail",
        "mc accuracy >= 0.5": "pass",
        "flip rate <= 0.05": "pass",
        "KLD mean <= 0.5": "pass",
        "KLD p99 <= 0.01": "fail",
    }
    assert not v.passed and {r.rule for r in v.failed_rules} == {"chat agreement with baseline >= 0.95",
                                                                  "KLD p99 <= 0.01"}
    with pytest.raises(UserError, match="'missing'"):
        judge("c", 100, cmp, QualityGateConfig(task_floors={"missing": 0.9}))


def test_a_candidate_no_rule_applies_to_does_not_pass():
    # unlabeled prompts only (no OVERALL), no task floor, no ceilings: nothing was checked
    cmp = _comparison(_task("chat", recovery=1.0, ci=(1.0, 1.0), labeled=False, base=1.0))
    v = judge("c", 100, cmp, QualityGateConfig())
    assert not v.passed and len(v.rules) == 1 and "some gate rule applies" in v.rules[0].rule
    floored = judge("c", 100, cmp, QualityGateConfig(task_floors={"chat": 0.9}))
    assert floored.passed and [r.rule for r in floored.rules] == ["chat agreement with baseline >= 0.9"]


def test_check_tasks_rejects_rules_on_tasks_not_in_the_eval_set():
    tasks = {"mc": 10, "qa": 5}
    check_tasks(QualityGateConfig(task_floors={"mc": 0.9}, absolute_floors={"overall": 0.3, "qa": 0.1}), tasks)
    with pytest.raises(UserError) as err:
        check_tasks(QualityGateConfig(task_floors={"mc": 0.9, "piqa": 0.95}), tasks)
    msg = str(err.value)
    assert "quality_gate.task_floors" in msg and "'piqa'" in msg and "mc, qa" in msg
    with pytest.raises(UserError, match="quality_gate.absolute_floors: task 'nope'"):
        check_tasks(QualityGateConfig(absolute_floors={"nope": 0.5}), tasks)
    with pytest.raises(UserError, match="tasks: none"):
        check_tasks(QualityGateConfig(task_floors={"mc": 0.9}), {})


# ---------------------------------------------------------------- decide


def _verdict(name: str, size: int, status: str = "pass") -> CandidateVerdict:
    return CandidateVerdict(name, size, (_rule(status),))


def test_decide_recommends_the_smallest_passing_candidate():
    verdicts = [_verdict("w8", 800), _verdict("w2", 200, "fail"), _verdict("w4", 400), _verdict("w3", 300,
                                                                                                "inconclusive")]
    d = decide(verdicts, eval_items=500, min_items=100)
    assert d.recommended == "w4"  # w2 and w3 are smaller but do not hold the gate
    assert "smallest of 2" in d.reason and d.verdicts == tuple(verdicts)
    # ties on size: by name, so the answer does not depend on the order of the list
    tie = [_verdict("b", 100), _verdict("a", 100)]
    assert decide(tie, eval_items=100, min_items=100).recommended == "a"  # == min_items is enough
    only = decide([_verdict("w8", 800), _verdict("w4", 400, "fail")], eval_items=500, min_items=100)
    assert only.recommended == "w8" and "only candidate" in only.reason
    none = decide([_verdict("w4", 400, "fail")], eval_items=500, min_items=100)
    assert none.recommended is None and "no candidate holds" in none.reason


def test_decide_recommends_nothing_on_too_few_eval_items():
    d = decide([_verdict("w8", 800)], eval_items=99, min_items=100)
    assert d.recommended is None
    assert "min_items" in d.reason and "99" in d.reason and "100" in d.reason
    zero = decide([_verdict("w8", 800)], eval_items=0, min_items=100)
    assert zero.recommended is None and "no eval items" in zero.reason and "min_items" in zero.reason


# ---------------------------------------------------------------- the acceptance test


N_ITEMS = 2000
N_OPTIONS = 4


def _choice_suite(n: int, seed: int) -> PreparedSuite:
    """n four-option items over two tasks, gold drawn at random; a suite as prepare() leaves it
    (requests themselves are not needed to score predetermined log-likelihoods)."""
    rng = np.random.default_rng(seed)
    items = tuple(
        ChoiceItem.multiple_choice(f"q{i}", "arc" if i % 2 else "piqa", f"Question {i}?",
                                   [f"option {k}" for k in range(N_OPTIONS)], int(rng.integers(N_OPTIONS)))
        for i in range(n)
    )
    return PreparedSuite(
        suite=EvalSuite("synthetic", items, None), requests=[], offsets=np.arange(0, N_OPTIONS * n + 1, N_OPTIONS),
        option_chars=np.full(N_OPTIONS * n, 9), prompts={}, windows=[], n_text_windows=0, stop_ids=(),
    )


def _scores_choosing(chosen: np.ndarray, *, kld=None, top1=None, window_of=None) -> ModelScores:
    """Scores under which the model picks option chosen[i] of item i (it scores -1, the rest -5)."""
    ll = np.full((len(chosen), N_OPTIONS), -5.0)
    ll[np.arange(len(chosen)), chosen] = -1.0
    return ModelScores(
        option_ll=ll.ravel(), option_greedy=np.zeros(ll.size, dtype=bool), generations={},
        token_nll=np.full(10, 2.0), kld=kld, top1_agree=top1,
        window_of=np.zeros(0, dtype=int) if window_of is None else window_of, seconds=0.0,
    )


def _wrong(gold: int, shift: int = 1) -> int:
    return (gold + shift) % N_OPTIONS


@pytest.fixture(scope="module")
def damaged():
    """A baseline at 0.70 accuracy, and a candidate that is the baseline with 5% of its items
    damaged, balanced: 50 correct -> wrong and 50 wrong -> correct, so its accuracy is the
    baseline's exactly. Real per-token KL arrays (small values, 8 windows) for the KLD part."""
    prepared = _choice_suite(N_ITEMS, seed=0)
    gold = np.array([item.gold for item in prepared.suite.items])
    rng = np.random.default_rng(1)
    right = np.zeros(N_ITEMS, dtype=bool)
    right[rng.choice(N_ITEMS, size=1400, replace=False)] = True
    base_choice = np.where(right, gold, [_wrong(g) for g in gold])
    cand_choice = base_choice.copy()
    c2w = rng.choice(np.flatnonzero(right), size=50, replace=False)
    w2c = rng.choice(np.flatnonzero(~right), size=50, replace=False)
    cand_choice[c2w] = [_wrong(g) for g in gold[c2w]]
    cand_choice[w2c] = gold[w2c]
    # the candidate also gives a different wrong answer on 30 wrong items (changed, not a flip)
    other = rng.choice(np.setdiff1d(np.flatnonzero(~right), w2c), size=30, replace=False)
    cand_choice[other] = [_wrong(g, 2) for g in gold[other]]

    window_of = np.repeat(np.arange(8), 255)
    kld = rng.gamma(shape=0.5, scale=0.02, size=window_of.size)  # mean 0.01, heavy-ish tail
    top1 = rng.random(window_of.size) > 0.03
    tok = CharTokenizer()
    base = model_metrics(_scores_choosing(base_choice), prepared, "accuracy", tok)
    cand_scores = _scores_choosing(cand_choice, kld=kld, top1=top1, window_of=window_of)
    cand = model_metrics(cand_scores, prepared, "accuracy", tok)
    return prepared, base, cand, cand_scores


def test_damage_on_5_percent_of_items_fails_the_flip_budget_while_recovery_passes(damaged):
    prepared, base, cand, cand_scores = damaged
    assert base.accuracy == pytest.approx(0.70) and cand.accuracy == pytest.approx(0.70)
    cmp = compare(base, cand, cand_scores, prepared, confidence=0.95, n_boot=1000, seed=0)

    overall = cmp.tasks[OVERALL]
    assert cmp.recovery == overall.recovery == pytest.approx(1.0)
    assert overall.recovery_ci[0] > 0.97  # well above the 0.94 floor: accuracy sees nothing
    assert (cmp.flips.correct_to_wrong, cmp.flips.wrong_to_correct, cmp.flips.n) == (50, 50, N_ITEMS)
    assert cmp.flips.changed == 130 and cmp.flips.rate == pytest.approx(0.05)
    assert overall.flip_rate_ci[0] > 0.02  # the whole interval is above the budget
    assert overall.mcnemar_p > 0.4  # balanced flips: no paired test on accuracy flags it either
    assert set(cmp.tasks) == {OVERALL, "piqa", "arc"}
    assert sum(cmp.tasks[t].flips.correct_to_wrong + cmp.tasks[t].flips.wrong_to_correct
               for t in ("piqa", "arc")) == 100
    assert cmp.kld.n == 8 * 255 and cmp.kld.mean == pytest.approx(float(np.mean(cand_scores.kld)))
    assert cmp.kld.mean_ci[0] <= cmp.kld.mean <= cmp.kld.mean_ci[1]

    gate = QualityGateConfig(min_acceptable=0.94, max_flip_rate=0.02)
    verdict = judge("rtn-w4", 1_000_000, cmp, gate)
    recovery_rule, flip_rule = verdict.rules
    assert "recovery >= 0.94" in recovery_rule.rule and recovery_rule.status == "pass"
    assert "flip rate <= 0.02" in flip_rule.rule and flip_rule.status == "fail"
    assert flip_rule.value == pytest.approx(0.05)
    assert not verdict.passed and verdict.failed_rules == [flip_rule]
    assert decide([verdict], eval_items=N_ITEMS, min_items=100).recommended is None

    # the same candidate under a gate on accuracy alone: it ships
    accuracy_only = judge("rtn-w4", 1_000_000, cmp, QualityGateConfig(min_acceptable=0.94))
    assert [r.status for r in accuracy_only.rules] == ["pass"] and accuracy_only.passed
    assert decide([accuracy_only], eval_items=N_ITEMS, min_items=100).recommended == "rtn-w4"


def test_one_way_damage_of_the_same_size_is_not_passed_on_recovery(damaged):
    """Contrast: 5% of items flipped all correct -> wrong is an accuracy loss (0.70 -> 0.65), and
    the recovery rule alone already refuses it."""
    prepared, base, _, cand_scores = damaged
    gold = np.array([item.gold for item in prepared.suite.items])
    chosen = np.array([base.answers[i].removeprefix("option ") for i in range(N_ITEMS)], dtype=int)
    right = np.flatnonzero(chosen == gold)
    chosen[right[:100]] = [_wrong(g) for g in gold[right[:100]]]
    scores = _scores_choosing(chosen, kld=cand_scores.kld, top1=cand_scores.top1_agree,
                              window_of=cand_scores.window_of)
    cand = model_metrics(scores, prepared, "accuracy", CharTokenizer())
    cmp = compare(base, cand, scores, prepared, n_boot=1000)
    assert cmp.recovery == pytest.approx(0.65 / 0.70)
    assert (cmp.flips.correct_to_wrong, cmp.flips.wrong_to_correct) == (100, 0)
    assert cmp.tasks[OVERALL].mcnemar_p < 1e-20
    verdict = judge("rtn-w2", 1, cmp, QualityGateConfig(min_acceptable=0.94))
    assert verdict.rules[0].status in ("fail", "inconclusive") and not verdict.passed


# ---------------------------------------------------------------- end to end on the tiny model


PPL_TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
    "Every cloud has a silver lining, and every lining has a cloud. "
) * 3


def _greedy_text(engine: TorchEngine, tok: CharTokenizer, context: str, n: int, stop: tuple = ()) -> str:
    (ids,) = engine.generate([tok.encode(context)], n, stop)
    return tok.decode(ids, skip_special_tokens=True)


@pytest.mark.usefixtures("torch_single_thread")
def test_baseline_against_itself_end_to_end(tiny_llama, char_tokenizer):
    tok = char_tokenizer
    engine = TorchEngine(tiny_llama, max_batch_size=4, batch_tokens=256)
    # Items the random model gets right, so that accuracy is not 0 and recovery is defined: a cloze
    # item whose continuation is the model's own greedy text, a generation item whose answer is.
    cloze_ctx, qa_ctx = "Once upon a time", "Question: what is it?\nAnswer:"
    cloze_cont = _greedy_text(engine, tok, cloze_ctx, 3)
    qa_answer = _greedy_text(engine, tok, qa_ctx, 12, (13,)).split("\n")[0]
    assert "\n" not in cloze_cont and normalize(qa_answer)  # scoreable as they are
    items = (
        ChoiceItem.multiple_choice("m1", "mc", "The sky is", ["blue", "green", "loud"], 0),
        ChoiceItem.multiple_choice("m2", "mc", "2 + 2 =", ["4", "5"], 0),
        ChoiceItem.winograd("w1", "mc", ["Ann left because Ann", "Ann left because Bob"], "was tired.", 0),
        ClozeItem("c1", "cloze", cloze_ctx, cloze_cont),
        ClozeItem("c2", "cloze", "The end of the", " story"),
        GenerationItem("g1", "qa", qa_ctx, ("no such answer", qa_answer)),
        GenerationItem("g2", "qa", "Question: and this?\nAnswer:", ("zzzz",)),
        PromptItem("p1", "chat", "Tell me a story."),
        PromptItem("p2", "chat", "Hello"),
    )
    specs = {"chat": TaskSpec(max_new_tokens=8), "qa": TaskSpec(max_new_tokens=12)}
    prepared = prepare(EvalSuite("mixed", items, PPL_TEXT, specs), tok, window_tokens=32, n_windows=2)
    assert sorted(prepared.prompts) == [5, 6, 7, 8] and prepared.stop_ids == (13,)  # "\n"
    assert prepared.offsets.tolist() == [0, 3, 5, 7, 8, 9, 9, 9, 9, 9]

    base_scores, reference = evaluate(engine, prepared, keep=True)
    # option_greedy: the plain loop's greedy flags, request by request
    ref_ll, ref_greedy = loglikelihood_reference(tiny_llama, prepared.requests)
    np.testing.assert_array_equal(base_scores.option_greedy, ref_greedy)
    np.testing.assert_allclose(base_scores.option_ll, ref_ll, atol=1e-4, rtol=0)
    assert ref_greedy[7] and not ref_greedy[8]  # c1 is the model's own text, c2 is not
    assert sorted(base_scores.generations) == [5, 6, 7, 8]
    assert all(1 <= len(base_scores.generations[i]) <= 8 for i in (7, 8))

    # as run.execute does: candidates are also compared on the baseline's responses to prompts
    prepared = with_response_windows(prepared, base_scores.generations)
    assert len(prepared.windows) > prepared.n_text_windows == 2
    reference += list(engine.token_logprobs(prepared.windows[len(reference):]))
    again, _ = evaluate(engine, prepared, reference)
    assert again.kld.shape == again.top1_agree.shape == (prepared.n_window_tokens,)
    assert again.generations == base_scores.generations
    np.testing.assert_array_equal(again.option_greedy, base_scores.option_greedy)

    base = model_metrics(base_scores, prepared, "accuracy", tok)
    same = model_metrics(again, prepared, "accuracy", tok)
    assert base.score[3] == 1.0 and base.score[5] == 1.0 and base.score[6] == 0.0  # c1, g1, g2
    assert np.isnan(base.score[7:]).all() and base.accuracy > 0
    assert set(base.per_task) == {"mc", "cloze", "qa"}

    cmp = compare(base, same, again, prepared, n_boot=200)
    assert set(cmp.tasks) == {OVERALL, "mc", "cloze", "qa", "chat"}
    assert cmp.recovery == 1.0 and cmp.tasks[OVERALL].recovery_ci == (1.0, 1.0)
    for name in ("mc", "cloze", "qa"):
        t = cmp.tasks[name]
        assert t.labeled and t.n == (3 if name == "mc" else 2) and t.flips.rate == 0.0
        assert t.recovery == 1.0 or (math.isnan(t.recovery) and t.base == 0.0)
    assert (cmp.flips.correct_to_wrong, cmp.flips.wrong_to_correct, cmp.flips.changed, cmp.flips.n) == (0, 0, 0, 7)
    chat = cmp.tasks["chat"]
    assert not chat.labeled and chat.n == 2 and chat.recovery == 1.0 and chat.flips.changed == 0
    assert cmp.top1_agreement == 1.0
    # The reference windows ran in other batches than these (text windows, then response windows
    # on their own), so float32 rounding leaves noise far below any real difference.
    assert cmp.kld.mean < 1e-6 and cmp.kld.quantile < 1e-6
    assert flips(base, same) == cmp.flips
    # one window per forward pass: the same shapes both times, and the KL divergence is exactly 0
    single = TorchEngine(tiny_llama, max_batch_size=1)
    own = list(single.token_logprobs(prepared.windows))
    exact, _ = evaluate(single, prepared, own)
    assert np.all(exact.kld == 0.0) and exact.top1_agree.all()
    assert compare(base, model_metrics(exact, prepared, "accuracy", tok), exact, prepared, n_boot=200).kld.mean == 0.0

    gate = QualityGateConfig(min_acceptable=0.94, task_floors={"chat": 0.3}, max_flip_rate=0.6,
                             max_kld_mean=0.01, min_items=5)
    check_tasks(gate, prepared.suite.tasks)
    verdict = judge("itself", 1, cmp, gate)
    assert [r.status for r in verdict.rules] == ["pass"] * 4 and verdict.passed
    # 2 of 2 prompts agree, but two prompts cannot show agreement >= 0.5 at 95% (Wilson lo 0.34)
    small = judge("itself", 1, cmp, gate.model_copy(update={"task_floors": {"chat": 0.5}}))
    assert small.rules[1].status == "inconclusive" and not small.passed
    assert decide([verdict], eval_items=7, min_items=gate.min_items).recommended == "itself"
    assert decide([verdict], eval_items=7, min_items=100).recommended is None
