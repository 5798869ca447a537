"""What the twin should agree on with Synthea's ground truth: one table for the test and the report.

Each concept pairs the truth's value (``fhirtwin.sandbox.synthea_truth``, Synthea's own codes) with the
twin's (the adapters' variables, or the engine's diabetes rule); ``expected_scope`` is the scope decision
the truth implies, in the engine's documented precedence. Used by ``tests/integration/test_synthea_twin.py``
and ``benchmarks/synthea_report.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from typing import Any

from fhirtwin.sandbox.synthea_truth import Truth
from fhirtwin.sim.inputs import diabetes_status
from fhirtwin.twin import TwinState


def twin_value(state: TwinState, variable: str, when: date) -> Any:
    """The twin's current value of a variable at ``when`` (None when absent or ended)."""
    ev = state.latest_or_none(variable, when)
    return None if ev is None or ev.value in ("none", None) else ev.value


def _flag(variable: str) -> Callable[[TwinState, date], Any]:
    return lambda state, when: twin_value(state, variable, when) is True


def _statin(state: TwinState, when: date) -> tuple[Any, ...] | None:
    agent = twin_value(state, "statin_agent", when)
    if agent is None:
        return None
    dose = twin_value(state, "statin_daily_dose_mg", when)
    return agent, None if dose is None else float(dose), twin_value(state, "statin_intensity", when)


#: concept -> (value in the truth, value in the twin at the export date)
CONCEPTS: dict[str, tuple[Callable[[Truth], Any], Callable[[TwinState, date], Any]]] = {
    "established ASCVD": (lambda t: t.ascvd, _flag("established_ascvd")),
    "diabetes": (lambda t: t.diabetes, lambda s, w: diabetes_status(s, w)[0]),
    "heart failure": (lambda t: t.heart_failure, _flag("heart_failure")),
    "dialysis": (lambda t: t.dialysis, _flag("dialysis")),
    "kidney transplant": (lambda t: t.kidney_transplant, _flag("kidney_transplant")),
    "CKD stage": (lambda t: None if t.ckd_stage is None else str(t.ckd_stage),
                  lambda s, w: twin_value(s, "ckd_stage", w)),
    "statin agent, dose, intensity": (
        lambda t: None if t.statin is None else (t.statin.agent, t.statin.dose_mg, t.statin.intensity), _statin),
    "smoking status": (lambda t: t.smoking, lambda s, w: twin_value(s, "smoking_status", w)),
}


def expected_scope(t: Truth) -> str | None:
    """The out-of-scope code the truth implies, in the engine's precedence (None: in scope)."""
    if t.kidney_transplant:
        return "scope-kidney-transplant"
    if t.dialysis:
        return "scope-dialysis"
    if t.ckd_stage == 5:
        return "scope-kidney-failure"
    if t.heart_failure:
        return "scope-heart-failure"
    if t.ascvd:
        return "scope-established-ascvd"
    return None
