"""What the clinician front doors (CDS Hooks card, SMART patient page) show of a twin run.

Why one module: the card and the page must quote the same numbers, the same thresholds and the same
caveats, and both read the twin through one function (:func:`run_twin`). The inline-SVG charts
live in :mod:`fhirtwin.charts`, shared with the offline HTML report.
"""

from __future__ import annotations

import dataclasses
from datetime import date
from typing import Any

from fhirtwin.charts import OUTCOME_LABELS, SHOWN_TRAJECTORIES, risk_chart, trajectory_chart
from fhirtwin.pipeline import TwinRun

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


def run_twin(
    settings: Any,
    patient_id: str,
    *,
    record: list[dict[str, Any]] | None = None,
    client: Any = None,
    draws: int | None = None,
    reference_date: date | None = None,
) -> TwinRun:
    """Read (or take) one patient's record and simulate it, without preparing a write.

    Why not ``engine.simulate_patient``: it also searches the stored results on ``settings.fhir_server``
    and signs a transaction, which a card (prefetch, possibly another EHR, <= 150 ms) and the page read
    must not do; writes go through the engine. Same pipeline, seed 0 and ``settings.draws`` as the engine,
    so the page shows the numbers a write stores. ``record`` (Patient first, e.g. from CDS prefetch) wins
    over ``client``; ``draws`` overrides the ensemble size (the card uses fewer).
    """
    from fhirtwin.adapters import build_twin
    from fhirtwin.pipeline import read_twin, simulate_twin, today

    if record is not None:
        state = build_twin(patient_id, record, reference_date or today())
    elif client is not None:
        state = read_twin(client, patient_id, reference_date)
    else:
        raise ValueError("run_twin needs a record or a client")
    n = draws if draws is not None else settings.draws
    return simulate_twin(state, horizon_years=settings.horizon_years, draws=n)


def with_draws(settings: Any, draws: int) -> Any:
    """A copy of the service settings with another ensemble size."""
    return dataclasses.replace(settings, draws=draws)


def risks(forecast: Any, years: float | None = None) -> dict[str, dict[str, float]]:
    """Median and 90 % interval per shown outcome at the horizon (fractions 0-1)."""
    return {o: forecast.at_horizon(o, years) for o in SHOWN_OUTCOMES if o in forecast.cif}


def pct(value: float, digits: int = 1) -> str:
    """A fraction as a percentage string (``0.1234`` -> ``12.3 %``)."""
    return f"{100 * value:.{digits}f} %"


def interval_text(risk: dict[str, float]) -> str:
    """``12.3 % (90 % interval 10.1-14.6 %)``."""
    return f"{pct(risk['median'])} (90 % interval {100 * risk['p05']:.1f}–{100 * risk['p95']:.1f} %)"


def ledger_lines(state: Any, limit: int = 50) -> list[dict[str, str]]:
    """The data-quality ledger as rows (source, kind, message), without values beyond what it records."""
    rows = []
    for entry in state.ledger.to_json()[:limit]:
        rows.append({"source": str(entry.get("source", "")), "kind": str(entry.get("kind", "")),
                     "message": str(entry.get("message", ""))})
    return rows


def ledger_counts(state: Any) -> dict[str, int]:
    """How many ledger entries of each kind (defaults, derived, malformed, …)."""
    counts: dict[str, int] = {}
    for entry in state.ledger.to_json():
        kind = str(entry.get("kind", "other"))
        counts[kind] = counts.get(kind, 0) + 1
    return counts


__all__ = ["SHOWN_OUTCOMES", "SHOWN_TRAJECTORIES", "risk_chart", "run_twin", "trajectory_chart"]
