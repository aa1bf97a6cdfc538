"""Turn an eval suite into token-level work once, and run one engine over it.

Tokenization happens here, with the baseline's tokenizer, so the baseline and every candidate see
identical token ids. Every sequence follows the tokenizer's own rule for what goes before a text
(`text_prefix`: its BOS when it adds one, as Gemma's, Llama's and Mistral's do; nothing for Qwen's):
contexts, prompts, perplexity windows and calibration windows all start with it, and a chat
template's rendering is taken with the special tokens it writes itself (as
`apply_chat_template(tokenize=True)` does). Engines get these ids and add nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from quantgate.engines.base import Engine, Request
from quantgate.errors import BadEngineOutput, NothingHappened, UserError
from quantgate.evals.datasets import ChoiceItem, ClozeItem, EvalSuite, GenerationItem, PromptItem, TaskSpec


@dataclass(frozen=True)
class PreparedSuite:
    suite: EvalSuite
    requests: list[Request]  # every choice option and every cloze continuation, flattened
    offsets: np.ndarray  # int [n_items + 1]: item i owns requests[offsets[i]:offsets[i + 1]]
    option_chars: np.ndarray  # int [n_requests]: characters of each continuation (for acc_norm)
    prompts: dict[int, list[int]]  # item index -> prompt token ids (generation and prompt items)
    windows: list[list[int]]  # token windows for perplexity and KL divergence
    n_text_windows: int  # the first n windows are held-out text (perplexity); the rest are
    # prompt items' baseline responses (KL divergence only)
    stop_ids: tuple[int, ...]  # tokens that end a line: short-answer generation stops there

    @property
    def n_window_tokens(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def render(tokenizer, text: str, spec: TaskSpec) -> str:
    """The text as the model sees it: through the chat template as a user turn when asked."""
    if not spec.chat_template:
        return text
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("chat_template: true, but the model's tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def text_prefix(tokenizer) -> tuple[int, ...]:
    """The ids the tokenizer puts before a text when asked for its special tokens (its BOS when
    add_bos_token or its post-processor says so; empty for tokenizers that add none). An
    end-of-sequence token it may add after a text is not part of it: contexts are followed by
    their continuations."""
    probe = "Hello"
    bare = tokenizer.encode(probe, add_special_tokens=False)
    full = tokenizer.encode(probe, add_special_tokens=True)
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return tuple(full[:start])
    raise UserError(f"the tokenizer's encoding of {probe!r} with special tokens does not contain its encoding "
                    "without them: cannot tell what it adds before a text")


def start_tokens(tokenizer) -> tuple[int, ...]:
    """What an empty context is: the text prefix, or (for tokenizers that add nothing) the BOS
    token, else the EOS token, so that the first token of a text has something to condition on."""
    prefix = text_prefix(tokenizer)
    if prefix:
        return prefix
    return (tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,)


def encode_text(tokenizer, text: str, *, special: bool = True) -> list[int]:
    """Token ids of a text: the tokenizer's prefix, then the text. special=False when the text
    already holds its special tokens (a rendered chat template)."""
    prefix = list(text_prefix(tokenizer)) if special else []
    return prefix + tokenizer.encode(text, add_special_tokens=False)


def encode_pair(tokenizer, context: str, continuation: str, *, special: bool = True) -> Request:
    """Token ids of (context, continuation), split the way the whole string tokenizes: encode
    context + continuation once and cut after the context's tokens, moving trailing spaces of the
    context into the continuation first. An empty context is `start_tokens`.
    special=False when the context already holds the special tokens (a rendered chat template)."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    if not stripped:
        return start_tokens(tokenizer), tuple(tokenizer.encode(continuation, add_special_tokens=False))
    ctx = encode_text(tokenizer, stripped, special=special)
    whole = encode_text(tokenizer, stripped + continuation, special=special)
    if whole[: len(ctx)] != ctx:  # the boundary merged into one token: fall back to separate encoding
        whole = ctx + tokenizer.encode(continuation, add_special_tokens=False)
    return tuple(ctx), tuple(whole[len(ctx):])


def _options(item: ChoiceItem | ClozeItem) -> list[tuple[str, str]]:
    if isinstance(item, ChoiceItem):
        return list(zip(item.contexts, item.continuations))
    return [(item.context, item.continuation)]


def prepare(suite: EvalSuite, tokenizer, *, window_tokens: int, n_windows: int) -> PreparedSuite:
    if not suite.items:
        raise UserError(f"eval set '{suite.name}' has no items")
    requests, offsets, chars, prompts = [], [0], [], {}
    for i, item in enumerate(suite.items):
        spec = suite.spec(item.task)
        if isinstance(item, (ChoiceItem, ClozeItem)):
            for ctx, cont in _options(item):
                pair = encode_pair(tokenizer, render(tokenizer, ctx, spec), cont, special=not spec.chat_template)
                if not pair[1]:
                    raise UserError(f"eval item '{item.id}': an option's continuation is empty")
                requests.append(pair)
                chars.append(len(cont))
        else:
            text = render(tokenizer, item.prompt if isinstance(item, PromptItem) else item.context, spec)
            prompts[i] = encode_text(tokenizer, text, special=not spec.chat_template)
            if not prompts[i]:
                raise UserError(f"eval item '{item.id}': the prompt is empty")
        offsets.append(len(requests))
    windows = make_windows(tokenizer, suite.perplexity_text or "", window_tokens, n_windows)
    return PreparedSuite(
        suite=suite, requests=requests, offsets=np.array(offsets), option_chars=np.array(chars, dtype=np.int64),
        prompts=prompts, windows=windows, n_text_windows=len(windows),
        stop_ids=line_end_ids(tokenizer) if prompts else (),
    )


def with_response_windows(prepared: PreparedSuite, generations: dict[int, list[int]]) -> PreparedSuite:
    """Add, for every prompt item, the window prompt + the baseline's response, so candidates are
    compared with the baseline's distributions over the baseline's own output (KL divergence)."""
    extra = [
        prepared.prompts[i] + generations[i]
        for i, item in enumerate(prepared.suite.items)
        if isinstance(item, PromptItem) and generations.get(i) and len(prepared.prompts[i] + generations[i]) > 1
    ]
    return replace(prepared, windows=prepared.windows[: prepared.n_text_windows] + extra)


def generation_only(prepared: PreparedSuite) -> tuple[PreparedSuite, list[str]]:
    """The suite without what needs prompt log-probabilities (choice and cloze items, and the
    perplexity/KLD windows), for an engine that cannot give them; and the refused task names."""
    items = prepared.suite.items
    keep = [i for i in range(len(items)) if i in prepared.prompts]
    refused = sorted({items[i].task for i in range(len(items)) if i not in prepared.prompts})
    if not keep:
        raise UserError(f"eval set '{prepared.suite.name}': every task ({', '.join(refused)}) needs prompt "
                        "log-probabilities, and the server gives none: nothing left to run")
    suite = replace(prepared.suite, items=tuple(items[i] for i in keep))
    return replace(prepared, suite=suite, requests=[], offsets=np.zeros(len(keep) + 1, dtype=int),
                   option_chars=np.zeros(0, dtype=np.int64), prompts={n: prepared.prompts[o] for n, o in enumerate(keep)},
                   windows=[], n_text_windows=0), refused


def line_end_ids(tokenizer) -> tuple[int, ...]:
    """Ids of vocabulary tokens that contain a newline (short answers end at the line's end)."""
    vocab = tokenizer.get_vocab()
    return tuple(sorted(i for tok, i in vocab.items() if "\n" in tokenizer.convert_tokens_to_string([tok])))


def make_windows(tokenizer, text: str, window_tokens: int, n_windows: int) -> list[list[int]]:
    """The first n_windows windows of window_tokens tokens: each the tokenizer's text prefix (its
    BOS, when it adds one) followed by the next consecutive, non-overlapping run of the text."""
    return token_windows(tokenizer, tokenizer.encode(text, add_special_tokens=False), window_tokens, n_windows,
                         "evaluation", "held-out text")


def token_windows(tokenizer, ids: list[int], length: int, n: int, section: str, what: str,
                  chosen: Sequence[int] | None = None) -> list[list[int]]:
    """Windows of `length` tokens over the text's ids: the text prefix, then runs of
    length - len(prefix) ids. `chosen`: which runs (default the first n). UserError (naming
    `section` and `what`) when the text is too short."""
    prefix = list(text_prefix(tokenizer))
    step = length - len(prefix)
    if step < 1 or len(ids) // step < n:
        raise UserError(f"{section}: {n} windows of {length} tokens need {n * step + len(prefix)} tokens of "
                        f"{what}; it has {len(ids)}")
    return [prefix + ids[i * step : (i + 1) * step] for i in (chosen if chosen is not None else range(n))]


@dataclass
class ModelScores:
    """One model on one prepared suite."""

    option_ll: np.ndarray  # float64 [n_requests]: summed log-prob of each option's continuation
    option_greedy: np.ndarray  # bool [n_requests]: every continuation token was the argmax
    generations: dict[int, list[int]]  # item index -> generated token ids (generation/prompt items)
    token_nll: np.ndarray  # float64 [n_tokens of the text windows]: -log p(actual next token)
    kld: np.ndarray | None  # float64 [n_window_tokens]: KL(reference || this model) per position
    top1_agree: np.ndarray | None  # bool [n_window_tokens]: same argmax as the reference
    window_of: np.ndarray  # int [n_window_tokens]: which window each position belongs to
    seconds: float
    items_scored: int = 0  # items the engine scored in this call
    items_reused: int = 0  # items taken from the cache (a resumed run)


@dataclass(frozen=True)
class ItemOutput:
    """What an engine produced for one item: each option's summed log-prob and greedy flag
    (choice and cloze items), or the generated token ids (generation and prompt items)."""

    option_ll: tuple[float, ...] = ()
    option_greedy: tuple[bool, ...] = ()
    generation: tuple[int, ...] | None = None


@dataclass(frozen=True)
class WindowOutput:
    """Per-position results over all windows (the parts of ModelScores that windows give)."""

    token_nll: np.ndarray
    kld: np.ndarray | None
    top1_agree: np.ndarray | None
    window_of: np.ndarray


class ScoreCache(Protocol):
    """Where finished work is kept as it is done, so a killed run resumes without redoing it."""

    chunk_items: int  # items scored between two records

    def known(self) -> dict[int, ItemOutput]: ...  # item index -> output
    def record(self, outputs: dict[int, ItemOutput]) -> None: ...
    def windows(self) -> WindowOutput | None: ...
    def record_windows(self, out: WindowOutput) -> None: ...


def evaluate(
    engine: Engine | None,
    prepared: PreparedSuite,
    reference: Sequence[torch.Tensor] | None = None,
    *,
    keep: bool = False,
    on_step: Callable[[int], None] | None = None,
    cache: ScoreCache | None = None,
    model: str = "model",
) -> tuple[ModelScores, list[torch.Tensor]]:
    """Score every option, generate for every generation/prompt item, and run every window. With
    `reference` (the baseline's per-window log-probs), also per-position KL divergence and top-1
    agreement. With keep=True the model's own per-window log-probs are returned (to serve as the
    reference of later models). With a `cache`, items it knows are not scored again, new ones are
    recorded every `cache.chunk_items` items, and window results are reused unless keep=True.
    `engine` may be None only when the cache holds everything. A NaN or +inf from the engine
    raises BadEngineOutput naming `model` and the item, after the chunk's good items are recorded."""
    step = on_step or (lambda n: None)
    before = sum(engine.timing.seconds.values()) if engine else 0.0
    known = dict(cache.known()) if cache else {}
    chunks = item_chunks(prepared, known, cache)
    for chunk in chunks:
        new, bad = split_finite(score_items(_need(engine), prepared, chunk), prepared, model, engine.name)
        if cache:
            cache.record(new)  # what was computed is kept, the bad item's neighbours included
        if bad is not None:
            raise bad
        known.update(new)
    step(1)
    cached = cached_windows(cache, keep)
    windows, kept = (cached, []) if cached is not None else run_windows(_need(engine), prepared, reference, keep,
                                                                         model)
    if cache and cached is None:
        cache.record_windows(windows)
    step(1)
    seconds = (sum(engine.timing.seconds.values()) - before) if engine else 0.0
    scored = sum(map(len, chunks))
    return collect_scores(prepared, known, windows, seconds, scored, engine.name if engine else "cache"), kept


def item_chunks(prepared: PreparedSuite, known: Mapping[int, ItemOutput],
                cache: ScoreCache | None) -> list[list[int]]:
    """The items not in `known` (suite indices), in the pieces scored and recorded together:
    cache.chunk_items at a time, else all at once. Every executor scores these same pieces (an
    engine's batches, and so the low bits of its results, depend on what is scored together)."""
    todo = [i for i in range(len(prepared.suite.items)) if i not in known]
    size = cache.chunk_items if cache else max(1, len(todo))
    return [todo[start : start + size] for start in range(0, len(todo), size)]


def cached_windows(cache: ScoreCache | None, keep: bool) -> WindowOutput | None:
    """The recorded window results, unless the model's own log-probs must be kept (keep=True)."""
    return cache.windows() if cache and not keep else None


def collect_scores(prepared: PreparedSuite, known: Mapping[int, ItemOutput], windows: WindowOutput,
                   seconds: float, scored: int, engine: str) -> ModelScores:
    """A model's scores from every item's output (known: suite index -> output, all of them) and
    its window results; `scored` of the items were scored now, the rest reused."""
    n = len(prepared.suite.items)
    option_ll = np.array([x for i in range(n) for x in known[i].option_ll], dtype=np.float64)
    if len(option_ll):
        _check_not_constant(option_ll, prepared.offsets, engine)
    return ModelScores(
        option_ll=option_ll,
        option_greedy=np.array([x for i in range(n) for x in known[i].option_greedy], dtype=bool),
        generations={i: list(known[i].generation) for i in prepared.prompts},
        token_nll=windows.token_nll, kld=windows.kld, top1_agree=windows.top1_agree, window_of=windows.window_of,
        seconds=seconds, items_scored=scored, items_reused=n - scored,
    )


def split_finite(outputs: dict[int, ItemOutput], prepared: PreparedSuite, model: str,
                 engine: str) -> tuple[dict[int, ItemOutput], BadEngineOutput | None]:
    """A scored piece's outputs whose log-likelihoods are log-probabilities (finite, or -inf:
    probability zero), and the error naming the model, the engine and the first item that had a
    NaN or +inf (None: none had). Every executor records the first part before raising the second."""
    bad = [i for i, o in outputs.items() if any(math.isnan(v) or v == math.inf for v in o.option_ll)]
    if not bad:
        return outputs, None
    item = prepared.suite.items[bad[0]]
    error = BadEngineOutput(f"engine '{engine}' returned log-likelihoods {list(outputs[bad[0]].option_ll)} for model "
                            f"'{model}' on item '{item.id}' (task {item.task}): NaN or +inf is no log-probability "
                            "(items scored before it are kept in the store; --resume reuses them)")
    return {i: o for i, o in outputs.items() if i not in bad}, error


def _need(engine: Engine | None) -> Engine:
    if engine is None:
        raise ValueError("evaluate: work is left but no engine was given")
    return engine


def score_items(engine: Engine, prepared: PreparedSuite, idx: list[int]) -> dict[int, ItemOutput]:
    """Outputs of the items `idx` (indices into the suite), in one loglikelihood call and one
    generation pass."""
    off = prepared.offsets
    requests = [r for i in idx for r in prepared.requests[off[i] : off[i + 1]]]
    ll, greedy = engine.loglikelihood(requests) if requests else (np.zeros(0), np.zeros(0, dtype=bool))
    generations = _generate(engine, prepared, [i for i in idx if i in prepared.prompts])
    out, k = {}, 0
    for i in idx:
        n = off[i + 1] - off[i]
        gen = generations.get(i)
        out[i] = ItemOutput(tuple(map(float, ll[k : k + n])), tuple(map(bool, greedy[k : k + n])),
                            tuple(gen) if gen is not None else None)
        k += n
    return out


def run_windows(engine: Engine, prepared: PreparedSuite, reference: Sequence[torch.Tensor] | None,
                keep: bool, model: str = "model") -> tuple[WindowOutput, list[torch.Tensor]]:
    nll, kld, agree, window_of, kept = [], [], [], [], []
    for w, lp in enumerate(engine.token_logprobs(prepared.windows)):
        if bool(torch.isnan(lp).any() or torch.isposinf(lp).any()):
            what = (f"held-out text window {w}" if w < prepared.n_text_windows
                    else f"the response window {w - prepared.n_text_windows} of a prompt item")
            raise BadEngineOutput(f"engine '{engine.name}' returned a NaN or +inf log-probability for model "
                                  f"'{model}' on {what}: no distribution to compare (items scored so far are "
                                  "kept in the store; --resume reuses them)")
        targets = torch.tensor(prepared.windows[w][1:])
        if w < prepared.n_text_windows:
            nll.append(-lp[torch.arange(len(targets)), targets].double())
        window_of.append(np.full(len(targets), w))
        if reference is not None:  # engines that see only the top-k (servers) bring their own estimate
            kld.append(np.asarray(getattr(engine, "kl_divergence", kl_divergence)(reference[w], lp)))
            agree.append((reference[w].argmax(-1) == lp.argmax(-1)).numpy())
        if keep:
            kept.append(lp)
    out = WindowOutput(
        token_nll=torch.cat(nll).numpy() if nll else np.zeros(0),
        kld=np.concatenate(kld) if kld else None if reference is None else np.zeros(0),
        top1_agree=np.concatenate(agree) if agree else None if reference is None else np.zeros(0, dtype=bool),
        window_of=np.concatenate(window_of) if window_of else np.zeros(0, dtype=int),
    )
    return out, kept


def _generate(engine: Engine, prepared: PreparedSuite, idx: list[int]) -> dict[int, list[int]]:
    """Greedy outputs of the prompt items `idx`, grouped by (max_new_tokens, stop at line end)
    so each group is one call. Short answers (generation items) stop at the end of the line;
    prompt items run to EOS."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i in idx:
        item = prepared.suite.items[i]
        key = (prepared.suite.spec(item.task).max_new_tokens, isinstance(item, GenerationItem))
        groups.setdefault(key, []).append(i)
    out: dict[int, list[int]] = {}
    for (max_new, line), idx in groups.items():
        outputs = engine.generate([prepared.prompts[i] for i in idx], max_new, prepared.stop_ids if line else ())
        out.update(zip(idx, outputs))
    return out


def kl_rows(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(ref || model) per row of two [..., V] log-prob tensors -> [...], in their dtype,
    differentiable in lp (qat's distillation trains on it)."""
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1)


def kl_divergence(ref_lp: torch.Tensor, lp: torch.Tensor) -> np.ndarray:
    """KL(ref || model) per row of two [T, V] log-prob tensors -> float64 [T], clamped at 0
    (tiny negative values are float rounding)."""
    return kl_rows(ref_lp.double(), lp.double()).clamp(min=0.0).numpy()


def _check_not_constant(option_ll: np.ndarray, offsets: np.ndarray, engine: str) -> None:
    """An engine whose every multi-option item scores all options the same measured nothing."""
    spreads = [np.ptp(option_ll[a:b]) for a, b in zip(offsets[:-1], offsets[1:]) if b - a > 1]
    if spreads and max(spreads) == 0.0:
        raise NothingHappened(f"engine '{engine}' returned identical scores for every option of every item")
