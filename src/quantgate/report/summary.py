"""Short views for scripts and for `quantgate check`: the JSON summaries `--json` prints on
stdout (a run, a plan, history, the list of runs) and the plan in a terminal. JSON here is plain
data with finite numbers (None for what was not measured)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from quantgate.plan import Plan
from quantgate.record import RunRecord
from quantgate.store import HistoryRow, RunRow

SUMMARY_VERSION = 1  # of the --json objects below


def dumps(data: Any) -> str:
    """Compact JSON on one line per document (NaN and inf become null)."""
    return json.dumps(_finite(data), default=str, separators=(",", ":"))


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Mapping):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def run_summary(record: RunRecord, files: Mapping[str, Path], store: str) -> dict[str, Any]:
    """A finished run for a script: the verdict, each candidate's headline numbers, the files."""
    cands = []
    for c in record.candidates:
        vs = c.vs_baseline
        cands.append({"name": c.name, "method": c.method, "scheme": c.scheme, "bits": c.bits,
                      "weight_bytes": c.weight_bytes, "passed": c.gate.passed, "recovery": vs.recovery,
                      "flip_rate": vs.flips.rate, "kld_mean": vs.kld_mean, "kld_p99": vs.kld_p99,
                      "top1_agreement": vs.top1_agreement,
                      "failed_rules": [r.rule for r in c.gate.rules if not r.passed]})
    return {"summary_version": SUMMARY_VERSION, "run_id": record.run_id, "exit_code": record.exit_code,
            "recommended": record.recommended, "reason": record.recommendation.reason,
            "model": record.model.base, "eval_set": record.eval.eval_set, "items": record.eval.items,
            "baseline": {"accuracy": record.baseline.accuracy, "weight_bytes": record.baseline.weight_bytes},
            "candidates": cands, "failed_candidates": [{"name": f.name, "error": f.error}
                                                        for f in record.failed_candidates],
            "files": {k: str(v) for k, v in files.items()}, "store": store}


def plan_summary(plan: Plan) -> dict[str, Any]:
    return {"summary_version": SUMMARY_VERSION, "valid": True, "model": plan.model, "parameters": plan.params,
            "engine": plan.engine, "candidates": [{"name": n, "scheme": s, "made": how} for n, s, how in plan.candidates],
            "eval_set": plan.eval_set, "tasks": plan.tasks, "items": plan.items,
            "tokens_per_model": round(plan.tokens_per_model), "generated_per_model": round(plan.generated_per_model),
            "steps": [asdict(s) for s in plan.steps], "estimated_seconds": plan.seconds,
            "results_dir": plan.results_dir, "warnings": list(plan.warnings),
            "config": plan.config.model_dump(mode="json")}


def history_summary(rows: Sequence[HistoryRow]) -> list[dict[str, Any]]:
    return [{**asdict(h), "when": h.when.isoformat()} for h in rows]


def runs_summary(rows: Sequence[RunRow]) -> list[dict[str, Any]]:
    return [{**asdict(r), "started": r.started.isoformat()} for r in rows]


def render_plan(plan: Plan, console: Console) -> None:
    """The plan as `quantgate check` prints it."""
    console.print("[bold]config is valid.[/] A run would:")
    console.print(f"[bold]load[/] {escape(plan.model)}"
                  + (f" ({plan.params / 1e6:,.1f}M parameters)" if plan.params else ""))
    console.print(f"[bold]serve on[/] {escape(plan.engine)}")
    tasks = ", ".join(f"{t} {n}" for t, n in plan.tasks.items()) or "no items"
    console.print(f"[bold]evaluate on[/] {escape(plan.eval_set)}: {plan.items} items ({escape(tasks)}); "
                  f"~{plan.tokens_per_model:,.0f} tokens scored per model"
                  + (f", ~{plan.generated_per_model:,.0f} generated" if plan.generated_per_model else ""))
    table = Table(title="steps (rough estimate: counts × each engine's stated speed)")
    table.add_column("step")
    table.add_column("time", justify="right")
    for s in plan.steps:
        table.add_row(escape(s.what), _duration(s.seconds))
    table.add_row("[bold]total[/]", f"[bold]{_duration(plan.seconds)}[/]")
    console.print(table)
    console.print(f"[bold]results go to[/] {escape(plan.results_dir)}/<run id>/ (results.json, items.jsonl, "
                  "report.html, summary.md)")
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    return f"~{seconds:.0f} s" if seconds < 120 else f"~{seconds / 60:.0f} min"


def runs_table(rows: Sequence[RunRow]) -> Table:
    """Every recorded run, oldest first, whatever its outcome."""
    t = Table(title="quantgate runs")
    for col in ("started (UTC)", "run id", "model", "candidates", "passed", "outcome", "results"):
        t.add_column(col, justify="right" if col in ("candidates", "passed") else "left")
    for r in rows:
        outcome = (f"[green]recommended {escape(r.recommended)}[/]" if r.recommended else
                   "[red]none passed[/]" if not r.passed else "[yellow]none recommended[/]")
        t.add_row(f"{r.started:%Y-%m-%d %H:%M}", r.run_id, escape(r.model_base), str(r.candidates), str(r.passed),
                  outcome, escape(r.results or "—"))
    return t
