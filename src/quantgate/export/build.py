"""`quantgate export`: one evaluated candidate of a stored run, written as an artifact with its
manifest.

GGUF candidates (llama.cpp engine) are exported as the file the engine evaluated, refused when its
bytes are not the recorded ones. Torch candidates are made again from the stored config (same code
path, seed and calibration windows, each checked against the run), written, loaded back, and
compared with the re-made candidate before the manifest is written: the integer weights must
decompress to the evaluated weights bit for bit, and the loaded model's next-token distributions on
the held-out text windows must match (mean KL divergence below ROUND_TRIP_MAX_KLD).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from quantgate.engines import registry as backends
from quantgate.errors import NotSupportedYet, UserError
from quantgate.evals.tasks import PreparedSuite, kl_divergence
from quantgate.export import formats, manifest
from quantgate.methods.registry import MethodConfig
from quantgate.export.codes import NotOnGrid, recover_codes
from quantgate.export.stored import Recreated, StoredRun, load_stored_run, recreate
from quantgate.methods.apply import spec_of, targets
from quantgate.models.arch import ArchInfo
from quantgate.models.load import file_sha256

if TYPE_CHECKING:
    from quantgate.report.progress import Feedback

ROUND_TRIP_MAX_KLD = 1e-4  # mean per-token KL(evaluated candidate || loaded artifact)


@dataclass(frozen=True)
class Exported:
    directory: Path
    manifest: Path
    files: dict[str, dict[str, Any]]  # relative path -> sha256, bytes
    round_trip: dict[str, Any] | None


def export_candidate(run_dir: Path, name: str, fmt: str, out: Path | None = None,
                     dtype: str | None = None, feedback: Feedback | None = None) -> Exported:
    """Export candidate `name` of the run in `run_dir` as `fmt` (formats.FORMATS) into `out`
    (default: <run dir>/exports/<artifact name>-<fmt>, the name saying model, candidate and run),
    which must not exist or be empty. `feedback` hears each step (report.progress.Feedback)."""
    say = feedback.say if feedback is not None else _quiet
    if fmt not in formats.FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(formats.FORMATS)}")
    run = load_stored_run(run_dir)
    cand, _ = run.candidate(name)
    title = formats.artifact_name(run.record, name)
    out = out or run.path.parent / "exports" / f"{title}-{fmt}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty (choose another --out)")
    if cand.artifact in ("served", "baseline") or (fmt == "gguf") != (cand.artifact == "gguf"):
        raise UserError(_wrong_format(name, cand, fmt))
    if fmt in formats.EVALUATED and run.config.serving.engine != backends.loader_of(fmt).name:
        raise UserError(f"candidate {name} was evaluated on the {run.config.serving.engine} engine; --format {fmt} "
                        f"exports the artifact the {backends.loader_of(fmt).name} engine evaluated (gate it there)")
    if dtype is not None and fmt in formats.EVALUATED:
        raise UserError(f"--dtype applies to compressed-tensors and hf exports (a {fmt} artifact is copied as "
                        "evaluated)")
    if dtype is not None and dtype not in formats.DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(formats.DTYPES)}")
    try:
        if fmt in formats.EVALUATED:
            scheme, round_trip, source, digest = _export_evaluated(run, name, cand, fmt, out, title, say)
        else:
            rec = recreate(run, name, progress=feedback, say=say)
            dtype = dtype or formats.default_dtype(fmt, cand)
            say(f"writing {fmt} ({dtype}) to {out}, loading it back and comparing with the evaluated candidate")
            scheme, round_trip = _export_torch(rec, fmt, dtype, out)
            source, digest = None, rec.eval_sha256
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    say("hashing the files and writing the manifest")
    files = manifest.file_entries(out)
    doc = manifest.build(candidate=name, fmt=fmt, scheme=scheme, files=files, record=run.record,
                         results_path=run.path, eval_sha256=digest, round_trip=round_trip, source=source,
                         title=title)
    return Exported(out, manifest.write(out, doc), files, round_trip)


def _quiet(text: str) -> None:
    pass


def _wrong_format(name: str, cand: MethodConfig, fmt: str) -> str:
    if cand.artifact == "gguf":
        return (f"candidate {name} is a llama.cpp GGUF ({cand.type}); it exports as --format gguf, the file "
                "the llama.cpp engine evaluated")
    if cand.artifact == "served":
        return f"candidate {name} was served by someone else's server: quantgate has no weights of it to export"
    if cand.is_baseline:
        return f"candidate {name} is the baseline itself (an A/A check): there is nothing compressed to export"
    return (f"candidate {name} was evaluated as PyTorch weights; --format gguf exports only the GGUF file a "
            "llama.cpp candidate was evaluated as (use compressed-tensors, hf, or onnx for a candidate the "
            "onnxruntime engine evaluated)")


# -- artifacts exported as evaluated (gguf, onnx) ----------------------------------------------------


@dataclass(frozen=True)
class _Evaluated:
    """How one format's evaluated artifact is exported: copied into `out` (returning the copied
    file the run recorded a sha256 of; `title` names what it holds), made again the run's way when
    its cached copy is gone, and described in the manifest."""

    copy: Callable[[Path, Path, Recreated, str], Path]
    remake: Callable[[StoredRun, Recreated, MethodConfig], Path]
    scheme: Callable[[MethodConfig], dict[str, Any]]


def _export_evaluated(run: StoredRun, name: str, cand: MethodConfig, fmt: str, out: Path, title: str,
                      say: Callable[[str], None]) -> tuple[dict, dict, dict, str]:
    """Copy the evaluated artifact (its recorded path; when that is gone, made again the same way)
    after checking its sha256 against the run's record."""
    how = _EVALUATED[fmt]
    rec = recreate(run, name, make=False, say=say)
    artifact = rec.record.artifact
    if artifact is None:
        why = f" ({rec.record.unservable})" if rec.record.unservable else ""
        raise UserError(f"{run.path}: candidate {name} has no evaluated {fmt} artifact{why}")
    path = Path(artifact.path)
    if not path.is_file():
        say(f"{path} is gone: making the {fmt} artifact again the run's way")
        path = how.remake(run, rec, cand)
    say(f"checking {path.name} against the run's sha256 and copying it")
    digest = file_sha256(path)
    if digest != artifact.sha256:
        raise UserError(f"{path}: sha256 {digest[:16]}… differs from the file the run evaluated "
                        f"({artifact.sha256[:16]}…); refusing to export it")
    copied = how.copy(path, out, rec, title)
    if file_sha256(copied) != digest:
        raise UserError(f"{copied}: the copy's sha256 differs from its source {path}")
    source = {"path": str(path), "sha256": digest, "bytes": path.stat().st_size}
    return how.scheme(cand), {"bytes_identical": True, "sha256": digest}, source, rec.eval_sha256


def _requantize(run: StoredRun, rec: Recreated, cand: MethodConfig) -> Path:
    from quantgate.methods.calibrate import calibration_set
    from quantgate.methods.gguf_quant import quantized_gguf

    calib = None
    if cand.imatrix:
        calib = calibration_set(rec.baseline.tokenizer, run.config.calibration, rec.prepared.suite.texts())
    return quantized_gguf(rec.baseline, cand.type, calib)


def _regraph(run: StoredRun, rec: Recreated, cand: MethodConfig) -> Path:
    from quantgate.engines.onnxruntime import GRAPH, candidate_folder

    made = recreate(run, rec.candidate.label).made  # (its size is the graph's: checked by sha256)
    return candidate_folder(rec.baseline, made.model, cand, run.path.parent / "logs" / "onnx-builder.log") / GRAPH


def _copy_graph(path: Path, out: Path, rec: Recreated, title: str) -> Path:
    from quantgate.engines.onnxruntime import copy_graph

    return copy_graph(path, out, rec.baseline.tokenizer)


def _graph_scheme(cand: MethodConfig) -> dict[str, Any]:
    from quantgate.engines.onnxruntime import export_scheme

    return export_scheme(cand)


_EVALUATED = {
    "gguf": _Evaluated(lambda path, out, rec, title: formats.copy_gguf(path, out, f"{title}.gguf")[0], _requantize,
                       formats.gguf_scheme),
    "onnx": _Evaluated(_copy_graph, _regraph, _graph_scheme),
}


# -- compressed-tensors and hf ---------------------------------------------------------------------------


def write_artifact(model: torch.nn.Module, cand: MethodConfig, arch: ArchInfo, tokenizer, fmt: str, dtype: str,
                   out: Path) -> dict[str, Any]:
    """Write `model` (candidate `cand` as made on torch; left unchanged) as compressed-tensors or
    hf into `out`; returns the manifest's scheme (formats.torch_scheme). The serving engines
    that load these formats (vllm) write their candidates through here too."""
    names = targets(model, arch, cand.quantizer) if cand.quantizer is not None else []
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    scheme = formats.torch_scheme(cand, fmt, dtype, names, [n for n in linears if n not in names])
    if fmt == "compressed-tensors":
        formats.write_compressed_tensors(model, tokenizer, _codes(model, cand, names), scheme, out)
    else:
        formats.write_hf(copy.deepcopy(model), tokenizer, out, dtype)
    return scheme


def _export_torch(rec: Recreated, fmt: str, dtype: str, out: Path) -> tuple[dict, dict]:
    """Write the re-made candidate as `fmt`, load it back and compare; (scheme, round-trip record)."""
    model, cand = rec.made.model, rec.candidate
    reference = _text_logprobs(model, rec.prepared)
    scheme = write_artifact(model, cand, rec.baseline.arch, rec.baseline.tokenizer, fmt, dtype, out)
    names = scheme["targets"]
    loaded = formats.load_torch_artifact(out, scheme)
    exact = all(torch.equal(loaded.get_submodule(n).weight, model.get_submodule(n).weight) for n in names)
    kld = np.concatenate([kl_divergence(r, lp) for r, lp in zip(reference, _text_logprobs(loaded, rec.prepared))])
    round_trip = {"kld_mean": float(kld.mean()), "kld_max": float(kld.max()), "tokens": int(kld.size),
                  "quantized_weights_exact": exact, "reference": "the re-made candidate, float32, on the "
                  "held-out text windows", "plain_transformers": plain_load(out, reference, rec.prepared)}
    if fmt == "compressed-tensors" and not exact:
        raise UserError(f"{out}: the loaded integer weights differ from the evaluated ones")
    if not kld.mean() < ROUND_TRIP_MAX_KLD:
        hint = ("storing its other tensors in float16 changes it too much: export with --dtype float32"
                if dtype != "float32" else "the artifact does not reproduce it")
        raise UserError(f"{out}: the exported model's mean KL divergence from the evaluated candidate is "
                        f"{kld.mean():.3g} (limit {ROUND_TRIP_MAX_KLD:g}); {hint}")
    return scheme, round_trip


def plain_load(directory: Path, reference: list[torch.Tensor], prepared: PreparedSuite) -> dict[str, Any]:
    """The artifact loaded as a user loads it (formats.load_plain: UserError when it cannot be),
    and its mean KL divergence on the text windows from `reference` (the evaluated candidate's
    log-probs there): {"loader": versions, "kld_mean": float}."""
    model = formats.load_plain(directory)
    with torch.inference_mode():  # its own forward: what a user runs (modules may stay compressed)
        rows = [torch.log_softmax(model(torch.tensor([w])).logits[0, :-1].float(), -1)
                for w in prepared.windows[: prepared.n_text_windows]]
    kld = np.concatenate([kl_divergence(r, lp) for r, lp in zip(reference, rows)])
    return {"loader": f"transformers {formats.loader_versions()}", "kld_mean": float(kld.mean())}


def _codes(model: torch.nn.Module, cand: MethodConfig, names: list[str]) -> dict:
    if not names:
        raise UserError(f"candidate {cand.label} quantizes nothing (method {cand.method}): export it as hf")
    q = cand.quantizer
    if q.quantize_embeddings:
        raise NotSupportedYet(f"compressed-tensors export of quantized embeddings (candidate {cand.label}; "
                              "export hf)")
    spec = spec_of(q)
    formats.check_ct_shapes(model, names, spec)
    try:
        return {n: recover_codes(model.get_submodule(n).weight.detach(), spec) for n in names}
    except NotOnGrid as e:
        raise UserError(f"candidate {cand.label}: a weight is not on its {spec} grid ({e})") from None


def _text_logprobs(model: torch.nn.Module, prepared: PreparedSuite) -> list[torch.Tensor]:
    """The model's log-probabilities [T-1, V] on each held-out text window."""
    from quantgate.engines.torch import TorchEngine

    return list(TorchEngine(model).token_logprobs(prepared.windows[: prepared.n_text_windows]))


def render_export(e: Exported, console) -> None:
    """Where the artifact went, its files and sizes, and the round-trip check."""
    for name, entry in e.files.items():
        console.print(f"  {name}  {entry['bytes']:,} bytes  sha256 {entry['sha256'][:16]}…")
    total = sum(entry["bytes"] for entry in e.files.values())
    console.print(f"exported to {e.directory} ({total:,} bytes); manifest: {e.manifest}", soft_wrap=True)
    trip = e.round_trip or {}
    if "kld_mean" in trip:
        console.print(f"round trip: mean KLD vs the evaluated candidate {trip['kld_mean']:.3g} over {trip['tokens']} "
                      f"tokens; integer weights exact: {trip['quantized_weights_exact']}", soft_wrap=True)
    elif trip:
        console.print(f"round trip: byte-identical to the evaluated file (sha256 {trip['sha256'][:16]}…)")
