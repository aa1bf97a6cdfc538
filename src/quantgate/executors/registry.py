"""The executor registry: one entry per executor kind, owning where models are made and scored.

An executor decides *where* the work of a run happens; the serving backend (engines/registry.py)
decides *what* that work is. `local` makes and scores every model in this process, one after the
other (quantgate's behaviour before executors existed). `ray` makes and scores each model in a
Ray actor of its own, anywhere on a Ray cluster, several at once; per-item records come back and
every statistic is computed here, so the results are the same number for number.

An entry (ExecutorEntry) is cheap data read at config time: its config model (a frozen pydantic
model whose `kind` tags it in the YAML), the Executor class ("module:Class", imported on use) and
what must be installed. This module imports pydantic only: config.py builds the run's config
from it without importing Ray.

Adding an executor: its config class and entry here, its Executor (executors/base.py) in a
module of its own.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, model_validator

from quantgate.errors import UserError
from quantgate.settings import Frozen

if TYPE_CHECKING:
    from quantgate.executors.base import Executor


class LocalConfig(Frozen):
    """Every model made and scored in this process, one at a time."""

    kind: Literal["local"] = "local"


class RayConfig(Frozen):
    """Each model made and scored by a Ray actor of its own (executors/ray_cluster.py)."""

    kind: Literal["ray"] = "ray"
    # The cluster: "auto" (the one this machine is a node of), "HOST:6379" (its head), or
    # "ray://HOST:10001" (Ray Client). None: the Ray this process is already connected to,
    # else a Ray instance started here for the run (on loopback, shut down after it).
    address: str | None = None
    # What each model's actor reserves on its node; Ray runs as many at once as the nodes hold.
    # CPUs are also the actor's thread count (Ray sets OMP_NUM_THREADS to them).
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)  # None: no memory reserved
    # A Ray instance started here (address None): CPUs it offers (None: every core) and the size
    # of its shared-memory object store (the reference log-probs travel through it; more spills to disk).
    local_cpus: int | None = Field(None, ge=1)
    object_store_mb: int = Field(256, ge=80)

    @model_validator(mode="after")
    def _local_keys_without_address(self) -> RayConfig:
        if self.address is not None:
            given = sorted({"local_cpus", "object_store_mb"} & self.model_fields_set)
            if given:
                raise ValueError(f"{given[0]} sizes a Ray instance started here; with an address the cluster "
                                 "has its own: leave it out")
        return self

    def actor_options(self) -> dict[str, Any]:
        """Ray's resource options of one model's actor."""
        memory = {"memory": int(self.memory_gb * 2**30)} if self.memory_gb is not None else {}
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, **memory}


@dataclass(frozen=True)
class ExecutorEntry:
    config: type[Frozen]
    executor: str  # "module:Class", an Executor (executors/base.py)
    requires: tuple[str, ...] = ()  # Python modules that must be importable
    install: str = ""

    @property
    def name(self) -> str:
        return self.config.model_fields["kind"].default

    def check(self) -> None:
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            raise UserError(f"executor {self.name} needs {', '.join(missing)}: {self.install}")

    def open(self, cfg: Frozen) -> Executor:
        """The executor of this kind (a context manager: entered for the run, closed after)."""
        self.check()
        module, cls = self.executor.split(":")
        return getattr(importlib.import_module(module), cls)(cfg)


EXECUTORS: dict[str, ExecutorEntry] = {e.name: e for e in (
    ExecutorEntry(LocalConfig, "quantgate.executors.local:LocalExecutor"),
    ExecutorEntry(RayConfig, "quantgate.executors.ray_cluster:RayExecutor", requires=("ray",),
                  install="pip install 'quantgate[ray]'"),
)}


def _kind(data: Any) -> str | None:
    return data.get("kind", "local") if isinstance(data, dict) else getattr(data, "kind", None)


# The `executor:` block of a config: the entry its `kind` names validates it.
ExecutorConfig = Annotated[
    Union[tuple(Annotated[e.config, Tag(name)] for name, e in EXECUTORS.items())],  # noqa: UP007
    Discriminator(_kind, custom_error_type="unknown_executor",
                  custom_error_message=f"executor kind is one of {', '.join(EXECUTORS)}"),
]


def entry(cfg: Frozen) -> ExecutorEntry:
    return EXECUTORS[cfg.kind]
