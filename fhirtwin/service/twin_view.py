"""What the clinician front doors (CDS Hooks card, SMART patient page) show of a twin run.

Why one module: the card and the page must quote the same numbers, the same thresholds and the same
caveats; both get their run from :class:`fhirtwin.engine.Engine`. The inline-SVG charts live in
:mod:`fhirtwin.charts`, shared with the offline HTML report.
"""

from __future__ import annotations

from fhirtwin.charts import OUTCOME_LABELS, SHOWN_TRAJECTORIES, risk_chart, trajectory_chart
from fhirtwin.engine import Forecast
from fhirtwin.twin import TwinState

#: Outcomes shown to clinicians, in display order (keys of Forecast.cif).
SHOWN_OUTCOMES = OUTCOME_LABELS


# Card indicator from the median 10-year total CVD risk. The cut-offs are the 2019 ACC/AHA primary
# prevention risk categories (Arnett DK et al., Circulation 2019;140:e596-e646): < 7.5 % low/borderline,
# 7.5 % to < 20 % intermediate, >= 20 % high. They were defined for the pooled cohort equations' 10-year
# ASCVD risk; fhirtwin applies them to PREVENT-anchored total CVD as a display convention, stated on the card.
INDICATOR_WARNING_AT = 0.075
INDICATOR_CRITICAL_AT = 0.20


def indicator_for(total_cvd_risk: float) -> str:
    """CDS Hooks indicator for a median 10-year total CVD risk (ACC/AHA categories, see above)."""
    if total_cvd_risk >= INDICATOR_CRITICAL_AT:
        return "critical"
    if total_cvd_risk >= INDICATOR_WARNING_AT:
        return "warning"
    return "info"


def risks(forecast: Forecast, years: float | None = None) -> dict[str, dict[str, float]]:
    """Median and 90 % interval per shown outcome at the horizon (fractions 0-1)."""
    return {o: forecast.at_horizon(o, years) for o in SHOWN_OUTCOMES if o in forecast.cif}


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
