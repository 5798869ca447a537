"""A self-contained HTML report of twin runs: risks with intervals and trajectory plots as inline SVG.

No plotting library and no external assets: the report opens offline in any browser; its charts are
the ones of the SMART patient page (:mod:`fhirtwin.charts`).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fhirtwin.charts import SHOWN_TRAJECTORIES, risk_chart, trajectory_chart

if TYPE_CHECKING:
    from fhirtwin.sim import Forecast, Plan
    from fhirtwin.twin import TwinState


class ReportedRun(Protocol):
    """What the report reads of one patient's run: the twin and its plan (None when not simulated)."""

    @property
    def state(self) -> TwinState: ...

    @property
    def plan(self) -> Plan | None: ...


def forecast_plots(forecast: Forecast) -> list[str]:
    """The cumulative-incidence chart of total CVD and one chart per simulated biomarker."""
    scenario = [("current care", forecast)]
    plots = [risk_chart(scenario, "total_cvd")]
    plots += [chart for variable in SHOWN_TRAJECTORIES if (chart := trajectory_chart(scenario, variable))]
    return plots


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def write_report(runs: Sequence[ReportedRun], path: Path, *, title: str = "fhirtwin report") -> Path:
    """Write an HTML page for the given TwinRuns (those with a plan): risks, options, plots, ledger counts."""
    sections = []
    for run in runs:
        plan = run.plan
        if plan is None:
            continue
        state = run.state
        rows = "".join(
            f"<tr><td>{html.escape(outcome.replace('_', ' '))}</td><td>{_pct(r['median'])}</td>"
            f"<td>{_pct(r['p05'])} – {_pct(r['p95'])}</td></tr>"
            for outcome in ("total_cvd", "ascvd", "heart_failure", "kidney_failure")
            if outcome in plan.baseline.outcomes
            for r in [plan.baseline.at_horizon(outcome)]
        )
        options = "".join(
            f"<li>{html.escape(o.scenario.name)}: absolute risk reduction {_pct(o.arr['median'])} "
            f"({_pct(o.arr['p05'])} – {_pct(o.arr['p95'])})"
            + (f", NNT {o.nnt:.0f}" if o.nnt else "") + "</li>"
            for o in plan.options[:3]
        ) or "<li>no eligible intervention</li>"
        excluded = "".join(f"<li>{html.escape(e.candidate)}: {html.escape(e.reason)}</li>" for e in plan.excluded[:5])
        kinds: dict[str, int] = {}
        for entry in state.ledger:
            kinds[entry.kind.value] = kinds.get(entry.kind.value, 0) + 1
        ledger = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or "empty"
        sections.append(
            f"<section><h2>{html.escape(state.patient_id)} — {state.age_years()} y, "
            f"{html.escape(str(state.demographics.sex))}</h2>"
            f"<table><tr><th>{plan.horizon_years:g}-year risk</th><th>median</th><th>90% interval</th></tr>"
            f"{rows}</table><h3>Top options</h3><ul>{options}</ul>"
            + (f"<h3>Not proposed</h3><ul>{excluded}</ul>" if excluded else "")
            + f"<div class='plots'>{''.join(forecast_plots(plan.baseline))}</div>"
            f"<p class='ledger'>Data-quality ledger: {html.escape(ledger)}</p></section>"
        )
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
        ".plots{display:flex;flex-wrap:wrap;gap:8px}.ledger{color:#555;font-size:90%}"
        "section{border-top:1px solid #ddd;margin-top:1.5em}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Synthetic patients. Risks are proposals for clinician review: "
        "median and 90% interval over the ensemble.</p>" + "".join(sections) + "</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
