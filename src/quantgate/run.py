"""One run: config -> baseline -> candidates -> scores -> comparisons -> gate decision.

Each stage returns plain data; the CLI only loads the config, calls `execute` and renders.
"""

from __future__ import annotations

import dataclasses
import gc
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sqlalchemy.engine import Engine as Store

import quantgate
from quantgate.config import CALIBRATED_METHODS, CandidateConfig, RunConfig, ServingConfig, check_supported
from quantgate.economics import (
    Economics, LoadLevel, Throughput, cost_at_volume, memory_bandwidth, roofline_fraction,
)
from quantgate.engines.process import EngineCrashed, EngineProcess
from quantgate.engines.openai import OpenAIEngine, measure_load
from quantgate.engines.torch import TorchEngine
from quantgate.evals.datasets import load_suite
from quantgate.evals.metrics import Comparison, ModelMetrics, compare, model_metrics
from quantgate.evals.tasks import (
    ModelScores, PreparedSuite, evaluate, generation_only, kl_divergence, prepare, with_response_windows,
)
from quantgate.errors import NothingHappened, UserError
from quantgate.gate import CandidateVerdict, Decision, RuleKind, check_tasks, decide, failing, judge
from quantgate.methods.apply import make_candidate, weight_bytes
from quantgate.methods.calibrate import CalibrationSet, calibration_set
from quantgate.methods.gguf_quant import float_gguf, quantized_gguf, tensor_types
from quantgate.models.load import Baseline, load_baseline
from quantgate.resume import StoreCache, data_digest, settings_digest
from quantgate.store import ItemKey

# A progress sink: (description, total steps) -> a function that advances by n steps.
Progress = Callable[[str, int], Callable[[int], None]]


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


@dataclass
class ModelResult:
    name: str
    candidate: CandidateConfig | None  # None for the baseline
    weight_bytes: int
    modules_changed: int
    metrics: ModelMetrics
    scores: ModelScores = field(repr=False)
    comparison: Comparison | None = None
    quantize_seconds: float = 0.0
    economics: Economics | None = None
    artifact: Path | None = None  # the file the engine evaluated (GGUF), when there is one


@dataclass(frozen=True)
class NoiseFloor:
    """The baseline on the serving engine against the baseline on a reference path, over the
    same tokens: differences below this are the engines', not the compression's."""

    engine: str
    reference: str
    kld: np.ndarray  # float64 [tokens]
    top1_agree: np.ndarray  # bool [tokens]


@dataclass(frozen=True)
class FailedCandidate:
    name: str
    candidate: CandidateConfig
    error: str


@dataclass
class RunResult:
    config: RunConfig
    started: datetime
    finished: datetime
    model_source: str
    model_digest: str
    model_description: str
    prepared: PreparedSuite
    baseline: ModelResult
    candidates: list[ModelResult]
    decision: Decision
    environment: dict[str, str]
    calibration: dict[str, object] | None = None  # source, sha256 of the token windows, shape
    noise_floor: NoiseFloor | None = None
    failed: list[FailedCandidate] = field(default_factory=list)  # candidates whose engine crashed
    memory_bandwidth: float | None = None  # bytes/s, measured when an engine's speed is
    notes: list[str] = field(default_factory=list)  # what the run could not do, and why

    @property
    def exit_code(self) -> int:
        return 0 if self.decision.recommended else 1


def environment() -> dict[str, str]:
    import transformers

    return {
        "quantgate": quantgate.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads",
    }


def execute(cfg: RunConfig, progress: Progress = _no_progress, workdir: Path | None = None,
            store: Store | None = None, resume: bool = False) -> RunResult:
    """Run the whole job. Inputs (config, eval set, calibration data) are validated before any
    model work starts. Engine processes write their logs under `workdir` (a temporary folder
    when None). With a `store`, every model's items are recorded as they are scored; with
    resume=True, items (and whole candidates) already recorded there are reused."""
    check_supported(cfg)
    started = datetime.now(timezone.utc)
    ev, gate = cfg.evaluation, cfg.quality_gate
    torch.manual_seed(cfg.seed)
    suite = load_suite(gate, limit=ev.limit, cloze_items=ev.cloze_items, seed=cfg.seed)
    check_tasks(gate, suite.tasks)
    baseline = load_baseline(cfg.model.base)
    prepared = prepare(suite, baseline.tokenizer, window_tokens=ev.window_tokens, n_windows=ev.ppl_windows)
    calib = None
    if any(c.needs_calibration or c.imatrix for c in cfg.resolved_candidates):
        calib = calibration_set(baseline.tokenizer, cfg.calibration, suite.texts())

    notes, bench = [], _bench_prompts(cfg, prepared)  # the request mix comes from the held-out text
    if cfg.serving.engine == "openai":
        prepared, notes = _servable(cfg, baseline, prepared)
    with _workdir(workdir) as work:
        ctx = _Context(cfg, baseline, calib, work, progress, bench, memory_bandwidth(),
                       store, resume, data_digest(prepared))
        base, prepared, reference = _run_baseline(ctx, prepared)
        floor = _noise_floor(ctx, prepared, reference)
        results, failed, verdicts = [], [], []
        for cand in cfg.resolved_candidates:
            try:
                result = _run_candidate(ctx, cand, prepared, base, reference)
            except EngineCrashed as e:
                failed.append(FailedCandidate(cand.label, cand, str(e)))
                verdicts.append(_crashed_verdict(cand.label, str(e)))
                if cfg.strategy == "ladder":
                    break
                continue
            results.append(result)
            verdicts.append(judge(cand.label, result.weight_bytes, result.comparison, gate))
            gc.collect()
            if cfg.strategy == "ladder" and not verdicts[-1].passed:
                break  # the rung where quality broke: the more aggressive ones are not measured
        with_costs(cfg, base, results)
    return RunResult(
        config=cfg, started=started, finished=datetime.now(timezone.utc),
        model_source=baseline.source, model_digest=baseline.digest, model_description=baseline.description,
        prepared=prepared, baseline=base, candidates=results,
        calibration=calib and {"source": calib.source, "sha256": calib.digest,
                               "samples": int(calib.windows.shape[0]), "seq_len": int(calib.windows.shape[1])},
        decision=decide(verdicts, eval_items=len(suite.items), min_items=gate.min_items, ladder=cfg.strategy == "ladder"),
        environment=environment(), noise_floor=floor, failed=failed, memory_bandwidth=ctx.bandwidth, notes=notes,
    )


@dataclass
class _Context:
    """What every model's run needs besides its own candidate settings."""

    cfg: RunConfig
    baseline: Baseline
    calib: CalibrationSet | None
    work: Path
    progress: Progress
    bench_prompts: list[list[int]]  # the fixed request mix the engine's speed is measured on
    bandwidth: float  # measured memory bandwidth, bytes/s
    store: Store | None = None
    resume: bool = False
    data_digest: str = ""

    @property
    def engine(self) -> str:
        return self.cfg.serving.engine

    def cache(self, cand: CandidateConfig | None, prepared: PreparedSuite) -> StoreCache | None:
        if self.store is None:
            return None
        calibration = self.calib.digest if self.calib is not None and cand is not None else None
        key = ItemKey(self.baseline.digest, settings_digest(self.cfg, cand, calibration), self.data_digest)
        return StoreCache(self.store, key, prepared, self.cfg.evaluation.record_every, cand.label if cand else "baseline", self.resume)

    def server(self, serving: ServingConfig) -> OpenAIEngine:
        return server_engine(serving, self.baseline)

    def torch_engine(self, model: torch.nn.Module) -> TorchEngine:
        return TorchEngine(model, max_batch_size=self.cfg.serving.max_batch_size,
                           batch_tokens=self.cfg.evaluation.batch_tokens)


@contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix="quantgate-") as tmp:
        yield Path(tmp)


def _bench_prompts(cfg: RunConfig, prepared: PreparedSuite) -> list[list[int]]:
    """`requests` prompts of `prompt_tokens` tokens, cut from the held-out text windows in turn."""
    econ = cfg.economics
    text = [t for w in prepared.windows[: prepared.n_text_windows] for t in w]
    n = min(econ.requests, len(text) // econ.prompt_tokens)
    return [text[i * econ.prompt_tokens : (i + 1) * econ.prompt_tokens] for i in range(n)]


def _run_baseline(ctx: _Context, prepared: PreparedSuite) -> tuple[ModelResult, PreparedSuite, list[torch.Tensor]]:
    """The baseline's scores, the suite extended with its responses to prompt items, and its
    per-window log-probs (the reference of every candidate), all on the serving engine."""
    step = ctx.progress("baseline", 3)
    if ctx.engine == "llamacpp":
        path = float_gguf(ctx.baseline)
        with _engine_process(ctx, "baseline", path) as engine:
            scores, prepared, reference = _reference_pass(ctx, engine, prepared, step)
        size = path.stat().st_size
        economics = _measured(ctx, "baseline", path, size)
    elif ctx.engine == "openai":
        engine = ctx.server(ctx.cfg.serving)
        scores, prepared, reference = _reference_pass(ctx, engine, prepared, step)
        path, size = None, nominal_bytes(ctx.baseline.model, 16)
        economics = _served(ctx, engine)
    else:
        engine = ctx.torch_engine(ctx.baseline.model)
        scores, prepared, reference = _reference_pass(ctx, engine, prepared, step)
        path, size = None, weight_bytes(ctx.baseline.model)[0]
        economics = _measured(ctx, "baseline", ctx.baseline.weights_dir, size) if ctx.baseline.weights_dir else None
    step(1)
    result = ModelResult(
        name="baseline", candidate=None, weight_bytes=size, modules_changed=0,
        metrics=model_metrics(scores, prepared, ctx.cfg.quality_gate.metric, ctx.baseline.tokenizer),
        scores=scores, economics=economics, artifact=path,
    )
    return result, prepared, reference


def _reference_pass(ctx: _Context, engine, prepared: PreparedSuite,
                    step: Callable[[int], None]) -> tuple[ModelScores, PreparedSuite, list[torch.Tensor]]:
    """The baseline on its engine: its scores, the suite extended with its own responses to
    prompt items, and its log-probs over every window (text and responses)."""
    scores, reference = evaluate(engine, prepared, keep=True, on_step=step, cache=ctx.cache(None, prepared))
    prepared = with_response_windows(prepared, scores.generations)
    reference += list(engine.token_logprobs(prepared.windows[len(reference):]))
    return scores, prepared, reference


def _run_candidate(ctx: _Context, cand: CandidateConfig, prepared: PreparedSuite, base: ModelResult,
                   reference: list[torch.Tensor]) -> ModelResult:
    cache = ctx.cache(cand, prepared)
    if cache is not None and cache.complete():  # a resumed run: nothing of this candidate is left to do
        scores, _ = evaluate(None, prepared, reference, cache=cache, on_step=ctx.progress(cand.label, 2))
        meta = cache.meta()
        path = Path(meta["artifact"]) if meta.get("artifact") else None
        economics = _measured(ctx, cand.label, path, meta["weight_bytes"]) if path and path.is_file() else (
            Economics(ctx.engine, True, None, None, None, None) if ctx.engine == "torch" else None)
        made = (meta["weight_bytes"], meta["modules_changed"], meta["quantize_seconds"], path)
    elif ctx.engine == "llamacpp":
        scores, made, economics = _llamacpp_candidate(ctx, cand, prepared, reference, cache)
    elif ctx.engine == "openai":
        engine = ctx.server(cand.serving)
        scores, _ = evaluate(engine, prepared, reference, on_step=ctx.progress(cand.label, 2), cache=cache)
        made = (nominal_bytes(ctx.baseline.model, cand.bits), 0, 0.0, None)
        economics = _served(ctx, engine)
    else:
        scores, made = _torch_candidate(ctx, cand, prepared, reference, cache)
        economics = Economics("torch", True, None, None, None, None)  # fake quantization: quality only
    size, changed, quantize_seconds, path = made
    if cache is not None:
        cache.record_meta({"weight_bytes": size, "modules_changed": changed, "quantize_seconds": quantize_seconds,
                           "artifact": str(path) if path else None})
    gate = ctx.cfg.quality_gate
    metrics = model_metrics(scores, prepared, gate.metric, ctx.baseline.tokenizer)
    comparison = compare(base.metrics, metrics, scores, prepared, confidence=gate.confidence,
                         n_boot=gate.bootstrap_samples, seed=ctx.cfg.seed)
    return ModelResult(cand.label, cand, size, changed, metrics, scores, comparison, quantize_seconds,
                       economics, path)


Made = tuple[int, int, float, Path | None]  # weight bytes, modules changed, seconds to make, artifact


def _llamacpp_candidate(ctx: _Context, cand: CandidateConfig, prepared: PreparedSuite,
                        reference: list[torch.Tensor], cache: StoreCache | None) -> tuple[ModelScores, Made, Economics]:
    """llama.cpp quantizes the F32 GGUF; its own process evaluates and then serves the file."""
    step = ctx.progress(cand.label, 3)
    t0 = time.perf_counter()
    path = quantized_gguf(ctx.baseline, cand.type, ctx.calib if cand.imatrix else None)
    quantize_seconds = time.perf_counter() - t0
    step(1)
    with _engine_process(ctx, cand.label, path) as engine:
        scores, _ = evaluate(engine, prepared, reference, on_step=step, cache=cache)
    size, changed = path.stat().st_size, _quantized_tensors(path)
    return scores, (size, changed, quantize_seconds, path), _measured(ctx, cand.label, path, size)


def _torch_candidate(ctx: _Context, cand: CandidateConfig, prepared: PreparedSuite,
                     reference: list[torch.Tensor], cache: StoreCache | None) -> tuple[ModelScores, Made]:
    """A fake-quantized copy of the baseline, evaluated in this process on the torch engine."""
    calibrated = cand.needs_calibration
    model = ctx.baseline.model
    n_blocks = len(model.get_submodule(ctx.baseline.arch.blocks)) if calibrated else 1
    step = ctx.progress(cand.label, 2 + n_blocks)
    t0 = time.perf_counter()
    made = make_candidate(model, ctx.baseline.arch, cand, ctx.calib if calibrated else None,
                          seed=ctx.cfg.seed, on_block=lambda i: step(1))
    quantize_seconds = time.perf_counter() - t0
    if not calibrated:
        step(1)
    scores, _ = evaluate(ctx.torch_engine(made.model), prepared, reference, on_step=step, cache=cache)
    return scores, (made.weight_bytes, made.modules_changed, quantize_seconds, None)


def _engine_process(ctx: _Context, label: str, path: Path, **options: object) -> EngineProcess:
    """llama.cpp and torch both run in their own processes (defaults: the llama.cpp scoring
    configuration)."""
    defaults = {"n_ctx": _context_length(ctx)} if ctx.engine == "llamacpp" else {}
    return EngineProcess(ctx.engine, label=label, log=ctx.work / "logs" / f"{label}.log", path=str(path),
                         **(defaults | options))


def _context_length(ctx: _Context) -> int:
    """Enough positions for the longest window, prompt + generation, or benchmark request."""
    ev, econ = ctx.cfg.evaluation, ctx.cfg.economics
    return max(2048, ev.window_tokens + 1, econ.prompt_tokens + econ.new_tokens + 1)


def _measured(ctx: _Context, label: str, path: Path, size: int) -> Economics:
    """Speed and memory as served: a fresh engine process in its serving configuration (for
    llama.cpp: only the last position's logits, a context of one request) runs the fixed request
    mix at batch 1 and at each batch size up to serving.max_batch_size, and reports its own
    peak resident memory. `size`: bytes of weights read per generated token."""
    econ, kind = ctx.cfg.economics, ctx.engine
    if not econ.measure:
        return Economics(kind, False, path.stat().st_size if path.is_file() else None, None, None, None)
    # torch serves as plain PyTorch: the oneDNN-packed weights that speed up scoring are a second
    # copy of every linear (+540 MB peak RSS on the default model for 8-17% more throughput)
    options = ({"n_ctx": econ.prompt_tokens + econ.new_tokens + 1, "logits_all": False} if kind == "llamacpp"
               else {"max_batch_size": ctx.cfg.serving.max_batch_size, "onednn": False})
    with _engine_process(ctx, f"{label}-serving", path, **options) as engine:
        single, load = engine.measure(ctx.bench_prompts, econ.new_tokens, ctx.cfg.serving.max_batch_size)
        stats = engine.close()
    throughput = Throughput(**single)
    return Economics(kind, False, path.stat().st_size if path.is_file() else None, stats["peak_rss_bytes"],
                     throughput, roofline_fraction(throughput.decode_tokens_per_s, size, ctx.bandwidth),
                     tuple(LoadLevel(**level) for level in load))


def server_engine(serving: ServingConfig, baseline: Baseline) -> OpenAIEngine:
    return OpenAIEngine.from_config(serving, baseline.tokenizer, vocab_size=baseline.model.config.vocab_size)


def _servable(cfg: RunConfig, baseline: Baseline, prepared: PreparedSuite) -> tuple[PreparedSuite, list[str]]:
    """Probe every server once: if any gives no usable prompt log-probabilities, the tasks that
    need them are refused for the whole run (every model must see the same items) and only the
    generation tasks run."""
    servings = [cfg.serving] + [c.serving for c in cfg.resolved_candidates]
    problems = [p for s in servings if (p := server_engine(s, baseline).prompt_logprobs_problem)]
    if not problems or not (prepared.requests or prepared.windows):
        return prepared, []
    prepared, refused = generation_only(prepared)
    return prepared, [f"refused: {', '.join(refused) or 'perplexity/KLD windows'} (they need prompt "
                      f"log-probabilities): {problems[0]}; only the generation tasks ran"]


def _served(ctx: _Context, engine: OpenAIEngine) -> Economics:
    """Latency, time to first token and throughput of a server at each concurrency up to
    serving.max_batch_size, streamed; batch 1 gives the single-request numbers."""
    econ = ctx.cfg.economics
    if not econ.measure:
        return Economics("openai", False, None, None, None, None)
    levels = measure_load(engine, ctx.bench_prompts, econ.new_tokens, ctx.cfg.serving.max_batch_size)
    one = levels[0]
    prompt_tokens = sum(map(len, ctx.bench_prompts)) / len(ctx.bench_prompts)
    throughput = Throughput(prefill_tokens_per_s=prompt_tokens / one.ttft_s["p50"], decode_tokens_per_s=one.tokens_per_s,
                            latency_s=one.latency_s, new_tokens=one.new_tokens)
    load = tuple(LoadLevel(lv.concurrency, True, lv.latency_s, lv.tokens_per_s) for lv in levels)
    return Economics("openai", False, None, None, throughput, None, load)


def nominal_bytes(model: torch.nn.Module, bits: int) -> int:
    """Weights of a served model whose files quantgate does not see: parameters x bits / 8
    (nominal; it orders candidates by aggressiveness, it is not a measured size)."""
    return sum(p.numel() for p in model.parameters()) * bits // 8


def with_costs(cfg: RunConfig, base: ModelResult, candidates: list[ModelResult]) -> None:
    """Cost at volume for every model whose speed was measured, against the baseline's (in
    place). Simulated candidates run at the baseline's speed: their cost is the baseline's."""
    econ, ref = cfg.economics, base.economics
    if econ.hardware_cost_per_hour is None or econ.tokens_per_month is None or ref is None or not ref.load:
        return
    for m in [base, *candidates]:
        e = m.economics
        simulated = e is None or e.simulated
        tps = ref.tokens_per_s_under_load if simulated else e.tokens_per_s_under_load
        cost = cost_at_volume(tps, ref.tokens_per_s_under_load, cost_per_hour=econ.hardware_cost_per_hour,
                              tokens_per_month=econ.tokens_per_month, min_saving=econ.min_monthly_saving)
        if m is base:
            cost = dataclasses.replace(cost, worth_it=None, note="")  # the reference: nothing to save
        elif simulated:
            cost = dataclasses.replace(cost, worth_it=False, note="simulated: fake quantization runs at the "
                                       "baseline's speed, so no saving is measured; serve it on an engine with "
                                       "integer kernels (serving.engine: llamacpp) to price it")
        m.economics = dataclasses.replace(e or Economics(cfg.serving.engine, True, None, None, None, None), cost=cost)


def _quantized_tensors(path: Path) -> int:
    """Tensors of a GGUF file stored in a quantized type; zero means llama.cpp changed nothing."""
    counts = tensor_types(path)
    changed = sum(n for t, n in counts.items() if t not in ("F32", "F16", "BF16"))
    if not changed:
        raise NothingHappened(f"{path.name}: llama.cpp stored every tensor unquantized")
    return changed


def _noise_floor(ctx: _Context, prepared: PreparedSuite, reference: list[torch.Tensor]) -> NoiseFloor | None:
    """Serving engine vs a second path over the text windows. llama.cpp: against PyTorch float32
    (conversion and kernels). torch: against itself run one window at a time with the default
    GEMM (batching and kernel choice), the floor its own arithmetic sets."""
    windows = prepared.windows[: prepared.n_text_windows]
    if not windows:  # e.g. a server without prompt log-probabilities
        return None
    if ctx.engine in ("llamacpp", "openai"):
        other, what = TorchEngine(ctx.baseline.model), "torch float32"
    else:
        other, what = TorchEngine(ctx.baseline.model, max_batch_size=1, onednn=False), "torch, one window per pass"
    kld, agree = [], []
    for ref, lp in zip(reference, other.token_logprobs(windows)):
        kld.append(kl_divergence(lp, ref))
        agree.append((ref.argmax(-1) == lp.argmax(-1)).numpy())
    return NoiseFloor(ctx.engine, what, np.concatenate(kld), np.concatenate(agree))


def _crashed_verdict(name: str, error: str) -> CandidateVerdict:
    return CandidateVerdict(name, 0, (failing(RuleKind.ENGINE, f"engine ran to completion ({error})"),))
