"""Engine for an OpenAI-compatible server (vLLM, llama-cpp-python's server, ...) over HTTP.

Everything goes through the legacy completions endpoint, whose prompt may be token ids:
  * scoring: `echo: true, max_tokens: 1, logprobs: k, temperature: 0` on context + continuation;
    the echoed prompt entries give log P(token p | tokens < p) per position. max_tokens is 1, not
    0: llama-cpp-python reads 0 as "until the context is full".
  * generation: the rendered prompt's ids, temperature 0.
Servers that take only text (llama-cpp-python 0.3's server rejects id lists) get the ids decoded
with the baseline's tokenizer; every answer is then checked to be about the same tokens.

Layout of an echoed answer (OpenAI's): one entry per prompt token (the first has no value), then
one per generated token. A server may omit the first prompt entry (llama-cpp-python does for a
prompt that starts with BOS); any other count is refused. Two silent failures are detected, once
by a probe and again on every answer:
  * no prompt entries at all (echo ignored): multiple-choice scores would sit exactly at chance;
  * entries shifted by one position (llama-cpp-python 0.3 for prompts not starting with BOS: each
    value is read from the distribution *after* its token, and the generated entry is dropped).
    At temperature 0 the generated token is the argmax, so its value must be the largest of its
    top-k; the probe also checks that the distribution reported at the prompt's last position is
    the one the server generates from when the prompt stops just before it.
A server failing these reports `supports_prompt_logprobs = False` (with `prompt_logprobs_problem`
saying why); loglikelihood and token_logprobs then raise UserError and generation still works.

token_logprobs rows come from top-k entries (see quantgate.engines.topk for the fill scheme and
the bias of the KL divergence estimate); `logprobs_topk` reports k.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import torch

from quantgate.economics import LoadSample, RoundSample
from quantgate.engines import http
from quantgate.engines.base import Engine, Request, Timing, stop_after
from quantgate.engines.registry import Backend, RunContext, Served, ready
from quantgate.engines.topk import coarsen, fill_row, kld_topk, tail_mask
from quantgate.errors import UserError
from quantgate.evals.tasks import text_prefix

if TYPE_CHECKING:
    from quantgate.economics import Opener
    from quantgate.evals.tasks import PreparedSuite
    from quantgate.methods.registry import MethodConfig

PROBE_TEXT = "The capital of France is Paris. The capital of Italy is"
# Parameters outside OpenAI's set, tried first and dropped if refused: vLLM keys tokens as
# "token_id:N"; llama-cpp-python applies a 1.1 repetition penalty unless told otherwise.
EXTRAS = {"return_tokens_as_token_ids": True, "repeat_penalty": 1.0}
GREEDY_TOL = 1e-3  # nats: the greedy token's value may sit this far below the largest reported
PROBE_TOL = 0.05  # nats: one distribution reported twice (prompt side, generation side)
DEFAULT_POLICY = http.RetryPolicy()


class Misaligned(ValueError):
    """An echoed answer whose entries cannot be mapped onto the prompt's positions."""


class NoPromptLogprobs(Misaligned):
    """An answer with no log-probabilities for the prompt's tokens."""


@dataclass(frozen=True)
class Echo:
    """One echoed answer mapped onto the n prompt positions (n = tokens sent)."""

    values: list[float | None]  # [n] log P(ids[p] | ids[:p]); None where the server gave none
    tops: list[dict[str, float] | None]  # [n] top-k at p, keyed as the server names tokens
    keys: list[str | None]  # [n] the server's name of the token at p
    generated: tuple[str, float | None, dict[str, float] | None] | None  # first generated entry


def parse_echo(body: dict[str, Any], n: int) -> Echo:
    """Map an echoed completion (OpenAI layout, see the module docstring) onto n prompt
    positions; Misaligned / NoPromptLogprobs when that cannot be done faithfully."""
    choice = first_choice(body)
    lp = logprobs_of(choice)
    keys = lp.get("tokens") or []
    values = lp.get("token_logprobs") or [None] * len(keys)
    tops = lp.get("top_logprobs") or [None] * len(keys)
    usage = body.get("usage") or {}
    if not isinstance(usage, dict) or not all(isinstance(usage.get(k, 0), int) for k in ("prompt_tokens",
                                                                                        "completion_tokens")):
        raise Misaligned(f"the answer's usage is not token counts: {str(usage)[:80]}")
    if usage.get("prompt_tokens", n) != n:
        raise Misaligned(f"the server counted {usage['prompt_tokens']} prompt tokens where {n} were sent")
    n_generated = usage.get("completion_tokens", 1)
    m = len(keys) - n_generated
    if m <= 0 or all(v is None for v in values[:m]):
        raise NoPromptLogprobs("the answer has no log-probabilities for the prompt's tokens (echo or logprobs ignored)")
    if m not in (n, n - 1) or len(values) != len(keys) or len(tops) != len(keys):
        raise Misaligned(f"{m} prompt entries for {n} prompt tokens")
    pad = [None] * (n - m)
    generated = (keys[m], values[m], tops[m]) if len(keys) > m else None
    _check_greedy(generated)
    return Echo(pad + list(values[:m]), pad + list(tops[:m]), pad + list(keys[:m]), generated)


def _check_greedy(generated: tuple[str, float | None, dict[str, float] | None] | None) -> None:
    """At temperature 0 the generated token is the argmax: its value is the largest reported."""
    if generated is None or generated[1] is None or not generated[2]:
        return
    key, value, top = generated
    if value < max(top.values()) - GREEDY_TOL:
        best = max(top, key=top.get)
        raise Misaligned(f"the entry after the prompt ({key!r}, {value:.3f}) is not the greedy token "
                         f"({best!r}, {top[best]:.3f}): the entries are shifted by one position")


def logprobs_of(choice: dict[str, Any]) -> dict[str, Any]:
    """A choice's "logprobs", checked to be OpenAI's shape (tokens: names, token_logprobs: numbers
    or null, top_logprobs: objects of numbers or null); Misaligned naming what is not. NaN and
    inf pass here: they are numbers, and the evaluation refuses them naming the item."""
    lp = choice.get("logprobs") or {}
    if not isinstance(lp, dict):
        raise Misaligned(f"the answer's logprobs is {type(lp).__name__} {str(lp)[:40]!r}, not an object")
    shapes = {"tokens": lambda v: v is None or isinstance(v, str),
              "token_logprobs": lambda v: v is None or _number(v),
              "top_logprobs": lambda v: v is None or isinstance(v, dict) and all(map(_number, v.values()))}
    for key, ok in shapes.items():
        entries = lp.get(key)
        if entries is not None and (not isinstance(entries, list) or not all(map(ok, entries))):
            raise Misaligned(f"the answer's logprobs.{key} is not a list of the values OpenAI's layout has: "
                             f"{str(entries)[:60]!r}")
    return lp


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def first_choice(body: dict[str, Any]) -> dict[str, Any]:
    choices = body.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Misaligned("the answer has no choices")
    return choices[0]


def same_distribution(a: dict[str, float], b: dict[str, float]) -> bool:
    """Two top-k reports of one distribution: the same top token and every common value within
    PROBE_TOL."""
    common = a.keys() & b.keys()
    return (max(a, key=a.get) == max(b, key=b.get)
            and all(abs(a[k] - b[k]) <= PROBE_TOL for k in common))


@dataclass(frozen=True)
class _Form:
    """How prompts are sent: token ids or decoded text, with or without EXTRAS."""

    text: bool
    extras: bool

    @property
    def words(self) -> str:
        extras = f"{'with' if self.extras else 'without'} {', '.join(EXTRAS)}"
        return f"{'text' if self.text else 'token id'} prompts {extras}"


class OpenAIEngine:
    name = "openai"

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str | None = None,
        *,
        api_key: str | None = None,
        tokenizer=None,
        probe_ids: Sequence[int] | None = None,
        vocab_size: int | None = None,
        top_k: int = 20,
        max_concurrency: int = 16,
        policy: http.RetryPolicy = DEFAULT_POLICY,
    ):
        """base_url: the API root (".../v1"), or several: replicas of one model, over which
        requests are spread with at most max_concurrency in flight on each (every replica is
        probed; requests_served counts each one's answers). model: the served name (None: the
        only one listed). tokenizer (the baseline's): needed for text-only servers, to name top-k
        tokens a server gives as text, for the probe prompt unless probe_ids is given, and for the
        end-of-sequence id. vocab_size: width of token_logprobs rows (default: the tokenizer's
        length)."""
        if tokenizer is None and probe_ids is None:
            raise UserError("the openai engine needs the baseline's tokenizer or probe_ids")
        urls = (base_url,) if isinstance(base_url, str) else tuple(base_url)
        if not urls:
            raise UserError("the openai engine needs at least one base_url")
        self.urls = tuple(u.rstrip("/") for u in urls)
        # the engine in messages that no one replica's answer caused
        self.url = self.urls[0] if len(urls) == 1 else f"{self.urls[0]} (+{len(urls) - 1} replicas)"
        self.requests_served = [0] * len(urls)  # answers from each replica
        self.model = model
        self.tokenizer = tokenizer
        self.probe_ids = list(probe_ids) if probe_ids is not None else tokenizer.encode(PROBE_TEXT)
        if len(self.probe_ids) < 3:
            raise UserError("the openai engine's probe prompt needs at least 3 tokens")
        self.vocab_size = vocab_size if vocab_size is not None else (len(tokenizer) if tokenizer else None)
        self.eos_id = getattr(tokenizer, "eos_token_id", None)
        self.logprobs_topk = top_k
        self.max_concurrency = max_concurrency
        self.policy = policy
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timing = Timing()
        self._form: _Form | None = None
        self._problem: str | None = None
        self._ids_by_text: dict[str, int] | None = None
        self._prefix: list[int] | None = None  # the tokenizer's text prefix (prompt_text)

    @staticmethod
    def kl_divergence(reference: torch.Tensor, rows: torch.Tensor) -> np.ndarray:
        """Per-position KL(reference || this server) from top-k rows (engines/topk.py): a lower
        bound of the exact value, short by the reference's mass outside this server's top k."""
        return kld_topk(reference, rows).numpy()

    @classmethod
    def from_config(cls, serving, tokenizer, vocab_size: int | None = None) -> OpenAIEngine:
        """From a ServingConfig (engine openai); the API key is read from serving.api_key_env."""
        key = None
        if serving.api_key_env:
            key = os.environ.get(serving.api_key_env)
            if not key:
                raise UserError(f"serving.api_key_env: environment variable {serving.api_key_env} is not set")
        policy = http.RetryPolicy(timeout_s=serving.timeout_s, max_retries=serving.max_retries)
        return cls(serving.base_url, serving.model, api_key=key, tokenizer=tokenizer, vocab_size=vocab_size,
                   top_k=serving.top_logprobs, max_concurrency=serving.max_concurrency, policy=policy)

    # -----------------------------------------------------------------------------------------
    # Set-up: the model's name, the prompt form the server takes, the prompt-logprob probe.

    @property
    def supports_prompt_logprobs(self) -> bool:
        self._ready()
        return self._problem is None

    @property
    def prompt_logprobs_problem(self) -> str | None:
        """Why the server's prompt log-probabilities cannot be used; None when they can."""
        self._ready()
        return self._problem

    def _ready(self) -> None:
        if self._form is None:
            self.run(self._setup)

    async def _setup(self, client: httpx.AsyncClient) -> None:
        """Every replica checked: it serves the model, takes the same prompt form as the first,
        and its prompt log-probabilities line up (the first problem found is the engine's)."""
        forms, problems = [], []
        for url in self.urls:
            await self._resolve_model(client, url)
            form, first = await self._choose_form(client, url)
            if forms and form != forms[0]:
                raise UserError(f"{url}: takes {form.words}, {self.urls[0]} {forms[0].words}: replicas of one model "
                                "must run the same server")
            forms.append(form)
            problems.append(await self._probe(client, first, url, form))
        self._problem = next((p for p in problems if p is not None), None)
        self._form = forms[0]

    async def _resolve_model(self, client: httpx.AsyncClient, url: str) -> None:
        body = await http.get_json(client, f"{url}/models", self.policy)
        served = [m.get("id") for m in body.get("data") or () if isinstance(m, dict)]
        if self.model is None:
            if len(served) != 1:
                raise UserError(f"{url}: serving.model is needed: the server lists {served or 'no models'}")
            self.model = served[0]
        elif served and self.model not in served:
            raise UserError(f"{url}: serving.model '{self.model}' is not served; it lists {served}")

    async def _choose_form(self, client: httpx.AsyncClient, url: str) -> tuple[_Form, dict[str, Any]]:
        """The first prompt form the server accepts (ids before text, extras before none), with
        its answer to the probe's echo request. A 5xx counts as a refusal here, not retried
        (llama-cpp-python answers an id list with 500); 429s and timeouts are still retried."""
        forms = [_Form(False, True), _Form(False, False)]
        if self.tokenizer is not None:
            forms += [_Form(True, True), _Form(True, False)]
        refusing_5xx = dataclasses.replace(self.policy, retry_5xx=False)
        refusals = []
        for form in forms:
            payload = self._payload(self.probe_ids, form, echo=True, max_tokens=1, logprobs=self.logprobs_topk)
            try:
                return form, await http.post_json(client, f"{url}/completions", payload, refusing_5xx)
            except http.ServerRejected as e:
                refusals.append(f"{'text' if form.text else 'token ids'}: {e}")
        hint = "" if self.tokenizer is not None else " (text prompts need the tokenizer)"
        raise UserError(f"{url}: no prompt form accepted{hint}: " + " | ".join(refusals))

    async def _probe(self, client: httpx.AsyncClient, answer: dict[str, Any], url: str, form: _Form) -> str | None:
        """None when prompt log-probabilities line up with the prompt, else why not."""
        ids = self.probe_ids
        try:
            echo = self._echo(answer, ids, url)
        except UserError as e:
            return str(e)
        body = await self._post(client, self._score_payload(ids[:-1], self.logprobs_topk, form), url)
        try:
            shorter = self._echo(body, ids[:-1], url)
        except UserError as e:
            return str(e)
        prompt_side, generation_side = echo.tops[-1], shorter.generated and shorter.generated[2]
        if not prompt_side or not generation_side:
            return f"{url}: the server reports no top log-probabilities (logprobs={self.logprobs_topk})"
        if not same_distribution(prompt_side, generation_side):
            return (f"{url}: the distribution the server reports at the prompt's last position is not the "
                    "one it generates from there: its prompt log-probabilities are misplaced")
        return None

    def _echo(self, body: dict[str, Any], ids: Sequence[int], url: str) -> Echo:
        """parse_echo with the answering server's URL in errors, and the token names checked
        against ids."""
        try:
            echo = parse_echo(body, len(ids))
        except NoPromptLogprobs as e:
            raise UserError(f"{url}: {e}: multiple-choice scores would sit exactly at chance") from None
        except Misaligned as e:
            raise UserError(f"{url}: prompt log-probabilities do not line up with the prompt: {e}") from None
        bad = next((p for p, key in enumerate(echo.keys) if not self._names(key, ids[p])), None)
        if bad is not None:
            raise UserError(f"{url}: the server's token at prompt position {bad} is {echo.keys[bad]!r}, "
                            f"not token id {ids[bad]}: it tokenized the prompt differently")
        return echo

    def _names(self, key: str | None, token: int) -> bool:
        """Whether the server's name of a token can be `token` (unknowable names pass)."""
        if key is None:
            return True
        if key.startswith("token_id:"):
            return key == f"token_id:{token}"
        if self.tokenizer is None or not key or key.startswith("bytes:"):
            return True
        text = self.tokenizer.decode([token])
        return "\ufffd" in text or key == text

    # -----------------------------------------------------------------------------------------
    # Requests.

    def prompt_text(self, ids: Sequence[int]) -> str:
        """Token ids as the text a server tokenizes with the model's own rule: the tokenizer's
        text prefix (its BOS) is left out when the ids start with it, as the server adds it
        itself (sent as text too, it would be doubled). The echo checks refuse a server whose
        tokens then differ from `ids`."""
        ids = list(ids)
        if self._prefix is None:
            self._prefix = list(text_prefix(self.tokenizer))
        prefix = self._prefix
        if prefix and ids[: len(prefix)] == prefix:
            ids = ids[len(prefix):]
        return self.tokenizer.decode(ids)

    def _payload(self, ids: Sequence[int], form: _Form, **fields: Any) -> dict[str, Any]:
        prompt: Any = self.prompt_text(ids) if form.text else list(ids)
        extras = EXTRAS if form.extras else {}
        return {"model": self.model, "prompt": prompt, "temperature": 0, **extras, **fields}

    def _score_payload(self, ids: Sequence[int], logprobs: int, form: _Form | None = None) -> dict[str, Any]:
        return self._payload(ids, form or self._form, echo=True, max_tokens=1, logprobs=logprobs)

    async def _post(self, client: httpx.AsyncClient, payload: dict[str, Any], url: str) -> dict[str, Any]:
        return await http.post_json(client, f"{url}/completions", payload, self.policy)

    @property
    def in_flight(self) -> int:
        """Requests in flight at most, over every replica."""
        return self.max_concurrency * len(self.urls)

    def run(self, work: Callable[[httpx.AsyncClient], Awaitable[Any]]) -> Any:
        """work(client) on a fresh event loop, with a client carrying this engine's headers."""

        async def main() -> Any:
            async with http.client(self.headers, self.in_flight) as client:
                return await work(client)

        return asyncio.run(main())

    def _complete_many(self, payloads: list[dict[str, Any]]) -> list[tuple[dict[str, Any], str]]:
        """(answer, the replica's url) for each payload, in order; spread over the replicas with
        at most max_concurrency requests in flight on each."""

        async def work(client: httpx.AsyncClient) -> list[tuple[dict[str, Any], str]]:
            calls = [lambda url, p=p: self._post(client, p, url) for p in payloads]
            bodies, served_by = await http.spread(calls, self.urls, self.max_concurrency)
            for u in served_by:
                self.requests_served[u] += 1
            return [(body, self.urls[u]) for body, u in zip(bodies, served_by)]

        return self.run(work)

    def _scored(self, seqs: Sequence[Sequence[int]], logprobs: int) -> list[Echo]:
        if not self.supports_prompt_logprobs:
            raise UserError(f"scoring tasks refused: {self._problem}; only generation tasks can run on this server")
        answers = self._complete_many([self._score_payload(s, logprobs) for s in seqs])
        return [self._echo(body, s, url) for (body, url), s in zip(answers, seqs)]

    # -----------------------------------------------------------------------------------------
    # The Engine interface.

    def loglikelihood(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
        seqs = [list(ctx) + list(cont) for ctx, cont in requests]
        with self.timing.timed("loglikelihood", sum(map(len, seqs))):
            echoes = self._scored(seqs, 1)
        out = np.zeros(len(requests), dtype=np.float64)
        greedy = np.ones(len(requests), dtype=bool)
        for i, ((ctx, _), echo) in enumerate(zip(requests, echoes)):
            values, tops = echo.values[len(ctx):], echo.tops[len(ctx):]
            if any(v is None for v in values) or any(not t for t in tops):
                raise UserError(f"{self.url}: request {i}: no log-probability for some continuation token")
            out[i] = math.fsum(values)
            greedy[i] = all(v >= max(t.values()) - GREEDY_TOL for v, t in zip(values, tops))
        return out, greedy

    def token_logprobs(self, windows: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """Rows from the top-k entries plus the actual next token's exact value (so perplexity is
        exact); the rest of each row filled by quantgate.engines.topk.fill_row."""
        if self.vocab_size is None:
            raise UserError("the openai engine needs vocab_size (or the tokenizer) for token_logprobs")
        step = self.in_flight
        for start in range(0, len(windows), step):
            chunk = windows[start : start + step]
            with self.timing.timed("token_logprobs", sum(map(len, chunk))):
                echoes = self._scored(chunk, self.logprobs_topk)
            for w, echo in zip(chunk, echoes):
                yield torch.stack([self._row(echo, w, p) for p in range(1, len(w))])

    def _row(self, echo: Echo, window: Sequence[int], p: int) -> torch.Tensor:
        """Row p-1 of a window (predicts window[p]) as float32 [vocab]."""
        if echo.values[p] is None or not echo.tops[p]:
            raise UserError(f"{self.url}: no log-probabilities at window position {p}")
        known = {i: v for key, v in echo.tops[p].items() if (i := self._token_id(key)) is not None}
        known[window[p]] = echo.values[p]
        return fill_row(known, self.vocab_size)

    def _token_id(self, key: str) -> int | None:
        """The id a server's token name stands for; None when the name is ambiguous (its mass
        then joins the filled tail)."""
        if key.startswith("token_id:"):
            return int(key[len("token_id:"):])
        if self.tokenizer is None:
            raise UserError(f"{self.url}: the server names top-k tokens by text; the tokenizer is needed to map them")
        if self._ids_by_text is None:
            n = min(self.vocab_size, len(self.tokenizer.get_vocab()))
            texts = [self.tokenizer.decode([i]) for i in range(n)]
            counts: dict[str, int] = {}
            for t in texts:
                counts[t] = counts.get(t, 0) + 1
            self._ids_by_text = {t: i for i, t in enumerate(texts) if counts[t] == 1}
        return self._ids_by_text.get(key)

    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[list[int]]:
        """Greedy continuations; stop tokens are applied here (stop_after), so the server
        generates up to max_new_tokens."""
        self._ready()
        payloads = [self._payload(p, self._form, max_tokens=max_new_tokens, **self._id_fields()) for p in prompts]
        with self.timing.timed("generate", sum(map(len, prompts))):
            answers = self._complete_many(payloads)
        ends, stops = {self.eos_id} - {None}, set(stop_ids)
        results = []
        for body, url in answers:
            ids = self._generated_ids(body, url)
            out: list[int] = []
            for token in ids[:max_new_tokens]:
                out.append(token)
                if stop_after(token, out, ends, stops):
                    break
            self.timing.add("generate", 0.0, len(out))
            results.append(out)
        return results

    def _id_fields(self) -> dict[str, Any]:
        """Ask for generated tokens' names when the server names them by id."""
        return {"logprobs": 1} if self._form.extras and not self._form.text else {}

    def _generated_ids(self, body: dict[str, Any], url: str) -> list[int]:
        """The generated ids: from "token_id:N" names, else the text re-encoded with the
        tokenizer; the end-of-sequence token appended when the server stopped at it."""
        try:
            choice = first_choice(body)
            keys = logprobs_of(choice).get("tokens") or []
        except Misaligned as e:
            raise UserError(f"{url}: {e}") from None
        if keys and all(k.startswith("token_id:") for k in keys):
            ids = [int(k[len("token_id:"):]) for k in keys]
        elif self.tokenizer is not None:
            ids = self.tokenizer.encode(choice.get("text") or "", add_special_tokens=False)
        else:
            raise UserError(f"{url}: the server does not name generated tokens by id; the tokenizer is needed")
        if choice.get("finish_reason") == "stop" and self.eos_id is not None and ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    # -----------------------------------------------------------------------------------------
    # Load.

    def stream_payload(self, prompt: Sequence[int], new_tokens: int) -> dict[str, Any]:
        self._ready()
        return self._payload(prompt, self._form, max_tokens=new_tokens,
                             stream_options={"include_usage": True})


# ---------------------------------------------------------------------------------------------
# Serving under load: latency, time to first token and throughput per concurrency level.


def _streamed_tokens(result: http.StreamResult) -> int:
    for event in reversed(result.events):
        usage = event.get("usage") or {}
        if isinstance(usage.get("completion_tokens"), int):
            return usage["completion_tokens"]
    return sum(1 for e in result.events for c in e.get("choices", ()) if c.get("text"))


def measure_load(engine: OpenAIEngine, prompts: Sequence[Sequence[int]], new_tokens: int,
                 sizes: Sequence[int], per_slot: int = 2) -> list[tuple[LoadSample, list[http.StreamResult]]]:
    """At each concurrency level c of `sizes` per replica, send max(len(prompts), per_slot * c *
    replicas) streamed greedy requests (prompts in turn) with at most c in flight on each
    replica; measure each request's latency and time to first text, and the tokens generated
    (the server's usage count, else streamed events), with several replicas each one's. One
    unmeasured request per replica first warms the servers up. Each level's LoadSample, with its
    requests' stream results."""
    n = len(engine.urls)

    async def send(payloads: list[dict[str, Any]], c: int) -> tuple[list[http.StreamResult], list[int], float]:
        start = time.perf_counter()
        async with http.client(engine.headers, c * n) as client:
            calls = [lambda url, p=p: http.post_stream(client, f"{url}/completions", p, engine.policy)
                     for p in payloads]
            results, served_by = await http.spread(calls, engine.urls, c)
        return results, served_by, time.perf_counter() - start

    asyncio.run(send([engine.stream_payload(prompts[0], new_tokens)] * n, 1))
    levels = []
    for c in sizes:
        batch = [prompts[i % len(prompts)] for i in range(max(len(prompts), per_slot * c * n))]
        results, served_by, wall = asyncio.run(send([engine.stream_payload(p, new_tokens) for p in batch], c))
        tokens = [_streamed_tokens(r) for r in results]
        per_replica = tuple(sum(t for t, u in zip(tokens, served_by) if u == k) for k in range(n))
        level = LoadSample(c, True, tuple(r.total_s for r in results), sum(tokens), wall,
                           ttft_s=tuple(r.first_event_s for r in results),
                           replica_tokens=per_replica if n > 1 else None)
        levels.append((level, results))
    return levels


@dataclass
class ServerMeter:
    """A server as served (economics.Serving): each round streams the load sweep, and the
    requests at concurrency 1 are the round's batch-1 requests (time to first text as prefill).
    Its memory is the server's own, not seen from here."""

    engine: OpenAIEngine

    def measure_round(self, prompts: Sequence[Sequence[int]], new_tokens: int, sizes: Sequence[int]) -> RoundSample:
        levels = measure_load(self.engine, prompts, new_tokens, sizes)
        singles = next(results for level, results in levels if level.batch_size == 1)
        ids = [prompts[i % len(prompts)] for i in range(len(singles))]
        return RoundSample(tuple(map(len, ids)), tuple(r.first_event_s for r in singles),
                           tuple(r.total_s - r.first_event_s for r in singles),
                           tuple(max(_streamed_tokens(r) - 1, 0) for r in singles),
                           tuple(r.total_s for r in singles), tuple(level for level, _ in levels))

    def peak_rss_bytes(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# The OpenAI-compatible backend: the baseline and each candidate are servers someone else runs
# (vLLM, llama.cpp's server, ...). quantgate sees no weights: a candidate declares its scheme.


class OpenAIBackend(Backend):
    warm = True  # someone else's server: up before the run and after it
    uses_threads = False

    def _engine(self, ctx: RunContext, serving: Any) -> OpenAIEngine:
        return OpenAIEngine.from_config(serving, ctx.baseline.tokenizer, vocab_size=ctx.baseline.model.config.vocab_size)

    def prepare(self, ctx: RunContext, prepared: PreparedSuite) -> tuple[PreparedSuite, list[str]]:
        """Probe every server once: if any gives no usable prompt log-probabilities, the tasks
        that need them are refused for the whole run (every model must see the same items) and
        only the generation tasks run."""
        from quantgate.evals.tasks import generation_only

        problems = [p for s in self.probed(ctx) if (p := self._engine(ctx, s).prompt_logprobs_problem)]
        if not problems or not (prepared.requests or prepared.windows):
            return prepared, []
        try:
            prepared, refused = generation_only(prepared)
        except UserError as e:  # nothing left to run: say why the server's log-probabilities were refused
            raise UserError(f"{e} ({problems[0]})") from None
        return prepared, [f"refused: {', '.join(refused) or 'perplexity/KLD windows'} (they need prompt "
                          f"log-probabilities): {problems[0]}; only the generation tasks ran"]

    def probed(self, ctx: RunContext) -> list[Any]:
        """The servings (ServingConfig) probed before the run: the baseline's and every candidate's."""
        return [ctx.cfg.serving] + [c.serving for c in ctx.cfg.resolved_candidates]

    def baseline(self, ctx: RunContext, label: str = "baseline") -> Served:
        bits = 16
        return Served(label, _declared_bytes(ctx, bits), f"assumed: parameters × {bits} bits (the baseline "
                      "server's weights are not seen)", f"served, assumed {bits}-bit",
                      opener=lambda: ready(self._engine(ctx, ctx.cfg.serving)))

    def candidate(self, ctx: RunContext, cand: MethodConfig) -> Served:
        return Served(cand.label, _declared_bytes(ctx, cand.bits), f"declared: parameters × {cand.bits} bits",
                      cand.scheme, opener=lambda: ready(self._engine(ctx, cand.serving)))

    def resumed(self, ctx: RunContext, cand: MethodConfig, meta: Mapping[str, Any]) -> Served:
        return dataclasses.replace(super().resumed(ctx, cand, meta), opener=lambda: ready(self._engine(ctx, cand.serving)))

    def serving(self, ctx: RunContext, served: Served) -> Opener:
        """The server(s), streamed at each concurrency (per replica) up to serving.max_batch_size;
        concurrency 1 gives the single-request numbers (each request's decode speed is one
        replica's)."""
        @contextmanager
        def meter(threads: int | None) -> Iterator[ServerMeter]:  # (a server runs with its own threads)
            with served.open() as engine:
                yield ServerMeter(engine)

        return meter

    def noise_reference(self, ctx: RunContext) -> tuple[Engine, str]:
        from quantgate.engines.torch import TorchEngine

        k = ctx.cfg.serving.top_logprobs
        return TorchEngine(ctx.baseline.model), f"torch {ctx.baseline.precision}, on the server's top-{k} basis"

    def floor_divergence(self, other: torch.Tensor, served: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Like with like: the reference's full rows `other` [T, V] coarsened onto each served
        row's tail (what the server did not report), by the rule that filled that tail (its mass
        spread uniformly), before KL(reference || served) is taken (topk.kld_topk); apart, what
        that truncation alone costs a full-vocabulary comparison: KL(reference || its own
        coarsened rows). The plain KL of `other` against the filled rows is exactly their sum."""
        from quantgate.evals.tasks import kl_divergence

        return kld_topk(other, served).numpy(), kl_divergence(other, coarsen(other, tail_mask(served)))


def _declared_bytes(ctx: RunContext, bits: int) -> int:
    """Weights of a served model whose files quantgate does not see: parameters × bits / 8
    (nominal: it orders candidates by aggressiveness, it is not a measured size)."""
    return sum(p.numel() for p in ctx.baseline.model.parameters()) * bits // 8
