"""The Markdown summary: verdict, candidates table, gate rules, callouts, economics and the engine
noise floor, fit for a CI job summary (e.g. appended to $GITHUB_STEP_SUMMARY)."""

from __future__ import annotations

from quantgate.record import RunRecord
from quantgate.report import view
from quantgate.report.view import Table

MARK = {"pass": "✅ pass", "fail": "❌ fail", "inconclusive": "⚠️ inconclusive"}


def render_markdown(results: RunRecord, html_name: str | None = None) -> str:
    """The summary; `html_name` (the HTML report's file name beside it) is linked when given."""
    ok, headline = view.verdict_line(results)
    ev = results.eval
    parts = [
        f"## {'✅' if ok else '❌'} quantgate: {_escape(headline)}",
        f"{_escape(view.model_line(results))} · eval set `{ev.eval_set}` ({ev.items} items) · "
        f"run `{results.run_id}`",
        table_markdown(view.candidates_table(results)),
        "\n".join(f"- ✗ could not build or run **{_escape(f.name)}**: {_escape(f.error)}"
                  for f in results.failed_candidates),
        "### Gate rules",
        "\n".join(_rules(results)),
    ]
    losses = view.silent_losses(results)
    if losses:
        parts += ["### What accuracy alone would hide", "\n\n".join(f"> ⚠️ {_escape(n)}" for n in losses.values())]
    econ = view.economics_table(results)
    if econ is not None:
        ec = results.economics_config
        parts += ["### Economics", (f"Assumptions: {_escape(view.economics_assumptions(ec))}." if ec else ""),
                  table_markdown(econ), "\n".join(f"- {_escape(n)}" for n in view.economics_notes(results))]
    parts += ["### Engine noise floor", _escape(view.noise_floor(results))]
    if html_name:
        parts.append(f"Full report with plots and flipped items: [{html_name}]({html_name})")
    return "\n\n".join(p for p in parts if p) + "\n"


def table_markdown(t: Table) -> str:
    head = "| " + " | ".join(_escape(h) for h in t.headers) + " |"
    align = "|" + "|".join("---:" if n else "---" for n in t.numeric) + "|"
    rows = ["| " + " | ".join(_cell(c, row.recommended and i == 0) for i, c in enumerate(row.cells)) + " |"
            for row in t.rows]
    return "\n".join([head, align, *rows])


def _cell(text: str, bold: bool) -> str:
    text = _escape(text)
    return f"**{text}**" if bold and text else text


def _escape(text: str) -> str:
    """Table- and emphasis-safe: pipes and the characters Markdown would read as markup."""
    for ch in ("\\", "|", "*", "_", "`"):
        text = text.replace(ch, "\\" + ch)
    return text.replace("\n", " ")


def _rules(results: RunRecord) -> list[str]:
    lines = []
    for c in results.candidates:
        held = "holds the gate" if c.gate.passed else "does not hold the gate"
        rules = "; ".join(f"{MARK.get(r.status, r.status)} `{r.rule}`: {r.value} {r.interval}".rstrip()
                          for r in view.rules(c))
        lines.append(f"- **{_escape(c.name)}** {held}: {rules}")
    return lines
