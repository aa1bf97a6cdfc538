"""`quantgate check`: what a run of a config would do, without doing it.

Every input is read and checked as `quantgate run` checks it before any model work (the config,
the engine's availability, the model's files, the eval set, the calibration text, the gate's task
names), then the plan says what will be loaded, made, evaluated and measured, on which engine,
with a rough time estimate. Nothing is loaded into a model, quantized, scored or written, and no
user scorer is imported: a `scorer: module:function` is named with a warning (the run imports
that module and calls the function on every answer: it runs your code).

The time estimate is arithmetic on counts, not a measurement: tokens per model are the eval
set's characters / CHARS_PER_TOKEN (each choice item's context once, plus its options), the
perplexity windows, and the generated tokens; each engine's entry states its rough speed on the
default 135M model on a 2-core CPU (engines/registry.py Speed), scaled by the model's parameter
count. Expect it to be off by a factor of two either way.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from quantgate.config import RunConfig, check_supported
from quantgate.engines import registry as backends
from quantgate.errors import UserError
from quantgate.evals.datasets import ChoiceItem, ClozeItem, EvalSuite
from quantgate.methods.registry import MethodConfig

CHARS_PER_TOKEN = 4.0  # English text in a BPE vocabulary, roughly
LOAD_SECONDS = 3.0  # loading a cached model of REFERENCE_PARAMS
CONVERT_SECONDS = 40.0  # a GGUF file dequantized and cached, the first time only
MAKE_SECONDS = 1.5  # making a candidate without calibration (rtn, magnitude pruning) at REFERENCE_PARAMS
CALIBRATION_PASSES = 3  # calibration tokens run through the model per calibrated candidate (capture, stats, next)


@dataclass(frozen=True)
class Step:
    """One thing the run will do, and roughly how long it takes (None: cannot say)."""

    what: str
    seconds: float | None


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    model: str  # what is loaded, in words
    params: float | None  # parameter count, when readable from the files
    engine: str  # serving engine, in words
    candidates: tuple[tuple[str, str, str], ...]  # (label, scheme, how it is made)
    eval_set: str
    tasks: dict[str, int]  # task -> items
    tokens_per_model: float  # estimated tokens scored per model (prompt side)
    generated_per_model: float  # estimated tokens generated per model
    steps: tuple[Step, ...]
    results_dir: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def items(self) -> int:
        return sum(self.tasks.values())

    @property
    def seconds(self) -> float | None:
        """The whole run's estimate; None when any step's is unknown (a server's speed)."""
        times = [s.seconds for s in self.steps]
        return None if any(t is None for t in times) else float(sum(times))


def make_plan(cfg: RunConfig, results_dir: Path | None = None) -> Plan:
    """Check every input of `cfg` as the run would, and plan it (no model work). `results_dir`:
    where the run's directories would go, when not the config's."""
    from quantgate.api import check_results_root

    check_results_root(Path(results_dir or cfg.results_dir))
    from quantgate.gate import check_tasks
    from quantgate.evals.datasets import load_suite

    check_supported(cfg)
    ev, gate = cfg.evaluation, cfg.quality_gate
    suite = load_suite(gate, limit=ev.limit, cloze_items=ev.cloze_items, seed=cfg.seed, import_scorers=False)
    check_tasks(gate, suite.tasks)
    model, params = describe_model(cfg.model.base, cfg.precision)
    warnings = [*scorer_warnings(cfg), *_calibration_checked(cfg, suite)]
    if len(suite.items) < gate.min_items:
        warnings.append(f"{len(suite.items)} eval items < quality_gate.min_items {gate.min_items}: the run will "
                        "measure, but call no candidate shippable")
    tokens, generated = suite_tokens(suite, cfg)
    steps = _steps(cfg, model, params, tokens, generated)
    made = tuple((c.label, c.scheme, _how_made(c, cfg)) for c in cfg.resolved_candidates)
    return Plan(cfg, model, params, _engine_words(cfg), made, suite.name, suite.tasks, tokens, generated,
                tuple(steps), str(results_dir or cfg.results_dir), tuple(warnings))


def scorer_warnings(cfg: RunConfig) -> list[str]:
    """One warning per user scorer: the run imports its module and runs its function."""
    out = []
    for e in cfg.quality_gate.eval_sets or ():
        if e.scorer:
            module = e.scorer.partition(":")[0]
            spec = importlib.util.find_spec(module.partition(".")[0])
            where = spec.origin if spec and spec.origin else "not found on the Python path"
            out.append(f"eval set {e.path}: scorer '{e.scorer}' imports and runs your code (module {module}: "
                       f"{where}) on every generated answer; quantgate does not sandbox it")
    return out


def _calibration_checked(cfg: RunConfig, suite: EvalSuite) -> list[str]:
    """The calibration text read and checked against the eval set, as the run does first."""
    if not cfg.needs_calibration:
        return []
    from quantgate.methods.calibrate import calibration_text, check_disjoint

    text, _ = calibration_text(cfg.calibration)
    check_disjoint(text, suite.texts())
    return []


def describe_model(base: str, precision: str = "fp32") -> tuple[str, float | None]:
    """What model.base loads in `precision` (models/load.PRECISIONS), in words, and its parameter
    count (None: not readable without downloading it). The files are checked as the loader checks
    them (models/files.py)."""
    from quantgate.models import files
    from quantgate.models.load import PACKAGED, PRECISIONS, locate_packaged

    dtype = str(PRECISIONS[precision]).removeprefix("torch.")

    if base in PACKAGED:
        path = locate_packaged(base)
        return f"{PACKAGED[base].description} (packaged: {path.name})", files.gguf_params(path)
    path = Path(base)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model.base: GGUF file not found: {base}")
        size = path.stat().st_size / 1e6
        return f"GGUF file {path} ({size:,.0f} MB), dequantized to {dtype}", files.gguf_params(path)
    if path.is_dir():
        files.check_hf_dir(path)
        return f"Hugging Face directory {path}, as {dtype}", files.safetensors_params(path)
    if path.exists() or base.startswith((".", "/")):
        raise UserError(f"model.base: '{base}' is neither a directory nor a .gguf file")
    return f"hub id {base} (needs the network or a filled Hugging Face cache)", None


def suite_tokens(suite: EvalSuite, cfg: RunConfig) -> tuple[float, float]:
    """(tokens scored, tokens generated) per model, estimated from characters."""
    chars, generated = 0.0, 0.0
    for item in suite.items:
        if isinstance(item, ChoiceItem):  # (engines score a shared context once)
            chars += sum(map(len, set(item.contexts))) + sum(map(len, item.continuations))
        elif isinstance(item, ClozeItem):
            chars += len(item.context) + len(item.continuation)
        else:
            chars += len(item.prompt)
            generated += suite.spec(item.task).max_new_tokens
    windows = cfg.evaluation.ppl_windows * cfg.evaluation.window_tokens
    return chars / CHARS_PER_TOKEN + windows, generated


def _steps(cfg: RunConfig, model: str, params: float | None, tokens: float, generated: float) -> list[Step]:
    entry = backends.entry(cfg.serving.engine)
    speed = entry.speed and entry.speed.scaled(params)
    maker = backends.BACKENDS[backends.SIMULATOR].speed.scaled(params)  # candidates are made in PyTorch

    def scoring(label: str, on: backends.Speed | None = speed) -> Step:
        t = None if on is None else tokens / on.score + generated / on.decode
        return Step(f"score {label}: ~{tokens:,.0f} tokens" + (f", generate ~{generated:,.0f}" if generated else ""), t)

    econ = cfg.economics
    levels = len(_batch_levels(cfg.serving.max_batch_size))
    timed = None if speed is None else econ.rounds * (1 + levels) * econ.requests * econ.new_tokens / speed.decode
    startup = None if cfg.serving.base_url is not None else entry.startup  # servers the run starts itself
    order = "interleaved" if startup is None else "back-to-back"  # (it starts one server at a time)
    speed_step = (f"'s speed: {econ.rounds} {order} rounds of {econ.requests} requests × {econ.new_tokens} "
                  f"new tokens at batch 1, then at {levels} load levels")

    def started(label: str) -> list[Step]:
        return [] if startup is None else [Step(f"start a {entry.name} server for {label} (one at a time)", startup)]

    def measured(label: str) -> Step:  # a server started here is started again for its rounds
        again = "" if startup is None else " (its server started again)"
        return Step(f"measure {label}{speed_step}{again}", timed and timed + (startup or 0.0))

    steps = [Step(f"load {model}", LOAD_SECONDS * maker.scale), *started("the baseline"), scoring("the baseline")]
    if econ.measure:
        steps.append(measured("the baseline"))
    # The checkpoint in float32 beside the baseline (Backend.full_precision): only where the run
    # serves it itself; someone else's server (base_url) has no float32 twin quantgate can start.
    if cfg.precision != "fp32" and cfg.serving.base_url is None:
        steps.extend([Step("load the checkpoint again in float32", LOAD_SECONDS * maker.scale),
                      *started(f"the float32 checkpoint beside the {cfg.precision} baseline"),
                      scoring("the float32 checkpoint")])
    for c in cfg.resolved_candidates:
        steps.append(Step(f"make {c.label}: {_how_made(c, cfg)}", _make_seconds(c, cfg, maker)))
        if entry.why_unservable(c) is not None:  # (serving.unservable: simulate) quality on torch only
            steps.append(scoring(f"{c.label} on {backends.SIMULATOR}, not servable on {entry.name}", maker))
            continue
        steps.extend(started(c.label) if c.artifact != "served" and not c.is_baseline else [])
        steps.append(scoring(c.label))
        # fake quantization has no speed of its own; the A/A check is the baseline served again
        if econ.measure and (cfg.serving.engine != backends.SIMULATOR or c.is_baseline):
            steps.append(measured(c.label))
    return steps


def _batch_levels(max_batch_size: int) -> list[int]:
    from quantgate.economics import batch_sizes

    return list(batch_sizes(max_batch_size))


def _make_seconds(c: MethodConfig, cfg: RunConfig, maker: backends.Speed) -> float:
    if c.artifact in ("served", "baseline"):  # someone's server, or the baseline itself (the A/A check)
        return 0.0
    samples, seq_len = cfg.calibration.samples, cfg.calibration.seq_len
    calib = samples * seq_len * CALIBRATION_PASSES + c.training_tokens(samples, seq_len) if c.needs_calibration else 0
    return MAKE_SECONDS * maker.scale + calib / maker.score


def _how_made(c: MethodConfig, cfg: RunConfig) -> str:
    if c.artifact == "served":
        return f"served by {c.serving.base_url} (declared {c.scheme})"
    calib = cfg.calibration
    text = "" if not c.needs_calibration else (
        f", calibrated on {calib.samples} × {calib.seq_len} tokens of {calib.data} text "
        f"({', '.join(sorted(c.calibration_needs()))})")
    return f"{c.method} → {c.scheme}{text}"


def _engine_words(cfg: RunConfig) -> str:
    s = cfg.serving
    where = f" at {s.base_url}" if s.base_url else ""
    extra = "; candidates it cannot serve are simulated on torch (quality only)" if s.unservable == "simulate" else ""
    return f"{s.engine}{where}, served at batch sizes up to {s.max_batch_size}{extra}"
