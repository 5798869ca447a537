"""A self-contained HTML report of twin runs: risks with intervals and trajectory plots as inline SVG.

No plotting library and no external assets: the report opens offline in any browser, and the same
SVG helper draws the plots of the SMART patient page.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TRAJECTORY_LABELS = {
    "ldl_cholesterol_mg_dl": "LDL-C (mg/dL)",
    "systolic_bp_mm_hg": "Systolic BP (mm Hg)",
    "egfr_ml_min_1_73m2": "eGFR (mL/min/1.73 m²)",
    "hba1c_percent": "HbA1c (%)",
    "bmi_kg_m2": "BMI (kg/m²)",
}


def svg_band_plot(
    x: Sequence[float],
    median: Sequence[float],
    low: Sequence[float],
    high: Sequence[float],
    *,
    title: str,
    x_label: str = "years",
    width: int = 320,
    height: int = 180,
    percent: bool = False,
) -> str:
    """A line for the median and a shaded 90 % band, with min/max tick labels; returns an <svg> string."""
    if not len(x) or not (len(x) == len(median) == len(low) == len(high)):
        raise ValueError("x, median, low and high must be non-empty and of equal length")
    left, right, top, bottom = 44, 8, 22, 26
    y_min, y_max = min(low), max(high)
    if y_max - y_min < 1e-9:
        y_min, y_max = y_min - 1.0, y_max + 1.0
    x_min, x_max = min(x), max(x)
    x_span = (x_max - x_min) or 1.0

    def px(v: float) -> float:
        return left + (v - x_min) / x_span * (width - left - right)

    def py(v: float) -> float:
        return top + (y_max - v) / (y_max - y_min) * (height - top - bottom)

    def fmt(v: float) -> str:
        return f"{100 * v:.0f}%" if percent else f"{v:.3g}"

    band = [f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, high, strict=True)]
    band += [f"{px(a):.1f},{py(b):.1f}" for a, b in zip(reversed(x), reversed(low), strict=True)]
    line = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in zip(x, median, strict=True))
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}">'
        f'<text x="{left}" y="14" font-size="12" font-family="sans-serif">{html.escape(title)}</text>'
        f'<polygon points="{" ".join(band)}" fill="#9ecae1" fill-opacity="0.6"/>'
        f'<polyline points="{line}" fill="none" stroke="#08519c" stroke-width="2"/>'
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#555"/>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#555"/>'
        f'<text x="{left - 4}" y="{py(y_max) + 4:.1f}" font-size="10" text-anchor="end">{fmt(y_max)}</text>'
        f'<text x="{left - 4}" y="{py(y_min):.1f}" font-size="10" text-anchor="end">{fmt(y_min)}</text>'
        f'<text x="{left}" y="{height - 8}" font-size="10">{x_min:g}</text>'
        f'<text x="{width - right}" y="{height - 8}" font-size="10" text-anchor="end">{x_max:g} {x_label}</text>'
        "</svg>"
    )


def forecast_plots(forecast: Any) -> list[str]:
    """The cumulative-incidence plot of total CVD and one plot per simulated biomarker."""
    years = [m / 12 for m in forecast.times_months]
    plots = []
    cif = forecast.summary("total_cvd")
    plots.append(svg_band_plot(years, cif["median"], cif["p05"], cif["p95"], title="Total CVD, cumulative risk",
                               percent=True))
    for variable, label in TRAJECTORY_LABELS.items():
        if variable in forecast.trajectories:
            band = forecast.trajectory_summary(variable)
            plots.append(svg_band_plot(years, band["median"], band["p05"], band["p95"], title=label))
    return plots


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def write_report(runs: Sequence[Any], path: Path, *, title: str = "fhirtwin report") -> Path:
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
