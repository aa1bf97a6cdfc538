"""What the HTML and Markdown reports show, computed once from a results dict (results.json's
content, see report/data.py): formatted tables, gate rules, callouts, noise floor, manifest.

Every accessor tolerates the fields a run may lack: economics, cost, noise floor, calibration,
kld_hist, an overall task (unlabeled eval sets), NaN metrics (stored as null).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

OVERALL = "overall"  # the pooled task in vs_baseline["tasks"] (quantgate.evals.metrics.OVERALL)
# A candidate whose accuracy recovery holds but which is beyond either line gets a "silent loss"
# callout: what a gate on accuracy alone would ship.
FLIP_CALLOUT = 0.05
TOP1_CALLOUT = 0.90
SIMULATED = "simulated: quality only"
DASH = "—"

Results = dict[str, Any]
Model = dict[str, Any]


# ---- formatting (None -> a dash) -----------------------------------------------------------

def pct(v: float | None, digits: int = 1) -> str:
    return DASH if v is None else f"{v:.{digits}%}"


def num(v: float | None, digits: int = 4) -> str:
    return DASH if v is None else f"{v:.{digits}f}"


def sig(v: float | None, digits: int = 3) -> str:
    """`digits` significant digits (KLD spans many decades: 2.9e-08 and 10.1 both stay legible)."""
    return DASH if v is None else f"{v:.{digits}g}"


def interval(iv: list[float | None] | None, as_pct: bool = False, as_sig: bool = False) -> str:
    """"[lo, hi]" as percentages, significant digits, or 3 decimals; "" when there is none."""
    if not iv or iv[0] is None or iv[1] is None:
        return ""
    lo, hi = iv
    return f"[{lo:.1%}, {hi:.1%}]" if as_pct else f"[{lo:.3g}, {hi:.3g}]" if as_sig else f"[{lo:.3f}, {hi:.3f}]"


def megabytes(b: int | None) -> str:
    return DASH if b is None else f"{b / 1e6:,.1f}"


def rate(v: float | None) -> str:
    return DASH if v is None else f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def decode_rate(e: dict[str, Any]) -> str:
    """An economics dict's decode cell (see decode_cell)."""
    return decode_cell(e.get("decode_tokens_per_s"), e.get("decode_tokens_per_s_range"))


def decode_cell(pooled: float | None, spread: Sequence[float] | None) -> str:
    """Pooled decode tokens/s, with the slowest and fastest single request when recorded."""
    return f"{rate(pooled)} ({spread[0]:,.0f}–{spread[1]:,.0f})" if spread and pooled is not None else rate(pooled)


def money(v: float | None, cents: bool = True) -> str:
    if v is None:
        return DASH
    sign = "-" if v < 0 else ""
    return f"{sign}${abs(v):,.2f}" if cents else f"{sign}${abs(v):,.0f}"


# ---- accessors -----------------------------------------------------------------------------

def overall(c: Model) -> dict[str, Any] | None:
    return c["vs_baseline"]["tasks"].get(OVERALL)


def metric_name(results: Results) -> str:
    return results.get("eval", {}).get("metric", "accuracy")


def economics(m: Model) -> dict[str, Any] | None:
    return m.get("economics") or None


def cost(m: Model) -> dict[str, Any]:
    """The model's cost at volume: under economics["cost"] or beside it as m["cost"]; {} when none."""
    return (economics(m) or {}).get("cost") or m.get("cost") or {}


def simulated(m: Model) -> bool:
    e = economics(m)
    return bool(e and e.get("simulated"))


def decode_speed(m: Model) -> float | None:
    """Measured decode tokens/s, or None when not measured or only simulated (fake quantization:
    its speed says nothing about a real kernel)."""
    e = economics(m)
    return None if e is None or e.get("simulated") else e.get("decode_tokens_per_s")


def models(results: Results) -> list[Model]:
    return [results["baseline"], *results["candidates"]]


def recommended(results: Results) -> str | None:
    return (results.get("recommendation") or {}).get("candidate")


def gate_status(results: Results, m: Model) -> str:
    if m is results["baseline"]:
        return "reference"
    return "pass" if m["gate"]["passed"] else "fail"


# ---- tables --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    cells: tuple[str, ...]
    status: str  # reference | pass | fail (the gate), for styling
    recommended: bool = False
    simulated: bool = False


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[Row, ...]
    numeric: tuple[bool, ...]  # right-align this column


def candidates_table(results: Results) -> Table:
    metric = metric_name(results)
    level = results.get("config", {}).get("quality_gate", {}).get("confidence")
    ci = f" [{level:.0%} CI]" if level else ""
    headers = ("model", "scheme", "weights MB", metric, f"recovery{ci}", "c→w / w→c", f"flip rate{ci}",
               "KLD mean", "KLD p99", "top-1 agree", "perplexity", "gate")
    base = results["baseline"]
    rows = [Row((base["name"], "baseline", megabytes(base["weight_bytes"]), num(base.get(metric)), "1.0000",
                 DASH, DASH, DASH, DASH, DASH, num(base.get("perplexity"), 2), "reference"), "reference")]
    rec = recommended(results)
    for c in results["candidates"]:
        rows.append(Row(_candidate_cells(c, metric, c["name"] == rec), gate_status(results, c), c["name"] == rec))
    numeric = tuple(h not in ("model", "scheme", "gate") for h in headers)
    return Table(headers, tuple(rows), numeric)


def scheme(c: Model) -> str:
    """e.g. "rtn 4-bit g64", "rtn 8-bit" (per channel), "w8a8 8-bit"."""
    bits = f" {c['bits']}-bit" if c.get("bits") else ""
    group = f" g{c['group_size']}" if c.get("group_size") else ""
    return f"{c.get('method', DASH)}{bits}{group}"


def _candidate_cells(c: Model, metric: str, is_rec: bool) -> tuple[str, ...]:
    vs, o = c["vs_baseline"], overall(c)
    flips = vs["flips"]
    return (
        c["name"], scheme(c), megabytes(c["weight_bytes"]),
        num(c.get(metric)), f"{num(vs.get('recovery'))} {interval(o and o['recovery_ci'])}".strip(),
        f"{flips['correct_to_wrong']} / {flips['wrong_to_correct']}",
        f"{pct(flips.get('rate'))} {interval(o and o['flip_rate_ci'], as_pct=True)}".strip(),
        sig(vs.get("kld_mean")), sig(vs.get("kld_p99")), pct(vs.get("top1_agreement")),
        num(c.get("perplexity"), 2), ("pass ★" if is_rec else "pass") if c["gate"]["passed"] else "fail",
    )


ECONOMICS_HEADERS = ("model", "engine", "artifact MB", "peak RSS MB", "prefill tok/s", "decode tok/s (request range)",
                     "latency p50 / p95 / p99", "roofline", "$ / 1M tokens", "monthly", "saving / month", "worth it")


def economics_table(results: Results) -> Table | None:
    """One row per model with economics; None when no model has any. Speed-derived cells of a
    simulated model (fake quantization) are not shown as speed: its decode cell reads SIMULATED."""
    rows = [_economics_row(results, m) for m in models(results) if economics(m)]
    if not rows:
        return None
    numeric = tuple(h not in ("model", "engine", "worth it") for h in ECONOMICS_HEADERS)
    return Table(ECONOMICS_HEADERS, tuple(rows), numeric)


LOAD_HEADERS = ("model", "batch size", "served", "latency p50 / p95 / p99", "tokens/s")


def load_table(results: Results) -> Table | None:
    """The request mix at each batch size, per model with a measured (not simulated) sweep:
    latency percentiles and throughput under that load; None when no model has one."""
    rows = tuple(Row((m["name"], str(level["batch_size"]), "batched" if level.get("batched", True) else "queued",
                      latencies(level.get("latency_s")), rate(level.get("tokens_per_s"))), gate_status(results, m))
                 for m in models(results) if not simulated(m)
                 for level in sorted((economics(m) or {}).get("load") or [], key=lambda r: r["batch_size"]))
    return Table(LOAD_HEADERS, rows, (False, True, False, True, True)) if rows else None


def economics_notes(results: Results) -> list[str]:
    """The cost notes ("name, name: note"), for under the economics table."""
    return grouped_notes((m["name"], cost(m)["note"]) for m in models(results) if cost(m).get("note"))


def grouped_notes(named: Iterable[tuple[str, str]]) -> list[str]:
    """(name, note) pairs -> "a, b: note", one line per distinct note, in first-seen order."""
    names: dict[str, list[str]] = {}
    for name, note in named:
        names.setdefault(note, []).append(name)
    return [f"{', '.join(n)}: {note}" for note, n in names.items()]


def latencies(lat: dict[str, float] | None) -> str:
    """p50 / p95 / p99 in one unit (ms when the p99 is under a second)."""
    vals = [lat.get(k) for k in ("p50", "p95", "p99")] if lat else []
    if not vals or any(v is None for v in vals):
        return DASH
    ms = vals[-1] < 1
    return " / ".join(f"{v * 1000:.0f}" if ms else f"{v:.2f}" for v in vals) + (" ms" if ms else " s")


def _economics_row(results: Results, m: Model) -> Row:
    e, price = economics(m), cost(m)
    sim = bool(e.get("simulated"))
    speed = ((DASH, SIMULATED, DASH, DASH) if sim else
             (rate(e.get("prefill_tokens_per_s")), decode_rate(e), latencies(e.get("latency_s")),
              pct(e.get("roofline_fraction"), 0)))
    money_cells = ((DASH, DASH, DASH, DASH) if sim or not price else
                   (money(price.get("per_million_tokens")), money(price.get("monthly"), cents=False),
                    money(price.get("monthly_saving"), cents=False), _yes_no(price.get("worth_it"))))
    cells = (m["name"], str(e.get("engine", DASH)), megabytes(e.get("artifact_bytes")),
             megabytes(e.get("peak_rss_bytes")), *speed, *money_cells)
    return Row(cells, gate_status(results, m), m["name"] == recommended(results), sim)


def _yes_no(v: bool | None) -> str:
    return DASH if v is None else "yes" if v else "no"


# ---- the gate's reasons, callouts, noise floor, manifest -----------------------------------

@dataclass(frozen=True)
class RuleView:
    rule: str
    status: str  # pass | fail | inconclusive
    value: str
    interval: str
    threshold: str


def rules(c: Model) -> list[RuleView]:
    out = []
    for r in c["gate"]["rules"]:
        as_pct, as_sig = "flip" in r["rule"], "KLD" in r["rule"]
        fmt = pct if as_pct else sig if as_sig else num
        out.append(RuleView(r["rule"], r["status"], fmt(r.get("value")), interval(r.get("interval"), as_pct, as_sig),
                            fmt(r.get("threshold"))))
    return out


def verdict_line(results: Results) -> tuple[bool, str]:
    """(a candidate is recommended, the headline)."""
    rec = results.get("recommendation") or {}
    if rec.get("candidate"):
        return True, f"Recommended: {rec['candidate']} — {rec.get('reason', '')}"
    return False, f"No candidate recommended — {rec.get('reason', '')}"


def silent_loss(name: str, vs: dict[str, Any], min_acceptable: float) -> str | None:
    """What a gate on accuracy alone would ship without noticing, if anything. `vs` is a
    candidate's vs_baseline dict."""
    recovery, flips, top1 = vs.get("recovery"), vs["flips"], vs.get("top1_agreement")
    if recovery is None or recovery < min_acceptable or top1 is None:
        return None
    if flips["rate"] < FLIP_CALLOUT and top1 >= TOP1_CALLOUT:
        return None
    return (
        f"{name} keeps {recovery:.1%} of the baseline's accuracy, yet {flips['rate']:.1%} of answers "
        f"flipped ({flips['correct_to_wrong']} correct→wrong, {flips['wrong_to_correct']} wrong→correct) "
        f"and it agrees with the baseline's top-1 next token only {top1:.1%} of the time "
        f"(KLD mean {sig(vs.get('kld_mean'))}): a gate on accuracy alone would ship it."
    )


def silent_losses(results: Results) -> dict[str, str]:
    """{candidate name: its silent-loss note} for the candidates that have one."""
    floor = results.get("config", {}).get("quality_gate", {}).get("min_acceptable")
    if floor is None:
        return {}
    notes = {c["name"]: silent_loss(c["name"], c["vs_baseline"], floor) for c in results["candidates"]}
    return {name: note for name, note in notes.items() if note}


def noise_floor(results: Results) -> str:
    """One sentence: the engine's own noise floor, or that it was not measured."""
    nf = results.get("noise_floor")
    if not nf:
        return ("Engine noise floor: not measured (run the baseline on two engines to see how much two "
                "engines disagree before any compression).")
    return (f"Engine noise floor: the baseline on {nf.get('engine', '?')} vs on {nf.get('reference', '?')} — "
            f"KLD mean {sig(nf.get('kld_mean'))}, KLD p99 {sig(nf.get('kld_p99'))}, top-1 agreement "
            f"{pct(nf.get('top1_agreement'))} over {nf.get('tokens', DASH)} tokens. Candidate differences "
            f"below this are the engine's, not the compression's.")


def manifest(results: Results) -> list[tuple[str, str]]:
    """(key, value) pairs that identify the run: what was measured, with what, where."""
    model, ev, env = results.get("model", {}), results.get("eval", {}), results.get("environment", {})
    calib = results.get("calibration")
    tasks = ", ".join(f"{t} ({n})" for t, n in ev.get("tasks", {}).items())
    pairs = [
        ("run id", results.get("run_id", DASH)),
        ("started / finished", f"{results.get('started', DASH)} / {results.get('finished', DASH)}"),
        ("model", f"{model.get('base', DASH)} — {model.get('description', '')}"),
        ("model source", model.get("source", DASH)),
        ("model sha256", model.get("sha256", DASH)),
        ("eval set", f"{ev.get('eval_set', DASH)}: {ev.get('items', DASH)} items; {tasks}"),
        ("duplicate items", str(len(ev.get("duplicates", [])))),
        ("perplexity / KLD tokens", str(ev.get("window_tokens", DASH))),
        ("gate metric", metric_name(results)),
        ("config digest (sha256)", results.get("config_digest", DASH)),
        ("seed", str(results.get("config", {}).get("seed", DASH))),
        ("calibration", f"{calib.get('source', DASH)}, sha256 {calib.get('sha256', DASH)}" if calib
         else "none (no candidate method needed calibration data)"),
    ]
    pairs += [(f"artifact: {m['name']}", f"{m['artifact'].get('path')} ({megabytes(m['artifact'].get('bytes'))} MB), "
               f"sha256 {m['artifact'].get('sha256')}") for m in models(results) if m.get("artifact")]
    pairs += [(k, str(v)) for k, v in env.items()]
    bandwidth = (results.get("machine") or {}).get("memory_bandwidth_bytes_per_s")
    if bandwidth:
        pairs.append(("memory bandwidth (measured copy)", f"{bandwidth / 1e9:.1f} GB/s"))
    ec = results.get("economics_config")
    if ec:
        pairs.append(("economics", economics_assumptions(ec)))
    return pairs


def economics_assumptions(ec: dict[str, Any]) -> str:
    if ec.get("hardware_cost_per_hour") is None or ec.get("tokens_per_month") is None:
        return "no price given (economics.hardware_cost_per_hour and tokens_per_month): costs not computed"
    return (f"hardware {money(ec.get('hardware_cost_per_hour'))}/hour, {ec['tokens_per_month']:,.0f} "
            f"tokens/month, worth it from {money(ec.get('min_monthly_saving'), cents=False)}/month saved")
