"""Tiny plotting helpers: data in, one self-contained SVG string out (no scripts, no fonts, no
external references), with axes, ticks, gridlines, a legend and hover tooltips.

A figure is an x Axis, a y Axis and a list of layers (Line, Scatter, Bars, Whiskers, Rule). Every
data mark (a point, a bar, an interval) carries class="mark" and a <title> tooltip, so a browser
test can count what was drawn. All values a layer holds must be finite; log axes need values > 0.
Callers drop missing values (None/NaN) before building layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from html import escape

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"
GRID = "#e5e7eb"
INK = "#1f2937"
MUTED = "#6b7280"
CHAR_PX = 7.0  # average width of a 12px sans-serif character, for layout estimates
LEGEND_ROW = 20  # px per legend row


def number(v: float) -> str:
    """A tick label: up to 4 significant digits, no trailing zeros."""
    return f"{v:.4g}"


def percent(v: float) -> str:
    return f"{v:.0%}" if abs(v * 100 - round(v * 100)) < 1e-9 else f"{v:.1%}"


@dataclass(frozen=True)
class Axis:
    label: str
    log: bool = False  # log10 scale; every value on it must be > 0
    fmt: Callable[[float], str] = number
    ticks: tuple[float, ...] | None = None  # None: chosen from the data range
    lo: float | None = None  # fixed limits; None: from the data, padded
    hi: float | None = None
    reverse: bool = False  # largest value at the left (x) or bottom (y)


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    tip: str  # hover text
    label: str = ""  # drawn beside the mark when not empty


@dataclass(frozen=True)
class Line:
    """Points joined in the given order, each point a mark."""
    name: str
    points: tuple[Point, ...]
    color: str
    dash: str = ""  # SVG stroke-dasharray, "" = solid
    marker: str = "circle"  # circle | square | diamond | triangle


@dataclass(frozen=True)
class Scatter:
    name: str
    points: tuple[Point, ...]
    color: str
    marker: str = "circle"
    size: float = 5.0


@dataclass(frozen=True)
class Bars:
    """A histogram: bar i spans edges[i]..edges[i+1] with height counts[i]; len(edges) = len(counts) + 1."""
    name: str
    edges: tuple[float, ...]
    counts: tuple[float, ...]
    color: str
    tips: tuple[str, ...] = ()  # one per bar; default "lo–hi: count"


@dataclass(frozen=True)
class Whiskers:
    """Horizontal intervals: (lo, hi, y, tip) each; drawn as a line with end caps."""
    name: str
    spans: tuple[tuple[float, float, float, str], ...]
    color: str


@dataclass(frozen=True)
class Rule:
    """A reference line across the plot at `value` on `axis` ("x" or "y"), labeled inside the plot."""
    value: float
    label: str
    color: str = MUTED
    axis: str = "y"
    dash: str = "6 4"


Layer = Line | Scatter | Bars | Whiskers | Rule


@dataclass(frozen=True)
class Scale:
    """Maps data [lo, hi] to pixels [a, b] (linear or log10)."""
    lo: float
    hi: float
    a: float
    b: float
    log: bool = False

    def _t(self, v: float) -> float:
        return math.log10(v) if self.log else v

    def __call__(self, v: float) -> float:
        lo, hi = self._t(self.lo), self._t(self.hi)
        return self.a + (self._t(v) - lo) / (hi - lo) * (self.b - self.a)


@dataclass(frozen=True)
class Frame:
    width: float
    height: float
    left: float
    right: float
    top: float
    bottom: float
    x: Scale
    y: Scale

    @property
    def plot_right(self) -> float:
        return self.width - self.right

    @property
    def plot_bottom(self) -> float:
        return self.height - self.bottom


# ---- ticks and ranges ---------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 x 10^k steps) covering [lo, hi] with about `count` ticks.
    Requires lo < hi. The first tick is <= lo and the last >= hi."""
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    start = math.floor(lo / step + 1e-9) * step
    n = math.ceil((hi - start) / step - 1e-9)
    return [_round(start + i * step, step) for i in range(n + 1)]


def _round(v: float, step: float) -> float:
    digits = max(0, -math.floor(math.log10(step)) + 2)
    return round(v, digits)


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten within [lo, hi] (requires 0 < lo < hi); with 1-2-5 steps when the range
    spans fewer than three decades."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1,) if math.log10(hi / lo) >= 3 else (1, 2, 5)
    ticks = [m * 10.0 ** e for e in range(a, b + 1) for m in mults]
    inside = [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]
    return inside if len(inside) >= 2 else [10.0 ** a, 10.0 ** b]


def _extent(values: Sequence[float], axis: Axis) -> tuple[float, float, list[float]]:
    """(lo, hi, ticks) for the axis: fixed limits win; else the data range (explicit ticks
    included) padded 6% on each side, in log space on a log axis. Ticks: the axis's own, else
    round values inside the range."""
    vals = [v for v in values if math.isfinite(v) and (v > 0 or not axis.log)] + list(axis.ticks or ())
    t = (lambda v: math.log10(v)) if axis.log else (lambda v: v)
    inv = (lambda v: 10 ** v) if axis.log else (lambda v: v)
    lo = t(axis.lo) if axis.lo is not None else t(min(vals, default=1.0))
    hi = t(axis.hi) if axis.hi is not None else t(max(vals, default=10.0 if axis.log else 1.0))
    if lo >= hi:  # one value: a unit-wide range around it
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.06
    lo, hi = inv(lo if axis.lo is not None else lo - pad), inv(hi if axis.hi is not None else hi + pad)
    if axis.ticks:
        return lo, hi, list(axis.ticks)
    ticks = log_ticks(lo, hi) if axis.log else nice_ticks(lo, hi)
    return lo, hi, [v for v in ticks if lo - 1e-12 <= v <= hi * (1 + 1e-12) + 1e-12]


def _values(layer: Layer, axis: str) -> list[float]:
    if isinstance(layer, (Line, Scatter)):
        return [p.x if axis == "x" else p.y for p in layer.points]
    if isinstance(layer, Bars):
        return list(layer.edges) if axis == "x" else [0.0, *layer.counts]
    if isinstance(layer, Whiskers):
        return [v for lo, hi, y, _ in layer.spans for v in ((lo, hi) if axis == "x" else (y,))]
    return [layer.value] if layer.axis == axis else []


# ---- drawing -------------------------------------------------------------------------------

def _marker(kind: str, x: float, y: float, size: float, color: str, tip: str, extra: str = "") -> str:
    t = f"<title>{escape(tip)}</title>"
    if kind == "ring":  # the Pareto front's highlight around a data mark, not a mark itself
        return (f'<circle class="front" fill="none" stroke="{color}" stroke-width="1.5" cx="{x:.1f}" '
                f'cy="{y:.1f}" r="{size + 4:.1f}">{t}</circle>')
    common = f'class="mark" fill="{color}" stroke="#fff" stroke-width="1.5"{extra}'
    if kind == "circle":
        return f'<circle {common} cx="{x:.1f}" cy="{y:.1f}" r="{size:.1f}">{t}</circle>'
    if kind == "square":
        s = size * 0.9
        return f'<rect {common} x="{x - s:.1f}" y="{y - s:.1f}" width="{2 * s:.1f}" height="{2 * s:.1f}">{t}</rect>'
    s = size * 1.3
    shape = (f"M{x:.1f},{y - s:.1f} L{x + s:.1f},{y:.1f} L{x:.1f},{y + s:.1f} L{x - s:.1f},{y:.1f} Z" if kind == "diamond"
             else f"M{x:.1f},{y - s:.1f} L{x + s:.1f},{y + s * 0.8:.1f} L{x - s:.1f},{y + s * 0.8:.1f} Z")
    return f'<path {common} d="{shape}">{t}</path>'


def _label(x: float, y: float, text: str, color: str = INK, anchor: str = "start") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" fill="{color}" font-size="11" text-anchor="{anchor}" '
            f'paint-order="stroke" stroke="#fff" stroke-width="3">{escape(text)}</text>')


def _draw(layer: Layer, f: Frame, k: int) -> str:
    """One layer's marks; `k` numbers the x-axis rules so their labels stack instead of overlap."""
    if isinstance(layer, Line):
        path = " ".join(f"{'M' if i == 0 else 'L'}{f.x(p.x):.1f},{f.y(p.y):.1f}" for i, p in enumerate(layer.points))
        dash = f' stroke-dasharray="{layer.dash}"' if layer.dash else ""
        line = f'<path d="{path}" fill="none" stroke="{layer.color}" stroke-width="2.2"{dash}/>'
        return line + "".join(_marker(layer.marker, f.x(p.x), f.y(p.y), 4.5, layer.color, p.tip) for p in layer.points)
    if isinstance(layer, Scatter):
        return "".join(_marker(layer.marker, f.x(p.x), f.y(p.y), layer.size, layer.color, p.tip) for p in layer.points)
    if isinstance(layer, Bars):
        return _bars(layer, f)
    if isinstance(layer, Whiskers):
        return "".join(_whisker(s, f, layer.color) for s in layer.spans)
    return _rule(layer, f, k)


def _labels(layers: Sequence[Layer], f: Frame) -> str:
    """The points' labels, drawn last: each at the first of four spots around its mark (right
    above, right below, left above, left below) that stays inside the figure and clear of every
    mark and of the labels already placed; the first spot when none is free."""
    pointed = [(layer, layer.size if isinstance(layer, Scatter) else 4.5) for layer in layers
               if isinstance(layer, (Line, Scatter))]
    placed = [(f.x(p.x) - s, f.y(p.y) - s, 2 * s, 2 * s) for layer, s in pointed for p in layer.points]  # the marks
    out = []
    for layer, size in pointed:
        for p in (p for p in layer.points if p.label):
            x, y, w, h = f.x(p.x), f.y(p.y), CHAR_PX * 0.92 * len(p.label), 13.0
            spots = [(x + size + 3, y - size - 2 - h), (x + size + 3, y + size + 2), (x - size - 3 - w, y - size - 2 - h),
                     (x - size - 3 - w, y + size + 2)]
            fits = [b for b in spots if 0 <= b[0] and b[0] + w <= f.width and f.top - 14 <= b[1]
                    and b[1] + h <= f.plot_bottom and not any(_overlap((*b, w, h), q) for q in placed)]
            bx, by = (fits or spots)[0]
            placed.append((bx, by, w, h))
            out.append(_label(bx, by + h - 3, p.label, _darker(layer.color)))
    return "".join(out)


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _darker(color: str) -> str:
    """A label's colour: the series colour at 70% brightness (for contrast on white)."""
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(c * 0.7):02x}" for c in (r, g, b))


def _bars(b: Bars, f: Frame) -> str:
    out = []
    for i, count in enumerate(b.counts):
        if count <= 0:
            continue
        (x0, x1), y = sorted((f.x(b.edges[i]), f.x(b.edges[i + 1]))), f.y(count)
        tip = b.tips[i] if b.tips else f"{number(b.edges[i])}–{number(b.edges[i + 1])}: {number(count)}"
        out.append(f'<rect class="mark" x="{x0 + 0.5:.1f}" y="{y:.1f}" width="{max(x1 - x0 - 1, 1):.1f}" '
                   f'height="{f.y(0) - y:.1f}" fill="{b.color}" fill-opacity="0.85"><title>{escape(tip)}</title></rect>')
    return "".join(out)


def _whisker(span: tuple[float, float, float, str], f: Frame, color: str) -> str:
    lo, hi, yv, tip = span
    x0, x1, y = f.x(lo), f.x(hi), f.y(yv)
    return (f'<g class="mark" stroke="{color}" stroke-width="1.6"><title>{escape(tip)}</title>'
            f'<line x1="{x0:.1f}" y1="{y:.1f}" x2="{x1:.1f}" y2="{y:.1f}"/>'
            f'<line x1="{x0:.1f}" y1="{y - 5:.1f}" x2="{x0:.1f}" y2="{y + 5:.1f}"/>'
            f'<line x1="{x1:.1f}" y1="{y - 5:.1f}" x2="{x1:.1f}" y2="{y + 5:.1f}"/></g>')


def _rule(r: Rule, f: Frame, k: int) -> str:
    if r.axis == "y":
        y = f.y(r.value)
        line = f'<line x1="{f.left:.1f}" y1="{y:.1f}" x2="{f.plot_right:.1f}" y2="{y:.1f}"'
        text = _label(f.plot_right - 4, y - 5, r.label, r.color, "end")
    else:
        x, y = f.x(r.value), f.top + 12 + 14 * k
        line = f'<line x1="{x:.1f}" y1="{f.top:.1f}" x2="{x:.1f}" y2="{f.plot_bottom:.1f}"'
        right = x + 4 + CHAR_PX * 0.92 * len(r.label) <= f.plot_right
        text = _label(x + 4, y, r.label, r.color) if right else _label(x - 4, y, r.label, r.color, "end")
    return f'{line} stroke="{r.color}" stroke-width="1.4" stroke-dasharray="{r.dash}"/>{text}'


def _axes(f: Frame, x: Axis, y: Axis, xticks: list[float], yticks: list[float]) -> str:
    out = [f'<rect x="{f.left}" y="{f.top}" width="{f.plot_right - f.left}" height="{f.plot_bottom - f.top}" '
           f'fill="#fcfcfd" stroke="{GRID}"/>']
    for t in yticks:
        py = f.y(t)
        out.append(f'<line x1="{f.left}" y1="{py:.1f}" x2="{f.plot_right}" y2="{py:.1f}" stroke="{GRID}"/>')
        out.append(f'<text x="{f.left - 8}" y="{py + 4:.1f}" text-anchor="end" font-size="11" fill="{MUTED}">'
                   f'{escape(y.fmt(t))}</text>')
    for t in xticks:
        px = f.x(t)
        out.append(f'<line x1="{px:.1f}" y1="{f.top}" x2="{px:.1f}" y2="{f.plot_bottom}" stroke="{GRID}"/>')
        out.append(f'<text x="{px:.1f}" y="{f.plot_bottom + 17}" text-anchor="middle" font-size="11" '
                   f'fill="{MUTED}">{escape(x.fmt(t))}</text>')
    cx, cy = (f.left + f.plot_right) / 2, (f.top + f.plot_bottom) / 2
    out.append(f'<text x="{cx:.1f}" y="{f.height - 10}" text-anchor="middle" font-size="12" fill="{INK}">'
               f'{escape(x.label)}</text>')
    out.append(f'<text transform="translate(16 {cy:.1f}) rotate(-90)" text-anchor="middle" font-size="12" '
               f'fill="{INK}">{escape(y.label)}</text>')
    return "".join(out)


def _legend_entries(layers: Sequence[Layer]) -> list[Line | Scatter | Bars | Whiskers]:
    return [layer for layer in layers if not isinstance(layer, Rule) and layer.name]


def _legend_layout(layers: Sequence[Layer], x0: float, width: float) -> list[tuple[float, int]]:
    """(x offset, row) of each legend entry, flowing left to right and wrapping at `width`."""
    out, x, row = [], 0.0, 0
    for layer in _legend_entries(layers):
        w = 40 + CHAR_PX * len(layer.name)
        if x > 0 and x + w > width:
            x, row = 0.0, row + 1
        out.append((x0 + x, row))
        x += w + 14
    return out


def _legend(layers: Sequence[Layer], x0: float, y0: float, width: float) -> str:
    """The legend in rows of entries above the plot area, the first row's centre at y0."""
    out = []
    for layer, (x, row) in zip(_legend_entries(layers), _legend_layout(layers, x0, width)):
        y = y0 + row * LEGEND_ROW
        if isinstance(layer, Line):
            dash = f' stroke-dasharray="{layer.dash}"' if layer.dash else ""
            out.append(f'<line x1="{x}" y1="{y}" x2="{x + 24}" y2="{y}" stroke="{layer.color}" stroke-width="2.2"{dash}/>')
            out.append(_swatch(layer.marker, x + 12, y, layer.color))
        elif isinstance(layer, Scatter):
            out.append(_swatch(layer.marker, x + 12, y, layer.color))
        elif isinstance(layer, Bars):
            out.append(f'<rect x="{x + 4}" y="{y - 6}" width="16" height="12" fill="{layer.color}"/>')
        else:
            out.append(f'<line x1="{x + 4}" y1="{y}" x2="{x + 20}" y2="{y}" stroke="{layer.color}" stroke-width="1.6"/>')
        out.append(f'<text x="{x + 30}" y="{y + 4}" font-size="12" fill="{INK}">{escape(layer.name)}</text>')
    return f'<g class="legend">{"".join(out)}</g>'


def _swatch(kind: str, x: float, y: float, color: str) -> str:
    # the legend's marker: same shape, no "mark" class (it is not data)
    return _marker(kind, x, y, 4.5, color, "").replace('class="mark" ', "").replace("<title></title>", "")


def figure(plot_id: str, title: str, x: Axis, y: Axis, layers: Sequence[Layer], *, width: int = 1000,
           height: int = 380, subtitle: str = "") -> str:
    """The SVG of one plot: title, subtitle and legend on top, then the axes with ticks and
    gridlines, then the layers in order (later layers on top). `height` is the plot area's
    height plus the axis margins; the title and legend rows are added above it."""
    xlo, xhi, xticks = _extent([v for layer in layers for v in _values(layer, "x")], x)
    ylo, yhi, yticks = _extent([v for layer in layers for v in _values(layer, "y")], y)
    left = 34 + CHAR_PX * max(len(y.fmt(t)) for t in yticks)
    right = 24
    layout = _legend_layout(layers, left, width - left - right)
    legend_y = 22 + (18 if subtitle else 0) + 24
    top = legend_y + (LEGEND_ROW * (layout[-1][1] + 1) if layout else 0) + 4
    bottom, height = 46, height + top
    xa, xb = (width - right, left) if x.reverse else (left, width - right)
    ya, yb = (top, height - bottom) if y.reverse else (height - bottom, top)
    f = Frame(width, height, left, right, top, bottom, Scale(xlo, xhi, xa, xb, x.log), Scale(ylo, yhi, ya, yb, y.log))
    head = f'<text x="{left}" y="22" font-size="15" font-weight="600" fill="{INK}">{escape(title)}</text>'
    if subtitle:
        head += f'<text x="{left}" y="40" font-size="12" fill="{MUTED}">{escape(subtitle)}</text>'
    body, k = [], 0
    for layer in layers:
        body.append(_draw(layer, f, k))
        k += isinstance(layer, Rule) and layer.axis == "x"
    body.append(_labels(layers, f))
    return (f'<svg id="{escape(plot_id)}" class="plot" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" style="--w:{width}px" role="img" aria-label="{escape(title)}" font-family="{FONT}">'
            f"<title>{escape(title)}</title>{head}{_legend(layers, left, legend_y, width - left - right)}"
            f"{_axes(f, x, y, xticks, yticks)}{''.join(body)}</svg>")


# ---- the three plot kinds the report uses ---------------------------------------------------

def line_plot(plot_id: str, title: str, lines: Sequence[Line], x: Axis, y: Axis,
              rules: Sequence[Rule] = (), **kw) -> str:
    return figure(plot_id, title, x, y, [*rules, *lines], **kw)


def pareto_front(xs: Sequence[float], ys: Sequence[float], x_better: str = "low") -> list[int]:
    """Indices of the points no other point dominates, where higher y is better and lower x is
    better (x_better="low", e.g. bytes) or higher x is (x_better="high", e.g. tokens/s). A point
    is dominated when another is at least as good on both and strictly better on one. Returned
    in increasing x."""
    sign = 1 if x_better == "low" else -1

    def dominates(j: int, i: int) -> bool:
        better_x, better_y = sign * xs[j] <= sign * xs[i], ys[j] >= ys[i]
        return better_x and better_y and (sign * xs[j] < sign * xs[i] or ys[j] > ys[i])

    front = [i for i in range(len(xs)) if not any(dominates(j, i) for j in range(len(xs)) if j != i)]
    return sorted(front, key=lambda i: xs[i])


def scatter_plot(plot_id: str, title: str, groups: Sequence[Scatter], x: Axis, y: Axis, *,
                 x_better: str = "low", rules: Sequence[Rule] = (), **kw) -> str:
    """Scatter of the groups' points with the Pareto front (over all points) drawn as a line
    joining the front points and a ring around each."""
    pts = [p for g in groups for p in g.points]
    idx = pareto_front([p.x for p in pts], [p.y for p in pts], x_better)
    front = tuple(replace(pts[i], label="") for i in idx)  # the group's own mark carries the label
    layers: list[Layer] = [*rules]
    if front:
        layers.append(Line("Pareto front", front, "#64748b", dash="3 3", marker="ring"))
    layers += groups
    return figure(plot_id, title, x, y, layers, **kw)


def histogram(plot_id: str, title: str, bars: Bars, x: Axis, y: Axis, rules: Sequence[Rule] = (), **kw) -> str:
    return figure(plot_id, title, x, y, [bars, *rules], **kw)
