"""quantgate-manifest.json: written beside every exported artifact, read by `quantgate verify`.

It says what the artifact is without a reader having to guess from a file name: the sha256 of
every weight file, the scheme (method, bits, group size, symmetry, format), the baseline's
sha256, the run's config and its digest, the calibration and eval-set digests, the library
versions, the machine, and the gate's rules with the measured results and their intervals.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from quantgate.errors import UserError
from quantgate.models.load import file_sha256

MANIFEST = "quantgate-manifest.json"
MANIFEST_VERSION = 1
_DISTRIBUTIONS = {"quantgate": "quantgate", "torch": "torch", "transformers": "transformers",
                  "compressed-tensors": "compressed-tensors", "llama_cpp": "llama-cpp-python", "gguf": "gguf",
                  "safetensors": "safetensors"}


def versions() -> dict[str, str | None]:
    """Installed versions of what wrote and reads the artifact (None: not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for key, dist in _DISTRIBUTIONS.items():
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


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


def build(*, candidate: str, fmt: str, scheme: dict[str, Any], files: dict[str, dict[str, Any]],
          results: dict[str, Any], results_path: Path, eval_sha256: str, round_trip: dict[str, Any] | None,
          source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of one exported candidate of the run in `results` (results.json as a dict)."""
    record = next(c for c in results["candidates"] if c["name"] == candidate)
    base = results["baseline"]
    measured_keys = ("accuracy", "accuracy_norm", "per_task", "perplexity", "weight_bytes")
    return {
        "manifest_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(),
        "candidate": candidate,
        "format": fmt,
        "scheme": scheme,
        "settings": record.get("settings"),
        "files": files,
        "source_artifact": source,
        "model": results["model"],
        "config": results["config"],
        "config_digest": results["config_digest"],
        "calibration": results.get("calibration"),
        "eval": {**(results.get("eval") or {}), "sha256": eval_sha256},
        "versions": versions(),
        "machine": {"export": machine(), "run": (results.get("environment") or {}).get("machine")},
        "run": {"run_id": results.get("run_id"), "results": str(results_path),
                "results_sha256": file_sha256(results_path), "environment": results.get("environment")},
        "gate": record.get("gate"),
        "measured": {
            "baseline": {k: base.get(k) for k in measured_keys},
            "candidate": {k: record.get(k) for k in measured_keys},
            "vs_baseline": record.get("vs_baseline"),
            "flipped_items": record.get("flipped_items"),
            "noise_floor": results.get("noise_floor"),
        },
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
    try:
        manifest = json.loads(where.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{where}:{e.lineno}: not valid JSON ({e.msg})") from None
    missing = [k for k in ("manifest_version", "format", "scheme", "files", "config", "measured") if k not in manifest]
    if missing:
        raise UserError(f"{where}: missing key '{missing[0]}'")
    if manifest["manifest_version"] != MANIFEST_VERSION:
        raise UserError(f"{where}: manifest_version {manifest['manifest_version']}; this quantgate reads "
                        f"{MANIFEST_VERSION}")
    if not path.is_dir() and path.name not in manifest["files"] and path.name != MANIFEST:
        raise UserError(f"{path}: not a file of this artifact (its manifest lists {', '.join(manifest['files'])})")
    return directory, manifest


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
