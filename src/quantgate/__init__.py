"""quantgate: compress a language model and prove, on your own eval set, what it cost.

    import quantgate
    record = quantgate.run("quantgate.yaml")   # or a dict of the same keys, or a quantgate.config.RunConfig
    print(record.recommended)

Importing quantgate imports nothing else: `run` loads the pipeline when called (quantgate.api).
"""

from __future__ import annotations

import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quantgate.record import RunRecord

__version__ = "0.1.0"
__all__ = ["__version__", "run"]


def run(config: Any = None, **options: Any) -> RunRecord:
    """Run the gate: a YAML path, a dict of the YAML's keys or a RunConfig (None: the packaged
    default run) -> the run's RunRecord. Options: results_dir, store, resume, progress (see
    quantgate.api.run)."""
    from quantgate.api import run as run_api

    return run_api(config, **options)


class _Package(types.ModuleType):
    """quantgate's own module type. Importing the submodule quantgate.run (the pipeline's stages)
    would rebind the package's `run` to that module; this keeps `quantgate.run` the function above
    (the submodule stays importable: `from quantgate.run import execute`)."""

    def __setattr__(self, name: str, value: object) -> None:
        if not (name == "run" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
