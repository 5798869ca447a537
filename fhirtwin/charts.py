"""Inline-SVG charts of forecasts, shared by the SMART patient page and the offline HTML report.

Why hand-drawn: a few polylines are all these pages need, and an inline SVG has no external assets and
no script, so it survives a strict Content-Security-Policy and an offline workstation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fhirtwin.sim.model import Forecast

#: Outcome labels (keys of Forecast.cif).
OUTCOME_LABELS: dict[str, str] = {
    "total_cvd": "Total CVD",
    "ascvd": "ASCVD",
    "heart_failure": "Heart failure",
    "kidney_failure": "Kidney failure",
}

#: Biomarker trajectories that are plotted: variable -> (label, unit).
SHOWN_TRAJECTORIES: dict[str, tuple[str, str]] = {
    "ldl_cholesterol_mg_dl": ("LDL cholesterol", "mg/dL"),
    "systolic_bp_mm_hg": ("Systolic blood pressure", "mmHg"),
    "egfr_ml_min_1_73m2": ("eGFR", "mL/min/1.73m²"),
    "hba1c_percent": ("HbA1c", "%"),
    "bmi_kg_m2": ("BMI", "kg/m²"),
}


@dataclasses.dataclass(frozen=True)
class Series:
    """One line with its 90 % band: x in years, y in display units."""

    label: str
    x: Sequence[float]
    median: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]
    css_class: str = "s0"


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / n
    magnitude = 10 ** int(f"{raw:e}".split("e")[1])
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = step * int(lo / step)
    ticks = []
    value = start
    while value <= hi + 1e-9:
        if value >= lo - 1e-9:
            ticks.append(round(value, 10))
        value += step
    return ticks


def svg_chart(
    series: Iterable[Series],
    *,
    title: str,
    y_label: str,
    width: int = 420,
    height: int = 220,
    y_min: float | None = None,
    y_max: float | None = None,
    y_format: str = "{:g}",
) -> str:
    """A small line chart with shaded 90 % bands as an SVG string (presentation attributes, no styles).

    Why hand-drawn: a few polylines are all the page needs, and an inline SVG has no external assets and
    no script, so it survives a strict CSP and an offline EHR workstation.
    """
    items = list(series)
    left, right, top, bottom = 52, 12, 26, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [x for s in items for x in s.x]
    ys = [y for s in items for y in (*s.low, *s.high, *s.median)]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    lo = min(ys) if ys else 0.0
    hi = max(ys) if ys else 1.0
    lo = y_min if y_min is not None else lo - 0.05 * (hi - lo or 1)
    hi = y_max if y_max is not None and y_max > lo else hi + 0.05 * (hi - lo or 1)
    if x1 == x0:
        x1 = x0 + 1
    if hi == lo:
        hi = lo + 1

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - lo) / (hi - lo)) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}">',
           f"<title>{escape(title)}</title>",
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>']
    for t in _ticks(lo, hi):
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">'
                   f"{escape(y_format.format(t))}</text>")
    for t in _ticks(x0, x1, 5):
        x = px(t)
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">{t:g}</text>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" font-size="10" text-anchor="middle">years</text>')
    out.append(f'<text x="12" y="{top + plot_h / 2:.1f}" font-size="10" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + plot_h / 2:.1f})">{escape(y_label)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    colours = ["#1f5fa8", "#c0392b", "#2e8b57", "#8e44ad"]
    for i, s in enumerate(items):
        colour = colours[i % len(colours)]
        upper = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.x, s.high, strict=True))
        lower = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(reversed(s.x), reversed(s.low), strict=True))
        out.append(f'<polygon class="band {escape(s.css_class)}" points="{upper} {lower}" fill="{colour}" '
                   'fill-opacity="0.18" stroke="none"/>')
        line = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(s.x, s.median, strict=True))
        out.append(f'<polyline class="median {escape(s.css_class)}" points="{line}" fill="none" '
                   f'stroke="{colour}" stroke-width="2"/>')
        out.append(f'<text x="{left + plot_w - 4}" y="{top + 14 + 12 * i}" font-size="10" text-anchor="end" '
                   f'fill="{colour}">{escape(s.label)}</text>')
    out.append("</svg>")
    return "".join(out)


def risk_chart(forecasts: Sequence[tuple[str, Forecast]], outcome: str) -> str:
    """Cumulative incidence of one outcome over the horizon for one or more scenarios (percent)."""
    series = []
    for i, (label, forecast) in enumerate(forecasts):
        s = forecast.summary(outcome)
        years = forecast.times_months[::3] / 12.0
        series.append(Series(label, years.tolist(), (100 * s["median"][::3]).tolist(), (100 * s["p05"][::3]).tolist(),
                             (100 * s["p95"][::3]).tolist(), f"s{i}"))
    return svg_chart(series, title=f"{OUTCOME_LABELS.get(outcome, outcome)} risk", y_label="%", y_min=0.0,
                     y_format="{:g}")


def trajectory_chart(forecasts: Sequence[tuple[str, Forecast]], variable: str) -> str | None:
    """Median and 90 % band of a biomarker under one or more scenarios (None when not simulated)."""
    label, unit = SHOWN_TRAJECTORIES.get(variable, (variable, ""))
    series = []
    for i, (name, forecast) in enumerate(forecasts):
        if variable not in forecast.trajectories:
            return None
        s = forecast.trajectory_summary(variable)
        years = forecast.times_months[::3] / 12.0
        series.append(Series(name, years.tolist(), s["median"][::3].tolist(), s["p05"][::3].tolist(),
                             s["p95"][::3].tolist(), f"s{i}"))
    return svg_chart(series, title=label, y_label=unit)
