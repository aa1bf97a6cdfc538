"""`quantgate verify`: is this artifact the one that passed (or failed) its gate, and does it still
measure what was recorded?

1. Every file the manifest lists must have its recorded sha256 (else a one-line refusal naming
   the file, exit 2).
2. The run's config (checked by digest), baseline (sha256) and eval set (digest of the prepared
   suite) are reloaded and checked against the manifest.
3. The baseline and then the artifact run on the eval set, on the engine whose registry entry
   loads the artifact's format (engines/registry.py: BackendEntry.exports, Backend.exported),
   which must be the engine the gate run measured it on, exactly as the gate run did, and the re-measured metrics are compared with the
   recorded ones.

Tolerances come from the noise the manifest records: k = the run's engine noise floor (mean
per-token KL divergence) + the export's own round-trip KL divergence. A per-token log-probability
then moves by about σ = sqrt(2k) (KL ≈ ½·Var of the log-ratio for small changes), so an option's
summed log-likelihood of T tokens moves by at most Z·σ·T (Z = 4), and an item whose two best
options are closer than twice that is a near tie whose answer may legitimately differ. Accuracy
may move by the near-tie items only; the flipped items may differ only on near ties; the mean
KL divergence from the baseline may move by 2k + 4·sqrt(k·KL) (the first-order change of
E_base[log p_cand] when log p_cand moves by δ with E[δ²] ≈ 2k); log-perplexity by Z·σ.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantgate.engines import registry as backends
from quantgate.engines.registry import Backend, BackendEntry, RunContext
from quantgate.errors import UserError
from quantgate.evals.datasets import ChoiceItem
from quantgate.evals.metrics import ModelMetrics, model_metrics
from quantgate.evals.tasks import (
    ModelScores,
    PreparedSuite,
    evaluate,
    with_response_windows,
)
from quantgate.export import manifest
from quantgate.export.stored import (
    checked_baseline,
    checked_eval,
    prepared_suite,
    read_config,
)
from quantgate.record import FlippedItem

if TYPE_CHECKING:
    from quantgate.report.progress import Feedback

Z = 4.0  # standard deviations of engine noise an option's log-likelihood may move by
PLAIN_FORMATS = ("compressed-tensors", "hf")  # formats users load with transformers' from_pretrained
PLAIN_MAX_KLD = 1e-3  # mean per-token KLD of the plainly loaded artifact from quantgate's exact load


@dataclass(frozen=True)
class Check:
    what: str
    recorded: str
    measured: str
    tolerance: str
    ok: bool


@dataclass(frozen=True)
class Verification:
    artifact: Path
    candidate: str
    engine: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def verify(path: Path, feedback: Feedback | None = None) -> Verification:
    """Check an exported artifact (its directory or a file in it) against its manifest and re-measure
    it. `feedback` hears what is being done (report.progress.Feedback; default: nothing)."""
    say = feedback.say if feedback is not None else _quiet
    directory, doc = manifest.read(path)
    manifest.check_files(directory, doc)
    say(f"the {len(doc['files'])} files of {directory} match {manifest.MANIFEST} (sizes and sha256)")
    where = directory / manifest.MANIFEST
    cfg = read_config(doc["config"], doc["config_digest"], where)
    recorded = manifest.measured(doc, where)
    say(f"loading the baseline {cfg.model.base} and checking its sha256 against the run's")
    baseline = checked_baseline(cfg, doc["model"]["sha256"], where)
    prepared = prepared_suite(cfg, baseline.tokenizer)
    checked_eval(prepared, doc["eval"]["sha256"], where)
    entry = _engine(cfg, doc, where)
    say(f"eval set matches the run's ({len(prepared.suite.items)} items); re-measuring the baseline and "
        f"{doc['candidate']} on {entry.name}")
    with tempfile.TemporaryDirectory(prefix="quantgate-verify-") as work:
        ctx = RunContext(cfg, baseline, None, Path(work), feedback or _silent, [], None)
        with entry.load() as backend:
            base_scores, cand_scores, prepared = measure(backend, ctx, directory, doc, prepared)
    metric = cfg.quality_gate.metric
    base = model_metrics(base_scores, prepared, metric, baseline.tokenizer)
    cand = model_metrics(cand_scores, prepared, metric, baseline.tokenizer)
    k = _noise_kld(recorded, doc.get("round_trip") or {})
    say("comparing the re-measured metrics with the recorded ones (tolerance: the run's noise floor + the "
        "export's round trip)")
    checks = compare(recorded, k, metric, prepared, (base_scores, base), (cand_scores, cand))
    if doc["format"] in PLAIN_FORMATS:
        checks += user_loads(directory, doc, prepared, baseline, measured_in=entry.loader)
    return Verification(directory, doc["candidate"], entry.name, tuple(checks))


def user_loads(directory: Path, doc: dict[str, Any], prepared: PreparedSuite, baseline,
               measured_in: str | None) -> list[Check]:
    """The artifact loaded the ways users load it, each compared on the text windows with
    quantgate's exact load: plain transformers, and vLLM when it is installed
    ($QUANTGATE_VLLM_PYTHON) and was not already the engine re-measured on (`measured_in`: the
    loader that engine is, BackendEntry.loader)."""
    from quantgate.engines.vllm import PYTHON_ENV
    from quantgate.export.build import _text_logprobs
    from quantgate.export.formats import load_torch_artifact

    reference = _text_logprobs(load_torch_artifact(directory, dict(doc["scheme"])), prepared)
    checks = [plain_check(directory, doc, prepared, reference)]
    if doc["format"] == "compressed-tensors" and os.environ.get(PYTHON_ENV) and measured_in != "vllm":
        checks.append(vllm_check(directory, doc, prepared, baseline, reference))
    return checks


def _tolerance(doc: dict[str, Any], kld: float) -> tuple[str, bool]:
    """(the tolerance in words, whether `kld` is within it): PLAIN_MAX_KLD, except for W8A8,
    whose inputs each loader rounds by its own rule (reported, not judged)."""
    if doc["scheme"].get("input_activations"):
        return "loads (W8A8: inputs rounded by the loader's own rule)", True
    return f"loads, KLD ≤ {PLAIN_MAX_KLD:g}", kld <= PLAIN_MAX_KLD


def vllm_check(directory: Path, doc: dict[str, Any], prepared: PreparedSuite, baseline,
               reference: list) -> Check:
    """Served by vLLM started on the directory: it must start, and its rows compare with the exact
    load on the server's top-k basis (engines/topk.kld_topk)."""
    from quantgate.engines.process import EngineCrashed
    from quantgate.engines.topk import kld_topk
    from quantgate.engines.vllm import served_logprobs

    what = "loads in vLLM ($QUANTGATE_VLLM_PYTHON)"
    log = Path(tempfile.gettempdir()) / f"quantgate-verify-vllm-{os.getpid()}.log"
    try:
        rows = served_logprobs(directory, baseline, prepared.windows[: prepared.n_text_windows], log)
    except EngineCrashed as e:
        return Check(what, "-", f"cannot serve it ({e})", "serves", False)
    kld = float(np.concatenate([kld_topk(r, s).numpy() for r, s in zip(reference, rows)]).mean())
    return Check(what, "-", f"KLD {kld:.3g} on its top-20 basis", *_tolerance(doc, kld))


def plain_check(directory: Path, doc: dict[str, Any], prepared: PreparedSuite, reference: list) -> Check:
    """Loaded as a user loads it (plain transformers from_pretrained): it must load, and compute
    the artifact (mean KLD on the text windows from quantgate's exact load, `reference`, at most
    PLAIN_MAX_KLD: float16 scales multiplied in float16)."""
    from quantgate.export.build import plain_load

    what = "loads with plain transformers (from_pretrained)"
    recorded = ((doc.get("round_trip") or {}).get("plain_transformers") or {}).get("kld_mean")
    shown = "-" if recorded is None else f"KLD {recorded:.3g}"
    try:
        got = plain_load(directory, reference, prepared)
    except UserError as e:
        return Check(what, shown, f"cannot load ({e})", "loads", False)
    return Check(what, shown, f"KLD {got['kld_mean']:.3g} ({got['loader']})", *_tolerance(doc, got["kld_mean"]))


def _silent(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def _quiet(text: str) -> None:
    pass


def _engine(cfg, doc: dict[str, Any], where: Path) -> BackendEntry:
    """The engine that loads the artifact's format back, which must be the one its gate run
    measured it on."""
    cand = {c.label: c for c in cfg.resolved_candidates}.get(doc["candidate"])
    if cand is None:
        raise UserError(f"{where}: candidate '{doc['candidate']}' is not in the manifest's config")
    measured_on = (getattr(cand, "serving", None) or cfg.serving).engine
    entry = backends.loader_of(doc["format"], prefer=measured_on)
    if measured_on != entry.name:
        raise UserError(f"{where}: the gate run measured {doc['candidate']} on the {measured_on} engine; a "
                        f"{doc['format']} artifact is re-measured on {entry.name}, so the records would not compare")
    return entry


# -- running the baseline and the artifact -----------------------------------------------------------


def measure(backend: Backend, ctx: RunContext, directory: Path, doc: dict[str, Any],
            prepared: PreparedSuite) -> tuple[ModelScores, ModelScores, PreparedSuite]:
    """Baseline then the exported artifact, each opened by the backend that loads the format, as
    run.execute measures them: the baseline's per-window log-probs (its responses to prompt
    items appended as windows) are the candidate's KL reference."""
    with backend.baseline(ctx).open() as engine:
        base, reference = evaluate(engine, prepared, keep=True, model="baseline", on_step=ctx.progress("baseline", 2))
        prepared = with_response_windows(prepared, base.generations)
        reference += list(engine.token_logprobs(prepared.windows[len(reference):]))
    label = doc["candidate"]
    with backend.exported(ctx, label, directory, list(doc["files"]), doc["scheme"]).open() as engine:
        cand, _ = evaluate(engine, prepared, reference, model=label, on_step=ctx.progress(label, 2))
    return base, cand, prepared


# -- comparing with the record ---------------------------------------------------------------------


def compare(recorded: manifest.Measured, k: float, metric: str, prepared: PreparedSuite,
            base: tuple[ModelScores, ModelMetrics], cand: tuple[ModelScores, ModelMetrics]) -> list[Check]:
    """Recorded vs re-measured: the gate metric of baseline and candidate, the flipped items, the
    candidate's mean KL divergence from the baseline and its perplexity (tolerances: module doc;
    k: the noise, mean per-token KLD)."""
    sigma = math.sqrt(2.0 * k)
    normalize = metric == "accuracy_norm"
    base_ties = near_ties(base[0], prepared, Z * sigma, normalize=normalize)
    cand_ties = near_ties(cand[0], prepared, Z * sigma, normalize=normalize)
    labeled = ~np.isnan(base[1].score)
    n = int(labeled.sum())
    checks = [
        _metric_check(f"baseline {metric}", recorded.baseline.metric(metric), base[1].metric(metric), n,
                      int((base_ties & labeled).sum())),
        _metric_check(f"candidate {metric}", recorded.candidate.metric(metric), cand[1].metric(metric), n,
                      int((cand_ties & labeled).sum())),
        _flips_check(recorded.flipped_items, prepared, base[1], cand[1], (base_ties | cand_ties) & labeled),
    ]
    recorded_kld = recorded.vs_baseline.kld_mean
    if recorded_kld is not None and cand[0].kld is not None:
        tol = 2 * k + 4 * math.sqrt(k * recorded_kld) + 1e-6 * recorded_kld + 1e-12
        got = float(np.mean(cand[0].kld))
        checks.append(Check("KL divergence from baseline (mean)", f"{recorded_kld:.6g}", f"{got:.6g}",
                            f"±{tol:.2g}", abs(got - recorded_kld) <= tol))
    recorded_ppl = recorded.candidate.perplexity
    if recorded_ppl is not None and math.isfinite(cand[1].perplexity):
        tol = Z * sigma + 1e-6
        ok = abs(math.log(cand[1].perplexity) - math.log(recorded_ppl)) <= tol
        checks.append(Check("candidate perplexity", f"{recorded_ppl:.6g}", f"{cand[1].perplexity:.6g}",
                            f"×/÷ {math.exp(tol):.6g}", ok))
    return checks


def _noise_kld(recorded: manifest.Measured, round_trip: dict[str, Any]) -> float:
    """k: the run's engine noise floor plus the export's round trip (mean per-token KLD)."""
    floor = (recorded.noise_floor and recorded.noise_floor.kld_mean) or 0.0
    trip = round_trip.get("kld_mean") or 0.0  # the manifest's own section (export/build.py)
    return float(floor) + float(trip)


def near_ties(scores: ModelScores, prepared: PreparedSuite, per_token: float, *, normalize: bool) -> np.ndarray:
    """bool [n_items]: multiple-choice items whose best two options (by summed log-likelihood, or
    per character when `normalize`) are closer than twice the most any option may move, an
    option of T tokens moving by up to per_token · T (per character: / its characters)."""
    values = scores.option_ll / prepared.option_chars if normalize else scores.option_ll
    tokens = np.array([len(cont) for _, cont in prepared.requests], dtype=np.float64)
    moves = per_token * tokens / (prepared.option_chars if normalize else 1.0)
    ties = np.zeros(len(prepared.suite.items), dtype=bool)
    for i, item in enumerate(prepared.suite.items):
        a, b = prepared.offsets[i], prepared.offsets[i + 1]
        if isinstance(item, ChoiceItem) and b - a > 1:
            top = np.sort(values[a:b])[-2:]
            ties[i] = top[1] - top[0] <= 2 * moves[a:b].max()
    return ties


def _metric_check(what: str, recorded: float | None, got: float, n: int, ties: int) -> Check:
    """Equal, or off by no more items than there are near ties."""
    if recorded is None:
        return Check(what, "-", f"{got:.4f}", "-", not math.isfinite(got))
    off = round(abs(got - recorded) * n)
    return Check(what, f"{recorded:.4f}", f"{got:.4f}", f"±{ties} near-tie items of {n}", off <= ties)


def _flips_check(recorded: Sequence[FlippedItem], prepared: PreparedSuite, base: ModelMetrics, cand: ModelMetrics,
                 ties: np.ndarray) -> Check:
    """The items whose correctness changed vs the baseline: the same set, except near ties."""
    ids = [(item.task, item.id) for item in prepared.suite.items]
    was = {(f.task, f.id) for f in recorded if f.direction != "output changed"}
    now = {ids[i] for i in np.flatnonzero(base.correct != cand.correct) if not np.isnan(base.score[i])}
    allowed = {ids[i] for i in np.flatnonzero(ties)}
    differ = was ^ now
    return Check("flipped items", str(len(was)), f"{len(now)} ({len(differ)} differ)",
                 f"only near ties ({len(allowed)})", differ <= allowed)


def render_verification(v: Verification, console) -> None:
    """The recorded-vs-re-measured table and a one-line verdict."""
    from rich.table import Table

    table = Table(title=f"verify {v.candidate} ({v.artifact}) on {v.engine}")
    for column in ("check", "recorded", "re-measured", "tolerance", ""):
        table.add_column(column)
    for c in v.checks:
        table.add_row(c.what, c.recorded, c.measured, c.tolerance, "ok" if c.ok else "MISMATCH")
    console.print(table)
    console.print("verified: the artifact measures what its gate run recorded" if v.ok
                  else "NOT verified: re-measured metrics differ from the record beyond the noise tolerance")
