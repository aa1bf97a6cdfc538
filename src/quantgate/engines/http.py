"""JSON over HTTP with a bounded fault policy, for engines that talk to a server.

Every request has a timeout; 429 (honouring Retry-After), 5xx, timeouts and dropped connections
are retried with exponential backoff; the tries and the total time one request may take are both
bounded. Anything else, and giving up, is a UserError naming the URL and what happened.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from quantgate.errors import UserError


@dataclass(frozen=True)
class RetryPolicy:
    timeout_s: float = 60.0  # one try: connecting, sending, each read
    max_retries: int = 4  # tries after the first
    backoff_s: float = 0.5  # wait before the first retry; doubles with each retry
    max_wait_s: float = 30.0  # longest single wait, Retry-After included
    budget_s: float = 600.0  # one request, all tries and waits together
    retry_5xx: bool = True  # False: a 5xx is a refusal (some servers answer bad input with 500)

    def wait(self, retry: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `retry` (0-based): the server's Retry-After when
        it gave one, else backoff_s * 2**retry; at most max_wait_s."""
        base = retry_after if retry_after is not None else self.backoff_s * 2**retry
        return min(max(base, 0.0), self.max_wait_s)


class ServerRejected(UserError):
    """The server refused the request itself: a 4xx other than 429 (a 5xx too, under a policy
    with retry_5xx=False)."""

    def __init__(self, url: str, status: int, message: str):
        super().__init__(f"{url}: HTTP {status}: {message}")
        self.status = status


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def _error_message(response: httpx.Response) -> str:
    """The server's error text, shortened: OpenAI-style {"error": {"message"}} or the raw body."""
    try:
        body = response.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        text = err.get("message", err) if isinstance(err, dict) else err
    except ValueError:
        text = response.text
    return " ".join(str(text).split())[:300] or response.reason_phrase


def _check_status(url: str, response: httpx.Response, policy: RetryPolicy) -> None:
    if response.status_code == 429 or (response.status_code >= 500 and policy.retry_5xx):
        raise _Retryable(f"HTTP {response.status_code}: {_error_message(response)}",
                         retry_after_seconds(response.headers.get("retry-after")))
    if response.status_code >= 400:
        raise ServerRejected(url, response.status_code, _error_message(response))


def _parse_json(url: str, response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise UserError(f"{url}: the answer is not valid JSON (HTTP {response.status_code}): "
                        f"{response.text[:120]!r}") from None
    if not isinstance(body, dict):
        raise UserError(f"{url}: the answer is JSON but not an object: {response.text[:120]!r}")
    return body


async def _with_retries(url: str, policy: RetryPolicy, attempt: Callable[[], Awaitable[Any]]) -> Any:
    """Run `attempt()` (a coroutine function) until it returns, retrying _Retryable failures and
    transport errors within the policy's bounds."""
    start = time.monotonic()
    for retry in range(policy.max_retries + 1):
        try:
            return await attempt()
        except httpx.TimeoutException:
            failure = _Retryable(f"no answer within {policy.timeout_s:g} s")
        except httpx.TransportError as e:
            failure = _Retryable(f"connection failed ({type(e).__name__}: {e or 'no detail'})")
        except _Retryable as e:
            failure = e
        wait = policy.wait(retry, failure.retry_after)
        spent = time.monotonic() - start
        if retry == policy.max_retries or spent + wait > policy.budget_s:
            break
        await asyncio.sleep(wait)
    raise UserError(f"{url}: gave up after {retry + 1} tries in {time.monotonic() - start:.1f} s: "
                    f"{failure.reason}")


def _timeout(policy: RetryPolicy) -> httpx.Timeout:
    return httpx.Timeout(policy.timeout_s)


async def post_json(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                    policy: RetryPolicy) -> dict[str, Any]:
    """POST `payload` as JSON, return the JSON object answered (retrying per the policy)."""

    async def attempt() -> dict[str, Any]:
        response = await client.post(url, json=payload, timeout=_timeout(policy))
        _check_status(url, response, policy)
        return _parse_json(url, response)

    return await _with_retries(url, policy, attempt)


async def get_json(client: httpx.AsyncClient, url: str, policy: RetryPolicy) -> dict[str, Any]:
    async def attempt() -> dict[str, Any]:
        response = await client.get(url, timeout=_timeout(policy))
        _check_status(url, response, policy)
        return _parse_json(url, response)

    return await _with_retries(url, policy, attempt)


@dataclass(frozen=True)
class StreamResult:
    events: list[dict[str, Any]]  # the JSON objects of the server-sent events, in order
    first_event_s: float  # seconds from sending the request to the first event with text
    total_s: float  # seconds from sending the request to the end of the stream


async def post_stream(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
                      policy: RetryPolicy) -> StreamResult:
    """POST with stream=true and read the server-sent events ("data: {json}" lines up to
    "data: [DONE]"). Times are measured from the first try (what a user waits, retries included);
    a failed stream is retried from its start."""
    start = time.perf_counter()

    async def attempt() -> StreamResult:
        events: list[dict[str, Any]] = []
        first = None
        async with client.stream("POST", url, json={**payload, "stream": True}, timeout=_timeout(policy)) as r:
            if r.status_code != 200:
                await r.aread()
                _check_status(url, r, policy)
            async for line in r.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else None
                if not data:
                    continue
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise UserError(f"{url}: a streamed event is not valid JSON: {data[:120]!r}") from None
                if first is None and any(c.get("text") for c in event.get("choices", ())):
                    first = time.perf_counter() - start
                events.append(event)
        total = time.perf_counter() - start
        return StreamResult(events, total if first is None else first, total)

    return await _with_retries(url, policy, attempt)


async def spread(calls: list[Callable[[str], Awaitable[Any]]], urls: Sequence[str],
                 per_url: int) -> tuple[list[Any], list[int]]:
    """Await every call(url) on one of `urls` (replicas of one server), at most `per_url` in
    flight on each: calls are dealt round-robin at first, then each goes to the first replica
    with a free slot (a faster replica takes more). Returns the results in call order, and the
    index of the url that answered each. The first error propagates (the event loop's shutdown
    cancels the rest)."""
    todo = iter(range(len(calls)))
    results: list[Any] = [None] * len(calls)
    served_by = [-1] * len(calls)

    async def slot(u: int) -> None:
        for i in todo:  # one shared iterator: each call is taken by exactly one slot
            results[i] = await calls[i](urls[u])
            served_by[i] = u

    await asyncio.gather(*(slot(u) for _ in range(per_url) for u in range(len(urls))))
    return results, served_by


def client(headers: dict[str, str], limit: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(headers=headers, limits=httpx.Limits(max_connections=limit))
