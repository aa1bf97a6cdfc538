"""The HTML report: one self-contained file (inline CSS and SVG; no scripts, fonts, images or
other external references), readable offline and attachable to a CI run."""

from __future__ import annotations

import json
from html import escape

from quantgate.record import CandidateRecord, FlippedItem, RunRecord
from quantgate.report import plots, view
from quantgate.report.view import Table

CSS = """
:root { --ink:#1f2937; --muted:#6b7280; --line:#e5e7eb; --bg:#f8fafc; --pass:#15803d; --fail:#b91c1c;
        --warn:#b45309; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--ink); font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,
       Helvetica,Arial,sans-serif; }
main { max-width:1240px; margin:0 auto; padding:24px 28px 64px; }
header h1 { margin:0; font-size:24px; letter-spacing:-0.01em; }
header .meta { color:var(--muted); margin-top:4px; }
nav { margin:14px 0 6px; display:flex; flex-wrap:wrap; gap:6px 14px; font-size:13px; }
nav a { color:var(--accent); text-decoration:none; }
nav a:hover { text-decoration:underline; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 22px; margin-top:18px; }
h2 { font-size:17px; margin:0 0 10px; }
h3 { font-size:14px; margin:16px 0 6px; }
p.lead { color:var(--muted); margin:0 0 12px; }
.verdict { border-radius:8px; padding:14px 18px; font-size:17px; font-weight:600; margin-bottom:14px; }
.verdict.ok { background:#ecfdf5; border:1px solid #a7f3d0; color:var(--pass); }
.verdict.no { background:#fef2f2; border:1px solid #fecaca; color:var(--fail); }
.callout { background:#fffbeb; border:1px solid #fde68a; border-left:4px solid #f59e0b; border-radius:6px;
           padding:10px 14px; margin:10px 0; }
.note { color:var(--muted); font-style:italic; }
.scroll { overflow-x:auto; }
table { border-collapse:collapse; width:100%; font-size:13px; }
table.compact { font-size:12.5px; }
table.compact th, table.compact td { padding:6px 7px; }
th, td { padding:6px 9px; border-bottom:1px solid var(--line); text-align:left; vertical-align:top; }
th { background:#f1f5f9; font-weight:600; }
td:first-child { white-space:nowrap; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
td.num { white-space:nowrap; }
td.sim { text-align:center; font-style:italic; }
tr.recommended td { background:#f0fdf4; }
tr.simulated td { color:var(--muted); font-style:italic; }
tbody tr:hover td { background:#f8fafc; }
.chip { display:inline-block; padding:1px 8px; border-radius:999px; font-size:12px; font-weight:600;
        white-space:nowrap; }
.chip.pass { background:#dcfce7; color:var(--pass); }
.chip.fail { background:#fee2e2; color:var(--fail); }
.chip.inconclusive { background:#fef3c7; color:var(--warn); }
.chip.reference { background:#e2e8f0; color:#334155; }
.chip.c2w { background:#fee2e2; color:var(--fail); }
.chip.w2c { background:#dcfce7; color:var(--pass); }
.chip.changed { background:#e2e8f0; color:#334155; }
.plots { display:flex; flex-wrap:wrap; gap:18px; }
svg.plot { max-width:100%; height:auto; background:#fff; }
details { border:1px solid var(--line); border-radius:8px; margin:8px 0; }
details > summary { cursor:pointer; padding:9px 14px; font-weight:600; }
details[open] > summary { border-bottom:1px solid var(--line); }
details .body { padding:8px 12px; }
td.text { white-space:pre-wrap; max-width:360px; }
dl.manifest { display:grid; grid-template-columns:max-content 1fr; gap:4px 18px; margin:0; }
dl.manifest dt { color:var(--muted); }
dl.manifest dd { margin:0; font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:12.5px;
                 word-break:break-all; }
ul.notes { color:var(--muted); font-size:13px; margin:8px 0 14px; padding-left:18px; }
pre { background:#f8fafc; padding:12px; border-radius:6px; overflow-x:auto; font-size:12px; }
footer { color:var(--muted); font-size:12px; margin-top:24px; text-align:center; }
.figure { max-width:100%; }
/* Scroll shadows: an edge with more to see sideways is shaded (no script needed). */
.scroll { background:linear-gradient(to right, #fff 30%, rgba(255,255,255,0)) left / 28px 100% no-repeat local,
                     linear-gradient(to left, #fff 30%, rgba(255,255,255,0)) right / 28px 100% no-repeat local,
                     radial-gradient(farthest-side at 0 50%, rgba(0,0,0,.2), rgba(0,0,0,0)) left / 10px 100% no-repeat,
                     radial-gradient(farthest-side at 100% 50%, rgba(0,0,0,.2), rgba(0,0,0,0)) right / 10px 100% no-repeat;
          background-color:#fff; }
/* A phone (400 px): less padding; tables and figures keep a readable size and scroll sideways
   under a visible hint, the first column of the wide tables staying in view; chart text stays
   at least 0.8 of its drawn size (11 px labels: ~9 px); the manifest stacks name over value. */
@media (max-width: 720px) {
  main { padding:12px 10px 40px; }
  section { padding:12px; border-radius:8px; }
  header h1 { font-size:20px; }
  .verdict { font-size:15px; padding:10px 12px; }
  .scroll::before { content:"\\21C6  scroll sideways for the rest"; display:block; position:sticky; left:0;
                    width:max-content; font-size:12px; color:var(--muted); margin:0 0 4px; }
  svg.plot { width:100%; max-width:var(--w, 1000px); min-width:calc(var(--w, 1000px) * 0.8); }
  table.compact td:first-child, table.compact th:first-child { position:sticky; left:0; z-index:1; background:#fff;
                                                             box-shadow:1px 0 0 var(--line); }
  table.compact th:first-child { background:#f1f5f9; }
  td.text { min-width:160px; }
  dl.manifest { grid-template-columns:minmax(0, 1fr); gap:0; }
  dl.manifest dt { margin-top:8px; }
}
"""

SECTIONS = (("verdict", "Verdict"), ("candidates", "Candidates"), ("bits", "Quality vs bits"),
            ("tradeoffs", "Memory & speed"), ("economics", "Economics"), ("kld", "KL divergence"),
            ("noise", "Noise floor"), ("flips", "Flipped items"), ("manifest", "Manifest"))


def render_html(results: RunRecord) -> str:
    """The whole page for one run's record."""
    body = "".join((
        _header(results), _verdict(results), _candidates(results), _bits(results), _tradeoffs(results),
        _economics(results), _kld(results), _noise(results), _flips(results), _manifest(results),
    ))
    title = f"quantgate report — {results.model.base} — {results.run_id}"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>"
            f"<body><main>{body}<footer>generated by quantgate {escape(_version(results))} from results.json"
            f"</footer></main></body></html>\n")


def _version(results: RunRecord) -> str:
    return results.environment.get("quantgate", "")


def _section(sid: str, title: str, inner: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{escape(lead)}</p>' if lead else ""
    return f'<section id="{sid}"><h2>{escape(title)}</h2>{lead_html}{inner}</section>'


def _header(results: RunRecord) -> str:
    ev = results.eval
    meta = (f"{view.model_line(results)} · eval set {ev.eval_set} ({ev.items} items) · run {results.run_id} · "
            f"{results.started.isoformat()[:19]}")
    links = "".join(f'<a href="#{sid}">{escape(name)}</a>' for sid, name in SECTIONS)
    return (f'<header><h1>quantgate report</h1><div class="meta">{escape(meta)}</div></header>'
            f"<nav>{links}</nav>")


def _chip(status: str, text: str | None = None) -> str:
    return f'<span class="chip {escape(status)}">{escape(text or status)}</span>'


# ---- verdict and its reasons ---------------------------------------------------------------

def _verdict(results: RunRecord) -> str:
    ok, headline = view.verdict_line(results)
    banner = f'<div class="verdict {"ok" if ok else "no"}">{escape(headline)}</div>'
    callouts = "".join(f'<div class="callout"><strong>What accuracy alone would hide.</strong> {escape(n)}</div>'
                       for n in view.silent_losses(results).values())
    rows = "".join(_rule_rows(c, c.name == results.recommended) for c in results.candidates)
    table = ('<div class="scroll"><table class="rules"><thead><tr><th>candidate</th><th>rule</th><th>status</th>'
             '<th class="num">value</th><th class="num">interval</th><th class="num">threshold</th></tr></thead>'
             f"<tbody>{rows}</tbody></table></div>")
    how = ("Each rule is judged on its confidence interval: pass when the whole interval is on the right side "
           "of the threshold, fail when it is wholly on the wrong side, inconclusive when it straddles it.")
    why = f'<h3>Why: the gate, rule by rule</h3><p class="lead">{escape(how)}</p>'
    return _section("verdict", "Verdict", banner + callouts + why + table)


def _rule_rows(c: CandidateRecord, is_rec: bool) -> str:
    rules = view.rules(c)
    verdict = _chip("pass", "holds the gate ★" if is_rec else "holds the gate") if c.gate.passed \
        else _chip("fail", "does not hold the gate")
    head = (f'<td rowspan="{len(rules)}"><strong>{escape(c.name)}</strong><br>{verdict}</td>')
    return "".join(
        f"<tr>{head if i == 0 else ''}<td>{escape(r.rule)}</td><td>{_chip(r.status)}</td>"
        f'<td class="num">{escape(r.value)}</td><td class="num">{escape(r.interval)}</td>'
        f'<td class="num">{escape(r.threshold)}</td></tr>'
        for i, r in enumerate(rules)
    )


# ---- tables --------------------------------------------------------------------------------

def table_html(t: Table, status_col: str | None = None, cls: str = "") -> str:
    """A view.Table as HTML; the cells of `status_col` become status chips."""
    head = "".join(f'<th{" class=num" if n else ""}>{escape(h)}</th>' for h, n in zip(t.headers, t.numeric))
    body = []
    for row in t.rows:
        row_cls = " ".join(k for k, on in (("recommended", row.recommended), ("simulated", row.simulated)) if on)
        cells = "".join(
            f"<td>{_chip(row.status, cell)}</td>" if h == status_col else
            f'<td class="sim">{escape(cell)}</td>' if cell == view.SIMULATED else
            f'<td{" class=num" if n else ""}>{escape(cell)}</td>'
            for h, n, cell in zip(t.headers, t.numeric, row.cells))
        body.append(f'<tr class="{row_cls}">{cells}</tr>' if row_cls else f"<tr>{cells}</tr>")
    table_cls = f' class="{cls}"' if cls else ""
    return (f'<div class="scroll"><table{table_cls}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _candidates(results: RunRecord) -> str:
    lead = ("Every candidate against the baseline on the same items: recovery = candidate / baseline on the gate "
            "metric; c→w / w→c = answers that went from correct to wrong and back; KLD and top-1 agreement compare "
            "next-token distributions token by token.")
    failed = "".join(f"<li><strong>{escape(f.name)}</strong>: {escape(f.error)}</li>"
                     for f in results.failed_candidates)
    failed_html = f'<h3>Candidates that could not be built or run</h3><ul class="notes">{failed}</ul>' if failed else ""
    return _section("candidates", "Candidates",
                    table_html(view.candidates_table(results), "gate", "compact") + failed_html, lead)


# ---- plots ---------------------------------------------------------------------------------

def _or_note(svg_text: str | None, note: str) -> str:
    return _figure(svg_text) if svg_text else f'<p class="note">{escape(note)}</p>'


def _figure(svg_text: str | None) -> str:
    """A plot in a frame that scrolls sideways on a narrow screen (see the CSS media query)."""
    return f'<div class="scroll figure">{svg_text}</div>' if svg_text else ""


def _bits(results: RunRecord) -> str:
    lead = ("A gate on accuracy alone looks only at the blue line. The violet and red lines show how much of the "
            "model's behaviour changed at each bit width even where accuracy holds.")
    return _section("bits", "Quality vs bit width",
                    _or_note(plots.bits_plot(results), "No candidate has a bit width to plot."), lead)


def _tradeoffs(results: RunRecord) -> str:
    measured = [m.name for m in results.models if view.decode_speed(m) is not None]
    simulated = [m.name for m in results.models if view.simulated(m)]
    speed_note = ("Decode speed not measured in this run." if not measured and not simulated else
                  f"Nothing to compare on speed: measured for {', '.join(measured) or 'no model'}"
                  + (f"; {view.SIMULATED} for {', '.join(simulated)}." if simulated else "."))
    inner = (f'<div class="plots">{_figure(plots.memory_plot(results))}'
             f'{_or_note(plots.speed_plot(results), speed_note)}</div>')
    lead = ("The Pareto front joins the models no other model beats on both axes: the smallest (or fastest) "
            "model that meets the bar is on it.")
    return _section("tradeoffs", "Quality vs memory and speed", inner, lead)


def _economics(results: RunRecord) -> str:
    table = view.economics_table(results)
    if table is None:
        return _section("economics", "Economics", '<p class="note">Economics not measured in this run.</p>')
    ec = results.economics_config
    sim = any(view.simulated(m) for m in results.models)
    lead = (f"Assumptions: {view.economics_assumptions(ec)}. " if ec else "") + \
        (f"Rows marked {view.SIMULATED!r} ran fake quantization in PyTorch: their speed says nothing about a "
         "real kernel, so it is not shown as speed." if sim else "")
    notes = "".join(f"<li>{escape(n)}</li>" for n in view.economics_notes(results))
    notes_html = f'<ul class="notes">{notes}</ul>' if notes else ""
    load, levels = plots.load_plot(results), view.load_table(results)
    levels_html = (f"<h3>Under load</h3>{table_html(levels, None, 'compact')}" if levels else "")
    return _section("economics", "Economics", table_html(table, None, "compact") + notes_html + _figure(load)
                    + levels_html, lead)


def _kld(results: RunRecord) -> str:
    overview = _or_note(plots.kld_overview(results), "No positive KL divergence to plot.")
    hists = plots.kld_histograms(results)
    more = (f'<h3>Per-token distributions</h3><div class="plots">{"".join(map(_figure, hists))}</div>' if hists else
            '<p class="note">Per-token KLD histograms not recorded in this run: mean and p99 shown above.</p>')
    lead = ("How far each candidate's next-token distribution moved from the baseline's. The mean hides the tail: "
            "the 99th percentile shows the tokens where the model changed its mind.")
    return _section("kld", "KL divergence from the baseline", overview + more, lead)


def _noise(results: RunRecord) -> str:
    return _section("noise", "Engine noise floor", f"<p>{escape(view.noise_floor(results))}</p>")


# ---- flipped items and manifest ------------------------------------------------------------

DIRECTION = {"correct->wrong": ("c2w", "correct → wrong"), "wrong->correct": ("w2c", "wrong → correct"),
             "output changed": ("changed", "output changed")}


def _flips(results: RunRecord) -> str:
    blocks = "".join(_flip_block(c) for c in results.candidates)
    lead = "The items whose answer changed, with the gold answer and both models' answers: your edge cases."
    return _section("flips", "Flipped items", blocks, lead)


def _flip_block(c: CandidateRecord) -> str:
    items = sorted(c.flipped_items, key=lambda it: list(DIRECTION).index(it.direction))
    f = c.vs_baseline.flips
    other = len(items) - f.correct_to_wrong - f.wrong_to_correct
    summary = (f"{c.name}: {len(items)} items changed ({f.correct_to_wrong} correct → wrong, "
               f"{f.wrong_to_correct} wrong → correct" + (f", {other} output changed)" if other > 0 else ")"))
    if not items:
        return f'<details><summary>{escape(summary)}</summary><div class="body note">No answer changed.</div></details>'
    rows = "".join(_flip_row(it) for it in items)
    table = ("<table><thead><tr><th>change</th><th>task</th><th>id</th><th>prompt</th><th>gold</th><th>baseline</th>"
             f"<th>candidate</th></tr></thead><tbody>{rows}</tbody></table>")
    return (f'<details class="flips" data-candidate="{escape(c.name)}"><summary>{escape(summary)}</summary>'
            f'<div class="body scroll">{table}</div></details>')


def _flip_row(it: FlippedItem) -> str:
    cls, text = DIRECTION[it.direction]
    cells = (it.task, it.id, it.prompt, it.gold, it.baseline_answer, it.candidate_answer)
    tds = "".join(f'<td class="text">{escape(str(v) if v is not None else view.DASH)}</td>' for v in cells)
    return f"<tr><td>{_chip(cls, text)}</td>{tds}</tr>"


def _manifest(results: RunRecord) -> str:
    pairs = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in view.manifest(results))
    config = json.dumps(results.config, indent=2)
    inner = (f'<dl class="manifest">{pairs}</dl><details><summary>full config</summary>'
             f'<div class="body"><pre>{escape(config)}</pre></div></details>')
    return _section("manifest", "Manifest", inner, "Everything needed to reproduce this run.")
