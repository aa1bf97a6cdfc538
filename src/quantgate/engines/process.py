"""Run an engine in a child process behind the same Engine interface.

Why: each candidate's engine gets a fresh process, so its peak memory (ru_maxrss) is its own, and
a crash (a segfault in native code, the OOM killer) ends that process, not the run.

The parent (`EngineProcess`) and the child (`python -m quantgate.engines.process`) talk over two
dedicated pipes (never stdout, where native libraries may print) with frames of:
    uint32 little-endian length, JSON header; then, for each entry of header["arrays"]
    ({"dtype", "shape"}), the array's raw C-order bytes.
No pickles cross the pipe. The child imports only the engine it runs (the llama.cpp engine needs
numpy, not torch), so the measured memory is the engine's, not PyTorch's.

Engines are named by kind (a backend registry entry's `process`, engines/registry.py) or by
"module:Class" for engines outside quantgate; the class is constructed with the spec's keyword
options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from quantgate.engines.base import Request, Timing
from quantgate.engines.registry import process_factory
from quantgate.errors import EngineFault, NothingHappened, UserError

if TYPE_CHECKING:
    import torch

_ERRORS = {"UserError": UserError, "NothingHappened": NothingHappened}


class EngineCrashed(EngineFault):
    """The engine's process ended without answering (a crash, a kill, running out of memory)."""


# ---------------------------------------------------------------------------------------------
# Framing, shared by both sides.


def send(stream: BinaryIO, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
    arrays = [np.ascontiguousarray(a) for a in arrays]
    header = {**header, "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]}
    raw = json.dumps(header).encode()
    stream.write(struct.pack("<I", len(raw)) + raw)
    for a in arrays:
        if a.size:  # (a memoryview of an empty array cannot be cast to bytes)
            stream.write(memoryview(a).cast("B"))
    stream.flush()


def receive(stream: BinaryIO) -> tuple[dict[str, Any], list[np.ndarray]] | None:
    """The next frame, or None at end of stream (the other side is gone)."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    raw = stream.read(struct.unpack("<I", head)[0])
    header = json.loads(raw)
    arrays = []
    for spec in header.pop("arrays"):
        dtype = np.dtype(spec["dtype"])
        n = int(np.prod(spec["shape"], dtype=np.int64)) * dtype.itemsize
        data = stream.read(n)
        if len(data) < n:
            return None
        arrays.append(np.frombuffer(data, dtype=dtype).reshape(spec["shape"]))
    return header, arrays


def _rss_bytes(field: str = "VmRSS") -> int:
    """Resident memory of this process (Linux /proc/self/status), bytes: VmRSS now, or VmHWM,
    its peak. (getrusage's ru_maxrss would not do: Linux carries the parent's peak over fork and
    exec, so a child started by a large parent reports the parent's size.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


# ---------------------------------------------------------------------------------------------
# The parent's side.


class EngineProcess:
    """An Engine whose work happens in a child process. `measure` runs the economics probe
    there too (timed inside the child, so the pipe is not in the numbers); `close` returns the
    child's peak resident memory and its own timings."""

    def __init__(self, kind: str, *, label: str, log: Path, **options: Any):
        self.name = kind
        self.label = label
        self.timing = Timing()
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        with open(log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "quantgate.engines.process", str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
            )
        os.close(to_child_r)
        os.close(from_child_w)
        self._out = os.fdopen(to_child_w, "wb")
        self._in = os.fdopen(from_child_r, "rb")
        self.started = self._call({"op": "start", "kind": kind, "options": options})[0]

    def _call(self, header: dict[str, Any], arrays: Sequence[np.ndarray] = ()) -> tuple[dict, list[np.ndarray]]:
        try:
            send(self._out, header, arrays)
        except BrokenPipeError:
            self._crashed()
        reply = receive(self._in)
        if reply is None:
            self._crashed()
        head, out = reply
        if "error" in head:
            raise _ERRORS.get(head["type"], RuntimeError)(head["error"])
        return head, out

    def _crashed(self) -> None:
        code = self.proc.wait(timeout=30)
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        tail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log.exists() else []
        raise EngineCrashed(f"{self.label}: the {self.name} engine process ended ({how})"
                            + (f": {' | '.join(tail)}" if tail else f"; log: {self.log}"))

    def loglikelihood(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
        with self.timing.timed("loglikelihood", sum(len(c) + len(x) for c, x in requests)):
            _, (ll, greedy) = self._call({"op": "loglikelihood", "requests": [list(map(list, r)) for r in requests]})
        return ll.copy(), greedy.copy()

    def token_logprobs(self, windows: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        import torch

        for w in windows:
            with self.timing.timed("token_logprobs", len(w)):
                _, (lp,) = self._call({"op": "window_logprobs", "window": list(w)})
            yield torch.from_numpy(lp.copy())

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 stop_ids: Sequence[int] = ()) -> list[list[int]]:
        with self.timing.timed("generate", sum(map(len, prompts))):
            head, _ = self._call({"op": "generate", "prompts": [list(p) for p in prompts],
                                  "max_new_tokens": max_new_tokens, "stop_ids": list(stop_ids)})
        return head["result"]

    def measure(self, prompts: Sequence[Sequence[int]], new_tokens: int,
                max_batch_size: int = 1) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """economics.measure and economics.load_levels (batch sizes up to max_batch_size), run
        inside the child: a Throughput and LoadLevels, as dicts."""
        head, _ = self._call({"op": "measure", "prompts": [list(p) for p in prompts], "new_tokens": new_tokens,
                              "max_batch_size": max_batch_size})
        return head["result"], head["load"]

    def close(self) -> dict[str, Any]:
        """End the child; its peak RSS (bytes), RSS before the model was loaded, engine timings."""
        head, _ = self._call({"op": "close"})
        self.proc.wait(timeout=60)
        self._out.close()
        self._in.close()
        return head["result"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# ---------------------------------------------------------------------------------------------
# The child's side.


def _construct(kind: str, options: dict[str, Any]) -> Any:
    try:
        target = process_factory(kind)
    except ValueError as e:
        raise UserError(f"{e}: name a registered engine or 'module:Class'") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)(**options)


def _window_logprobs(engine: Any, window: list[int]) -> np.ndarray:
    if hasattr(engine, "window_logprobs"):
        return engine.window_logprobs(window)
    return next(iter(engine.token_logprobs([window]))).numpy()


def _handle(engine: Any, head: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
    op = head["op"]
    if op == "loglikelihood":
        ll, greedy = engine.loglikelihood([(tuple(c), tuple(x)) for c, x in head["requests"]])
        return {}, [np.asarray(ll, dtype=np.float64), np.asarray(greedy, dtype=bool)]
    if op == "window_logprobs":
        return {}, [np.asarray(_window_logprobs(engine, head["window"]), dtype=np.float32)]
    if op == "generate":
        return {"result": engine.generate(head["prompts"], head["max_new_tokens"], head["stop_ids"])}, []
    if op == "measure":
        from quantgate.economics import batch_sizes, load_levels, measure

        single = asdict(measure(engine, head["prompts"], head["new_tokens"]))
        levels = load_levels(engine, head["prompts"], head["new_tokens"], batch_sizes(head["max_batch_size"]))
        return {"result": single, "load": [asdict(level) for level in levels]}, []
    raise ValueError(f"unknown operation {op!r}")


def child(read_fd: int, write_fd: int) -> int:
    inp, out = os.fdopen(read_fd, "rb"), os.fdopen(write_fd, "wb")
    rss_at_start = _rss_bytes()
    engine = None
    while (msg := receive(inp)) is not None:
        head, _ = msg
        try:
            if head["op"] == "start":
                t0 = time.perf_counter()
                engine = _construct(head["kind"], head["options"])
                send(out, {"load_seconds": time.perf_counter() - t0, "rss_after_load": _rss_bytes()})
                continue
            if head["op"] == "close":
                peak = _rss_bytes("VmHWM")
                timing = asdict(engine.timing) if engine is not None else {}
                send(out, {"result": {"peak_rss_bytes": peak, "rss_at_start": rss_at_start, "timing": timing}})
                return 0
            reply, arrays = _handle(engine, head)
            send(out, reply, arrays)
        except (UserError, NothingHappened) as e:
            send(out, {"error": str(e), "type": type(e).__name__})
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description="quantgate engine child process (started by EngineProcess)")
    ap.add_argument("read_fd", type=int)
    ap.add_argument("write_fd", type=int)
    args = ap.parse_args()
    return child(args.read_fd, args.write_fd)


if __name__ == "__main__":
    sys.exit(main())
