"""quantgate-manifest.json: written beside every exported artifact, read by `quantgate verify`.

It says what the artifact is without a reader having to guess from a file name: the sha256 of
every weight file, the scheme (method, bits, group size, symmetry, format), the baseline's
sha256, the run's config and its digest, the calibration and eval-set digests, the library
versions, the machine, and the gate's rules with the measured results and their intervals.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from quantgate.errors import UserError
from quantgate.models.load import file_sha256
from quantgate.readers import read_json
from quantgate.record import Comparison, FlippedItem, NoiseFloor, Num, Record, RunRecord, error_line

MANIFEST = "quantgate-manifest.json"
MANIFEST_VERSION = 1
_DISTRIBUTIONS = {"quantgate": "quantgate", "torch": "torch", "transformers": "transformers",
                  "compressed-tensors": "compressed-tensors", "llama_cpp": "llama-cpp-python", "gguf": "gguf",
                  "safetensors": "safetensors", "onnxruntime": "onnxruntime"}


def versions() -> dict[str, str | None]:
    """Installed versions of what wrote and reads the artifact (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in _DISTRIBUTIONS.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def _loaded_here(fmt: str) -> dict[str, str | None]:
    """The loaders that read this artifact back on this machine, with their versions: transformers
    for the round trip of torch formats; the llama.cpp (llama-cpp-python) or ONNX Runtime that
    evaluated a GGUF file or an ONNX graph."""
    v = versions()
    return {"gguf": {"llama.cpp": v["llama_cpp"]}, "onnx": {"onnxruntime": v["onnxruntime"]}}.get(
        fmt, {"transformers": v["transformers"]})


def machine() -> dict[str, str]:
    import torch

    return {"system": f"{platform.system()} {platform.release()}", "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": str(torch.get_num_threads())}


def artifact_files(directory: Path) -> list[str]:
    """Every file of the artifact (weights, config, tokenizer) relative to `directory`, the
    manifest itself excepted."""
    return sorted(str(f.relative_to(directory)) for f in directory.rglob("*") if f.is_file() and f.name != MANIFEST)


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """{path relative to `directory`: {"sha256", "bytes"}} for every file of the artifact."""
    return {name: {"sha256": file_sha256(directory / name), "bytes": (directory / name).stat().st_size}
            for name in artifact_files(directory)}


class FileEntry(Record):
    sha256: str
    bytes: int


class Digest(BaseModel):
    sha256: str | None


class Head(BaseModel):
    """The keys verify reads before anything else, typed (the rest: Measured, read_config)."""

    model_config = ConfigDict(extra="allow")
    manifest_version: int
    candidate: str
    format: str
    scheme: dict[str, Any]
    files: dict[str, FileEntry]
    config: dict[str, Any]
    config_digest: str
    model: Digest
    eval: Digest
    measured: dict[str, Any]


class MeasuredModel(Record):
    """A model's own numbers as the manifest records them."""

    accuracy: Num
    accuracy_norm: Num
    per_task: dict[str, Num]
    perplexity: Num
    weight_bytes: int

    def metric(self, name: str) -> float | None:
        return self.accuracy_norm if name == "accuracy_norm" else self.accuracy


class Measured(Record):
    """What the gate run measured of the exported candidate: the manifest's "measured" section,
    parts of the run record (quantgate.record) that verify compares a re-measurement with."""

    baseline: MeasuredModel
    candidate: MeasuredModel
    vs_baseline: Comparison
    flipped_items: tuple[FlippedItem, ...]
    noise_floor: NoiseFloor | None


def build(*, candidate: str, fmt: str, scheme: dict[str, Any], files: dict[str, dict[str, Any]],
          record: RunRecord, results_path: Path, eval_sha256: str, round_trip: dict[str, Any] | None,
          source: dict[str, Any] | None = None, title: str | None = None) -> dict[str, Any]:
    """The manifest of one exported candidate of the run `record` (read from results_path):
    `title` is the artifact's name (model, candidate, run); "holds" says the same in fields, and
    "loaders" the minimum versions of what loads it (export/formats.py LOADERS)."""
    from quantgate.export.formats import loaders

    c = record.candidate(candidate)
    own = set(MeasuredModel.model_fields)
    measured = Measured(baseline=MeasuredModel(**record.baseline.model_dump(include=own)),
                        candidate=MeasuredModel(**c.model_dump(include=own)), vs_baseline=c.vs_baseline,
                        flipped_items=c.flipped_items, noise_floor=record.noise_floor)
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(),
        "candidate": candidate,
        "name": title,
        "holds": {"model": record.model.base, "model_sha256": record.model.sha256, "candidate": candidate,
                  "scheme": c.scheme, "format": fmt, "run_id": record.run_id},
        "format": fmt,
        "scheme": scheme,
        "loaders": loaders(fmt, _loaded_here(fmt)),
        "settings": c.settings,
        "files": files,
        "source_artifact": source,
        "model": record.model.model_dump(mode="json"),
        # the config in the current shape, and the digest of exactly that JSON (an upgraded old
        # record's own config_digest is of the config as it was stored; run_config_digest keeps it)
        "config": record.config,
        "config_digest": hashlib.sha256(json.dumps(record.config, sort_keys=True).encode()).hexdigest(),
        "run_config_digest": record.config_digest,
        "calibration": record.calibration and record.calibration.model_dump(mode="json"),
        "eval": {**record.eval.model_dump(mode="json"), "sha256": eval_sha256},
        "versions": versions(),
        "machine": {"export": machine(), "run": record.environment.get("machine")},
        "run": {"run_id": record.run_id, "results": str(results_path),
                "results_sha256": file_sha256(results_path), "environment": record.environment},
        "gate": c.gate.model_dump(mode="json"),
        "measured": measured.model_dump(mode="json"),
        "round_trip": round_trip,
    }


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return path


def read(path: Path) -> tuple[Path, dict[str, Any]]:
    """(the artifact directory, its manifest) for an export directory or a file inside one."""
    directory = path if path.is_dir() else path.parent
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    where = directory / MANIFEST
    if not where.is_file():
        raise UserError(f"{where}: no quantgate manifest beside the artifact (export it with quantgate export)")
    manifest = read_json(where, "manifest")
    if not isinstance(manifest, dict):
        raise UserError(f"{where}: expected a JSON object")
    try:
        Head.model_validate(manifest)
    except ValidationError as e:
        raise UserError(f"{where}: {error_line(e)}") from None
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise UserError(f"{where}: manifest_version {manifest['manifest_version']}; this quantgate reads "
                        f"{MANIFEST_VERSION}")
    if not path.is_dir() and path.name not in manifest["files"] and path.name != MANIFEST:
        raise UserError(f"{path}: not a file of this artifact (its manifest lists {', '.join(manifest['files'])})")
    return directory, manifest


def measured(manifest: dict[str, Any], where: Path) -> Measured:
    """The manifest's "measured" section, typed; UserError naming the key when malformed."""
    try:
        return Measured.model_validate(manifest["measured"])
    except ValidationError as e:
        raise UserError(f"{where}: {error_line(e, 'measured')}") from None


def check_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded size and sha256, and no other file
    is there (a loader would read it too); else a one-line UserError naming the file."""
    extra = sorted(set(artifact_files(directory)) - set(manifest["files"]))
    if extra:
        raise UserError(f"{directory / extra[0]}: not listed in the manifest; refusing the artifact")
    for name, entry in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path}: missing (the manifest lists it)")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise UserError(f"{path}: sha256 differs from the manifest: the artifact was modified or is not "
                            "the one exported; refusing it")
