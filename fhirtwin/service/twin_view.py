"""What the clinician front doors (CDS Hooks card, SMART patient page) show of a twin run.

Why one module: the card and the page must quote the same numbers, the same thresholds and the same
caveats; both get their run from :class:`fhirtwin.engine.Engine`. The inline-SVG charts live in
:mod:`fhirtwin.charts`, shared with the offline HTML report.
"""

from __future__ import annotations

from fhirtwin.charts import OUTCOME_LABELS, SHOWN_TRAJECTORIES, risk_chart, trajectory_chart
from fhirtwin.engine import Forecast
from fhirtwin.sim.model import Driver
from fhirtwin.twin import TwinState

#: Outcomes shown to clinicians, in display order (keys of Forecast.cif).
SHOWN_OUTCOMES = OUTCOME_LABELS


def indicator_for(forecast: Forecast) -> str:
    """CDS Hooks indicator from the guideline categories of the forecast's 10-year medians.

    critical: PREVENT-ASCVD high (>= 10 %, 2026 ACC/AHA dyslipidemia guideline); warning: ASCVD intermediate
    (5 to < 10 %) or total CVD at or above the 7.5 % treatment threshold (2025 AHA/ACC blood pressure
    guideline); info otherwise.
    """
    codes = set()
    for outcome in ("ascvd", "total_cvd"):
        if outcome in forecast.cif and forecast.horizon_years >= 10:
            category = forecast.risk_category(outcome, 10.0, forecast.at_horizon(outcome, 10.0)["median"])
            if category is not None:
                codes.add((outcome, category.code))
    if ("ascvd", "high") in codes:
        return "critical"
    if ("ascvd", "moderate") in codes or ("total_cvd", "high") in codes:
        return "warning"
    return "info"


INDICATOR_TEXT = ("Indicator: critical at PREVENT-ASCVD >= 10 % (high), warning at 5-10 % (intermediate) or total "
                  "CVD >= 7.5 % (2026 ACC/AHA dyslipidemia and 2025 AHA/ACC blood pressure guidelines), info "
                  "otherwise.")


def risks(forecast: Forecast, years: float | None = None) -> dict[str, dict[str, float]]:
    """Median and 90 % interval per shown outcome at the horizon (fractions 0-1)."""
    return {o: forecast.at_horizon(o, years) for o in SHOWN_OUTCOMES if o in forecast.cif}


def main_drivers(forecast: Forecast, top: int) -> list[Driver]:
    """The drivers with the largest contributions, either sign (a marker such as CAC 0 can lower a risk)."""
    return sorted(forecast.drivers, key=lambda d: -abs(d.contribution))[:top]


def pct(value: float, digits: int = 1) -> str:
    """A fraction as a percentage string (``0.1234`` -> ``12.3 %``)."""
    return f"{100 * value:.{digits}f} %"


def interval_text(risk: dict[str, float]) -> str:
    """``12.3 % (90 % interval 10.1-14.6 %)``."""
    return f"{pct(risk['median'])} (90 % interval {100 * risk['p05']:.1f}–{100 * risk['p95']:.1f} %)"


def ledger_lines(state: TwinState, limit: int = 50) -> list[dict[str, str]]:
    """The data-quality ledger as rows (source, kind, message), without values beyond what it records."""
    rows = []
    for entry in state.ledger.to_json()[:limit]:
        rows.append({"source": str(entry.get("source", "")), "kind": str(entry.get("kind", "")),
                     "message": str(entry.get("message", ""))})
    return rows


def ledger_counts(state: TwinState) -> dict[str, int]:
    """How many ledger entries of each kind (defaults, derived, malformed, …)."""
    counts: dict[str, int] = {}
    for entry in state.ledger.to_json():
        kind = str(entry.get("kind", "other"))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


__all__ = ["SHOWN_OUTCOMES", "SHOWN_TRAJECTORIES", "risk_chart", "trajectory_chart"]
