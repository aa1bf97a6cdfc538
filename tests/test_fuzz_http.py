"""Fuzzing served models: real HTTP servers on loopback answering in OpenAI's layout from the tiny
Llama (tests/test_openai_engine.py TinyServer), with faults injected: NaN or +inf log-probabilities
(on every item, on one item, only in the top-k of the text windows), HTTP errors, malformed JSON,
a hanging server. `quantgate run` end to end, with the baseline and a served candidate on servers.

What each ends with (README "Evaluating models served by ..."):
  - a candidate's server gives NaN/inf: that candidate fails, naming itself and the item; the run
    finishes and is recorded (exit 1: no candidate holds the gate);
  - the baseline's server gives NaN/inf: exit 3, one line naming the baseline and the item, no run;
    the items scored before it are in the store and `--resume` reuses them;
  - a server that errs, hangs or answers garbage: exit 2, one line naming the URL, no run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import build_tiny_llama
from fuzz_cli import no_run_left, quantgate, refused
from test_openai_engine import MODELS, Answer, TinyServer, _json, serve

from quantgate.record import load_record

ITEMS = 10
MARK = "~"  # a character only the marked item's query holds (id 99 of the char tokenizer)
MARK_ID = 5 + ord(MARK) - 32


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_llama()


def eval_set(tmp: Path, marked: int | None = None) -> Path:
    rows = [{"id": f"sum-{i}", "query": f"Question: {i} plus one{MARK if i == marked else ''}?\nAnswer:",
             "choices": [f" {i + 1}", f" {i + 2}"], "gold": 0} for i in range(ITEMS)]
    path = tmp / "sums.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(tmp: Path, model: Path, base_url: str, cand_url: str, data: Path, **serving) -> Path:
    server = {"engine": "openai", "max_batch_size": 1, "max_concurrency": 2, "timeout_s": 5, "max_retries": 0,
              "top_logprobs": 8, **serving}
    cfg = {
        "model": {"base": str(model)},
        "serving": {**server, "base_url": base_url},
        "candidates": [{"method": "served", "bits": 4, "name": "served-q4", "serving": {**server, "base_url": cand_url}}],
        "quality_gate": {"eval_set": str(data), "min_items": 4},
        "evaluation": {"ppl_windows": 1, "window_tokens": 24, "record_every": 4},
        "economics": {"measure": False},
        "results_dir": str(tmp / "results"),
    }
    path = tmp / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def faulty(tiny: TinyServer, when: Callable[[dict], bool], change: Callable[[dict], None]) -> Callable:
    """The tiny server's answers, `change`d on completions whose request satisfies `when`."""
    def answer(method: str, path: str, body: dict) -> Answer:
        status, headers, data = tiny(method, path, body)
        if path.endswith("/completions") and status == 200 and when(body):
            doc = json.loads(data)
            change(doc)
            data = json.dumps(doc).encode()  # (json writes NaN and Infinity, as a careless server would)
        return status, headers, data

    return answer


def scoring(body: dict) -> bool:
    """An echoed scoring request of an eval item (not the probe, not a text window)."""
    return bool(body.get("echo")) and "Question" in "".join(chr(32 + i - 5) for i in body["prompt"] if i >= 5)


def marked(body: dict) -> bool:
    return bool(body.get("echo")) and MARK_ID in body["prompt"]


def set_values(value: float) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        lp = doc["choices"][0]["logprobs"]
        lp["token_logprobs"] = [None if v is None else value for v in lp["token_logprobs"]]
    return change


def set_tops(value: float) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        for top in doc["choices"][0]["logprobs"]["top_logprobs"]:
            if top:
                for k in list(top)[1:]:
                    top[k] = value
    return change


def windows(body: dict) -> bool:
    """An echoed request of a held-out text window (not an item, not the set-up's probe)."""
    text = "".join(chr(32 + i - 5) for i in body["prompt"] if i >= 5)
    return bool(body.get("echo")) and not scoring(body) and "capital of France" not in text


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_candidate_server_giving_nan_fails_that_candidate_and_the_run_goes_on(tmp_path, capfd, tiny_dir,
                                                                               tiny_model, value):
    with serve(TinyServer(tiny_model)) as (base_url, _), \
            serve(faulty(TinyServer(tiny_model), scoring, set_values(value))) as (cand_url, _):
        o = quantgate(capfd, "run", str(config(tmp_path, tiny_dir, base_url, cand_url, eval_set(tmp_path))), "--quiet")
    assert o.code == 1 and "Traceback" not in o.err and not o.err.strip(), o.err
    (results,) = (tmp_path / "results").glob("*/results.json")
    record = load_record(results)
    (failed,) = record.failed_candidates
    assert failed.name == "served-q4" and "served-q4" in failed.error and "NaN or +inf" in failed.error
    assert "item 'sum-0'" in failed.error  # the first item it scored
    assert record.baseline.items_scored == ITEMS  # the baseline's work is kept and reported


def test_nan_only_in_the_top_k_of_text_windows_names_the_window(tmp_path, capfd, tiny_dir, tiny_model):
    with serve(TinyServer(tiny_model)) as (base_url, _), \
            serve(faulty(TinyServer(tiny_model), windows, set_tops(math.nan))) as (cand_url, _):
        o = quantgate(capfd, "run", str(config(tmp_path, tiny_dir, base_url, cand_url, eval_set(tmp_path))), "--quiet")
    assert o.code == 1 and not o.err.strip(), o.err
    (results,) = (tmp_path / "results").glob("*/results.json")
    (failed,) = load_record(results).failed_candidates
    assert "held-out text window 0" in failed.error and "served-q4" in failed.error


def test_the_baseline_server_giving_nan_stops_the_run_and_keeps_what_was_scored(tmp_path, capfd, tiny_dir,
                                                                                tiny_model):
    """Item 5 of 10 gets NaN: exit 3 naming baseline and item; items 0-4 and 6-7 (its chunk of
    record_every=4 minus itself) are in the store; once the server is fixed, --resume reuses them."""
    data, bad = eval_set(tmp_path, marked=5), "sum-5"
    with serve(faulty(TinyServer(tiny_model), marked, set_values(math.nan))) as (url, _):
        path = config(tmp_path, tiny_dir, url, url, data)
        line = refused(quantgate(capfd, "run", str(path), "--quiet"), "'baseline'", f"item '{bad}'", "NaN", code=3)
    assert "--resume" in line
    no_run_left(tmp_path / "results")
    from quantgate.store import open_store
    from quantgate.store.schema import item_results

    store = open_store(tmp_path / "results" / "quantgate.db", create=False)
    with store.connect() as conn:
        kept = sorted(r.item_id.split(":", 1)[1] for r in conn.execute(item_results.select())
                      if r.candidate == "baseline")
    store.dispose()
    assert kept == [f"sum-{i}" for i in (0, 1, 2, 3, 4, 6, 7)]
    with serve(TinyServer(tiny_model)) as (url, _):
        o = quantgate(capfd, "run", str(config(tmp_path, tiny_dir, url, url, data)), "--resume", "--quiet")
    assert o.code in (0, 1) and not o.err.strip(), o.err
    (results,) = (tmp_path / "results").glob("*/results.json")
    assert load_record(results).baseline.items_reused == 7


def _status(code: int) -> Callable:
    return lambda m, p, b: MODELS if p.endswith("/models") else _json({"error": {"message": "boom"}}, code)


def _garbage(m: str, p: str, b: dict) -> Answer:
    return MODELS if p.endswith("/models") else (200, {"Content-Type": "application/json"}, b'{"choices": [')


def _empty_choices(m: str, p: str, b: dict) -> Answer:
    return MODELS if p.endswith("/models") else _json({"choices": []})


def _strings(tiny: TinyServer) -> Callable:
    return faulty(tiny, lambda b: True, lambda d: d["choices"][0].__setitem__("logprobs", "lots"))


def _hang(m: str, p: str, b: dict) -> Answer | None:
    return MODELS if p.endswith("/models") else None


def _html(m: str, p: str, b: dict) -> Answer:
    return 200, {"Content-Type": "text/html"}, b"<html><body>captive portal</body></html>"


@pytest.mark.parametrize("make, fragment", [
    (lambda tiny: _status(500), "HTTP 500"),
    (lambda tiny: _status(404), "HTTP 404"),
    (lambda tiny: _garbage, ""),
    (lambda tiny: _empty_choices, ""),
    (_strings, ""),
    (lambda tiny: _hang, "no answer within"),
    (lambda tiny: _html, "not valid JSON"),
], ids=["500", "404", "truncated-json", "empty-choices", "logprobs-string", "hang", "html"])
def test_a_broken_baseline_server_is_one_line(tmp_path, capfd, tiny_dir, tiny_model, make, fragment):
    with serve(make(TinyServer(tiny_model))) as (url, _):
        path = config(tmp_path, tiny_dir, url, url, eval_set(tmp_path), timeout_s=1)
        line = refused(quantgate(capfd, "run", str(path), "--quiet"), fragment)
    assert "127.0.0.1" in line  # the server is named
    no_run_left(tmp_path / "results")


def test_a_server_that_is_not_there(tmp_path, capfd, tiny_dir):
    url = "http://127.0.0.1:9/v1"  # the discard port: nothing listens
    refused(quantgate(capfd, "run", str(config(tmp_path, tiny_dir, url, url, eval_set(tmp_path), timeout_s=1)),
                      "--quiet"), url)
    no_run_left(tmp_path / "results")
