"""The report's plots, from a run's record (quantgate.record) to SVG strings.

Each function returns None when the run holds nothing to draw (e.g. no economics, no candidate
with a bit width), so the page can say so instead of drawing an empty frame.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quantgate.record import CandidateRecord, KldHistogram, ModelRecord, RunRecord
from quantgate.report import svg, view
from quantgate.report.svg import Axis, Bars, Line, Point, Rule, Scatter, Whiskers

RECOVERY = "#2563eb"  # blue
TOP1 = "#7c3aed"  # violet
FLIPS = "#dc2626"  # red
PASS = "#16a34a"
FAIL = "#dc2626"
BASELINE = "#475569"
KLD_BARS = "#0ea5e9"
DASHES = ("", "7 4", "2 3", "10 3 2 3")  # line style per method group on the bits plot
MARKERS = ("circle", "square", "triangle", "diamond")
HALF = 550  # px: two plots side by side in the page's width


# ---- quality vs bit width ------------------------------------------------------------------

def bit_groups(candidates: Sequence[CandidateRecord]) -> dict[str, list[CandidateRecord]]:
    """Candidates with a bit width, grouped into curves: by method; by method and the settings
    that make a family (group size, importance matrix, act-order) when one method has two
    candidates at the same width; by name when that still collides. Each group sorted by bits,
    descending."""
    cands = [c for c in candidates if c.bits]
    for key in (lambda c: c.method, _family, lambda c: c.name):
        groups: dict[str, list[CandidateRecord]] = defaultdict(list)
        for c in cands:
            groups[key(c)].append(c)
        if all(len({c.bits for c in g}) == len(g) for g in groups.values()):
            break
    return {k: sorted(g, key=lambda c: -c.bits) for k, g in groups.items()}


def _family(c: CandidateRecord) -> str:
    """"rtn g64", "gguf imatrix", "gptq g128 act-order": the method and what is not the width."""
    settings = c.settings or {}  # the candidate's config as JSON: flags only some methods have
    flags = [word for word, key in (("imatrix", "imatrix"), ("act-order", "act_order")) if settings.get(key)]
    return " ".join([c.method, *([f"g{c.group_size}"] if c.group_size else []), *flags])


@dataclass(frozen=True)
class Metric:
    """One curve of the bits plot: what it reads from a candidate dict and how it is labeled."""
    label: str
    color: str
    value: Callable[[CandidateRecord], float | None]
    interval: Callable[[CandidateRecord], Sequence[float | None] | None]
    short: str  # the word after the value written beside a silent-loss candidate's point


METRICS = (
    Metric("accuracy recovery", RECOVERY, lambda c: c.vs_baseline.recovery,
           lambda c: c.vs_baseline.overall and c.vs_baseline.overall.recovery_ci, "recovery"),
    Metric("top-1 token agreement", TOP1, lambda c: c.vs_baseline.top1_agreement, lambda c: None, "top-1"),
    Metric("answers flipped", FLIPS, lambda c: c.vs_baseline.flips.rate,
           lambda c: c.vs_baseline.overall and c.vs_baseline.overall.flip_rate_ci, "flipped"),
)


def bits_plot(results: RunRecord) -> str | None:
    """Recovery, top-1 agreement and flip rate against bit width on one axis: where a gate on
    accuracy alone would stop noticing. Candidates with a silent loss get their values written."""
    groups = bit_groups(results.candidates)
    if not groups:
        return None
    loud = set(view.silent_losses(results))
    lines = [_metric_line(m, gname, gi, g, loud, len(groups) > 1)
             for m in METRICS for gi, (gname, g) in enumerate(groups.items())]
    lines = [line for line in lines if line.points]
    if not lines:
        return None
    bits = sorted({c.bits for g in groups.values() for c in g})
    top = max([1.0, *(p.y for line in lines for p in line.points)])
    subtitle = ("Accuracy recovery clears the floor while answers flip: " + ", ".join(sorted(loud))
                if loud else "Higher is better for recovery and agreement; lower is better for flips")
    return svg.line_plot(
        "plot-bits", "Quality vs bit width", lines,
        Axis("weight bit width (more compression →)", log=True, ticks=tuple(bits), fmt=lambda v: f"{v:g}-bit",
             reverse=True),
        Axis("share of items / tokens", fmt=svg.percent, lo=0.0, hi=top + 0.04, ticks=(0, 0.2, 0.4, 0.6, 0.8, 1.0)),
        rules=_gate_rules(results), subtitle=subtitle, height=420)


def _metric_line(metric: Metric, gname: str, gi: int, group: list[CandidateRecord], loud: set[str],
                 named: bool) -> Line:
    points = []
    for c in group:
        v = metric.value(c)
        if v is None:
            continue
        tip = f"{c.name} ({c.bits}-bit): {metric.label} {v:.1%} {view.interval(metric.interval(c), as_pct=True)}"
        points.append(Point(c.bits, v, tip.strip(), f"{v:.1%} {metric.short}" if c.name in loud else ""))
    name = f"{metric.label} · {gname}" if named else metric.label
    return Line(name, tuple(points), metric.color, DASHES[gi % len(DASHES)], MARKERS[gi % len(MARKERS)])


def _gate_rules(results: RunRecord) -> list[Rule]:
    flips = results.quality_gate.max_flip_rate
    ceiling = [Rule(flips, f"gate: flips ≤ {flips:.0%}", FLIPS)] if flips is not None else []
    return [Rule(1.0, "baseline = 100%", svg.MUTED, dash="2 3"), *_floor_rule(results), *ceiling]


def _floor_rule(results: RunRecord) -> list[Rule]:
    floor = results.quality_gate.min_acceptable
    return [Rule(floor, f"gate: recovery ≥ {floor:.0%}", RECOVERY)] if floor is not None else []


# ---- quality vs memory and vs speed (Pareto) -----------------------------------------------

def _status_groups(results: RunRecord, x_of: Callable[[ModelRecord], float | None]) -> list[Scatter]:
    """Baseline, passing, recommended and failing models as separate scatter groups, at
    (x_of(model), recovery); models whose x or recovery is missing are left out."""
    rec = results.recommended
    buckets: dict[str, list[Point]] = {"baseline": [], "recommended": [], "holds the gate": [], "fails the gate": []}
    for m in results.models:
        x = x_of(m)
        y = m.vs_baseline.recovery if isinstance(m, CandidateRecord) else 1.0
        if x is None or y is None:
            continue
        key = ("baseline" if not isinstance(m, CandidateRecord) else "recommended" if m.name == rec
               else "holds the gate" if m.gate.passed else "fails the gate")
        buckets[key].append(Point(x, y, f"{m.name}: recovery {y:.1%}, {svg.number(x)}", m.name))
    style = {"baseline": (BASELINE, "square"), "recommended": (PASS, "diamond"),
             "holds the gate": (PASS, "circle"), "fails the gate": (FAIL, "circle")}
    return [Scatter(k, tuple(pts), *style[k], size=6 if k == "recommended" else 5) for k, pts in buckets.items() if pts]


RECOVERY_AXIS = Axis("accuracy recovery (candidate / baseline)", fmt=svg.percent)


def memory_plot(results: RunRecord) -> str:
    groups = _status_groups(results, lambda m: m.weight_bytes / 1e6)
    return svg.scatter_plot("plot-memory", "Quality vs memory", groups, Axis("weight MB", lo=0.0),
                            RECOVERY_AXIS, x_better="low", rules=_floor_rule(results), width=HALF,
                            subtitle="Up and to the left is better; the dotted line is the Pareto front")


def speed_plot(results: RunRecord) -> str | None:
    """None unless at least two models have a measured (not simulated) decode speed."""
    groups = _status_groups(results, view.decode_speed)
    if sum(len(g.points) for g in groups) < 2:
        return None
    skipped = [m.name for m in results.models if view.simulated(m)]
    note = f"Not shown ({view.SIMULATED}): {', '.join(skipped)}" if skipped else \
        "Up and to the right is better; the dotted line is the Pareto front"
    return svg.scatter_plot("plot-speed", "Quality vs decode speed", groups, Axis("decode tokens/s (batch 1)", lo=0.0),
                            RECOVERY_AXIS, x_better="high", rules=_floor_rule(results), width=HALF,
                            subtitle=note)


def load_plot(results: RunRecord) -> str | None:
    """Tokens/s against batch size per model with a measured (not simulated) load sweep."""
    lines = []
    for i, m in enumerate(m for m in results.models if view.decode_speed(m) is not None):
        load = sorted(m.economics.load, key=lambda r: r.batch_size)
        pts = tuple(Point(r.batch_size, r.tokens_per_s, f"{m.name} batch {r.batch_size}: "
                          f"{r.tokens_per_s:,.1f} tokens/s") for r in load if r.tokens_per_s is not None)
        if pts:
            color = BASELINE if m is results.baseline else PALETTE[i % len(PALETTE)]
            lines.append(Line(m.name, pts, color, marker=MARKERS[i % len(MARKERS)]))
    if not lines:
        return None
    batches = sorted({p.x for line in lines for p in line.points})
    return svg.line_plot("plot-load", "Throughput under load", lines,
                         Axis("batch size", log=len(batches) > 1, ticks=tuple(batches)),
                         Axis("tokens/s", lo=0.0), subtitle="Generated tokens per second at each batch size",
                         width=HALF, height=300)


PALETTE = ("#2563eb", "#16a34a", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d", "#dc2626")


# ---- KLD -----------------------------------------------------------------------------------

def kld_overview(results: RunRecord) -> str | None:
    """Per candidate: KLD mean (circle) and p99 (diamond) with their intervals, log scale; the
    engine's noise floor as a reference line when measured. Values <= 0 cannot sit on the axis."""
    cands = results.candidates
    n = len(cands)
    marks: dict[str, list[Point]] = {"KLD mean": [], "KLD p99": []}
    spans = []
    for i, c in enumerate(cands):
        vs, y = c.vs_baseline, n - 1 - i  # first candidate on top
        for (label, out), (v, iv) in zip(marks.items(), ((vs.kld_mean, vs.kld_mean_ci), (vs.kld_p99, vs.kld_p99_ci))):
            if v is None or v <= 0:
                continue
            ci = view.interval(iv, as_sig=True)
            out.append(Point(v, y, f"{c.name}: {label} {v:.3g} {ci}".strip()))
            if iv and iv[0] is not None and iv[1] is not None and iv[0] > 0:
                spans.append((iv[0], iv[1], y, f"{c.name}: {label} interval {ci}"))
    if not marks["KLD mean"] and not marks["KLD p99"]:
        return None
    names = [c.name for c in cands]
    y_axis = Axis("", ticks=tuple(range(n)), fmt=lambda v: names[n - 1 - round(v)], lo=-0.6, hi=n - 0.4)
    layers = [*_noise_rules(results), Whiskers("interval", tuple(spans), "#94a3b8"),
              Scatter("KLD mean", tuple(marks["KLD mean"]), KLD_BARS), Scatter("KLD p99", tuple(marks["KLD p99"]), FLIPS, "diamond")]
    return svg.figure("plot-kld", "KL divergence from the baseline, per token", Axis("KLD (nats, log scale)", log=True),
                      y_axis, layers, height=96 + 44 * n, subtitle="Mean and 99th percentile over the eval tokens")


def _noise_rules(results: RunRecord) -> list[Rule]:
    v = results.noise_floor and results.noise_floor.kld_mean
    return [Rule(v, "engine noise floor (mean)", BASELINE, axis="x")] if v and v > 0 else []


def kld_histograms(results: RunRecord) -> list[str]:
    """One histogram per candidate whose vs_baseline holds kld_hist = {edges, counts}, as the
    share of tokens per bin, with its mean and p99 marked."""
    out = []
    for i, c in enumerate(results.candidates):
        hist = c.vs_baseline.kld_hist
        if hist and sum(hist.counts) > 0:
            out.append(_histogram(f"plot-kld-hist-{i}", c, hist, results))
    return out


def _histogram(plot_id: str, c: CandidateRecord, hist: KldHistogram, results: RunRecord) -> str:
    edges, counts = hist.edges, hist.counts
    total = sum(counts)
    share = tuple(k / total for k in counts)
    tips = tuple(f"KLD {edges[j]:.3g}–{edges[j + 1]:.3g}: {counts[j]} tokens ({share[j]:.1%})" for j in range(len(counts)))
    log = edges[0] > 0 and edges[-1] / edges[0] >= 100
    vs = c.vs_baseline
    marks = [Rule(v, f"{name} {v:.3g}", color, axis="x")
             for name, v, color in (("mean", vs.kld_mean, RECOVERY), ("p99", vs.kld_p99, FLIPS))
             if v is not None and (v > 0 or not log)]
    noise = [r for r in _noise_rules(results) if r.value > 0 or not log]
    return svg.histogram(plot_id, f"{c.name}: per-token KLD", Bars("", tuple(edges), share, KLD_BARS, tips),
                         Axis("KLD (nats" + (", log scale)" if log else ")"), log=log),
                         Axis("share of tokens", fmt=svg.percent, lo=0.0), [*marks, *noise], width=HALF, height=260)
