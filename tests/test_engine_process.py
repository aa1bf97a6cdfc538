"""Engines in a child process: same answers as in-process, real per-process memory, and a crash
or a bad file that ends one engine, not the caller."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from quantgate.engines.llamacpp import LlamaCppEngine  # noqa: E402
from quantgate.engines.process import EngineCrashed, EngineProcess, receive, send  # noqa: E402
from quantgate.errors import UserError  # noqa: E402
from quantgate.models.load import locate_packaged  # noqa: E402

REQUESTS = [((1, 2, 3, 4), (5, 6)), ((1, 2, 3, 4), (7,)), ((9, 10), (11, 12, 13))]
WINDOW = list(range(100, 160))


@pytest.fixture(scope="module")
def gguf():
    return locate_packaged("smollm2-135m-instruct")  # the packaged Q4_1 file: small and fast


def _process(gguf, tmp_path, **options):
    return EngineProcess("llamacpp", label="test", log=tmp_path / "engine.log", path=str(gguf), n_ctx=256, **options)


def test_frames_round_trip_arrays_without_pickle(tmp_path):
    path = tmp_path / "frames"
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([True, False]), np.zeros((0, 4))]
    with open(path, "wb") as f:
        send(f, {"op": "x", "n": 1}, arrays)
    with open(path, "rb") as f:
        head, out = receive(f)
        assert receive(f) is None  # end of stream
    assert head == {"op": "x", "n": 1}
    for a, b in zip(arrays, out):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_process_engine_gives_the_in_process_answers(gguf, tmp_path):
    local = LlamaCppEngine(gguf, n_ctx=256)
    with _process(gguf, tmp_path) as remote:
        ll, greedy = remote.loglikelihood(REQUESTS)
        (lp,) = list(remote.token_logprobs([WINDOW]))
        generated = remote.generate([[1, 2, 3, 4, 5]], 6)
        stats = remote.close()
    ll_local, greedy_local = local.loglikelihood(REQUESTS)
    np.testing.assert_array_equal(ll, ll_local)
    np.testing.assert_array_equal(greedy, greedy_local)
    np.testing.assert_array_equal(lp.numpy(), local.window_logprobs(WINDOW))
    assert generated == local.generate([[1, 2, 3, 4, 5]], 6)
    assert stats["timing"]["tokens"]["loglikelihood"] == sum(len(c) + len(x) for c, x in REQUESTS)


def test_peak_memory_is_the_child_processes_own(gguf, tmp_path):
    """The child's peak resident memory holds the model file but not this (larger) test process:
    Linux's ru_maxrss would report the parent's size across fork and exec."""
    ballast = np.ones(700 << 20, dtype=np.uint8)  # make this process clearly larger than the child
    with _process(gguf, tmp_path, logits_all=False) as remote:
        remote.measure_round([list(range(10, 30))], 8)
        stats = remote.close()
    size = gguf.stat().st_size
    assert size * 0.5 < stats["peak_rss_bytes"] < size + (400 << 20)
    assert stats["rss_at_start"] < 150 << 20  # the child imports numpy, not torch
    del ballast


def test_serving_configuration_measures_speed(gguf, tmp_path):
    with _process(gguf, tmp_path, logits_all=False) as remote:
        sample = remote.measure_round([list(range(10, 42)), list(range(50, 82))], 12, sizes=[1, 2, 3])
        rss = remote.peak_rss_bytes()
        assert remote.close()["peak_rss_bytes"] >= rss > 0
    assert sample.prompt_tokens == (32, 32) and all(t > 0 for t in (*sample.prefill_s, *sample.decode_s))
    assert (sample.decode_rates() > 0).all() and all(w >= p for w, p in zip(sample.latency_s, sample.prefill_s))
    # llama-cpp-python serves one sequence at a time: at batch sizes 1, 2, 3 the requests queue
    load = sample.load
    assert [(lv.batch_size, lv.batched) for lv in load] == [(1, False), (2, False), (3, False)]
    assert load[2].latency_s == pytest.approx(np.cumsum([*sample.latency_s, sample.latency_s[0]])[:3])


def test_a_crashed_engine_raises_and_names_how(gguf, tmp_path):
    with _process(gguf, tmp_path) as remote:
        os.kill(remote.proc.pid, signal.SIGKILL)
        remote.proc.wait()
        with pytest.raises(EngineCrashed, match="killed by signal 9"):
            remote.loglikelihood(REQUESTS)


def test_bad_files_are_user_errors_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 1000)
    for bad in (garbage, tmp_path / "missing.gguf"):
        with pytest.raises(UserError, match=bad.name):
            EngineProcess("llamacpp", label="bad", log=tmp_path / "bad.log", path=str(bad))


def test_unknown_engine_kind_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="engine 'nope'"):
        EngineProcess("nope", label="x", log=tmp_path / "x.log")
