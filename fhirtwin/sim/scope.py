"""Scope: whether the published equations the engine is anchored on apply to this patient at all.

PREVENT (Khan et al., Circulation 2024;149:430-449) was derived in adults aged 30-79 without
cardiovascular disease (coronary heart disease, stroke, heart failure) at baseline and with eGFR >= 15;
KFRE (Tangri et al., JAMA 2011;305:1553-1559; 2016;315:164-174) in adults with CKD G3-G5 who were not yet
on kidney replacement therapy. Neither was developed or validated in pregnancy. A patient outside those
populations gets no primary-prevention forecast: a secondary-prevention model is a separate question
(see the model card), and a number from the wrong population is worse than none.

The decision is read from the record (conditions, procedures, observations the adapters mapped) and is a
code of the fhirtwin CodeSystem, so an integration engine can filter on it; its reasons name the twin
variables and their source resources, never values.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from fhirtwin.twin import MissingEvidence, TwinState
from fhirtwin.twin.variables import UnknownVariable, get_variable

PREVENT_MIN_AGE, PREVENT_MAX_AGE = 30, 79

IN_SCOPE = "scope-primary-prevention"
#: Out-of-scope decisions in the order they are reported (the first that applies is the code).
#: Each: code, twin variables that establish it (any one true is enough).
EXCLUSIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("scope-kidney-transplant", ("kidney_transplant",)),
    ("scope-dialysis", ("dialysis",)),
    ("scope-heart-failure", ("heart_failure",)),
    ("scope-established-ascvd", ("established_ascvd", "prior_mi", "prior_stroke", "coronary_heart_disease",
                                 "angina", "coronary_revascularisation", "tia", "peripheral_arterial_disease")),
    ("scope-pregnancy", ("pregnancy",)),
)
AGE_OUT_OF_RANGE = "scope-age"
#: Kidney failure without kidney replacement therapy: CKD stage 5 recorded, or (decided by the engine on the
#: fitted inputs) a baseline eGFR below 15, where neither PREVENT nor KFRE was derived.
KIDNEY_FAILURE = "scope-kidney-failure"
EGFR_KIDNEY_FAILURE = 15.0


@dataclass(frozen=True)
class ScopeDecision:
    """The scope code, whether a primary-prevention forecast is made, and why (variables and sources)."""

    code: str
    in_scope: bool
    reasons: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()


def _known(variable: str) -> bool:
    try:
        get_variable(variable)
    except UnknownVariable:
        return False
    return True


def decide_scope(state: TwinState, as_of: date | datetime | None = None) -> ScopeDecision:
    """The scope decision for one twin at ``as_of`` (default: its reference date)."""
    when = as_of or state.reference_date
    for code, variables in EXCLUSIONS:
        if code == "scope-heart-failure":  # kidney failure ranks after replacement therapy, before HF
            stage = state.latest_or_none("ckd_stage", when)
            if stage is not None and str(stage.value) == "5":
                return ScopeDecision(KIDNEY_FAILURE, False, ("CKD stage 5 recorded",), (stage.source.reference,))
        found = [(v, ev) for v in variables if _known(v)
                 for ev in [state.latest_or_none(v, when)] if ev is not None and ev.value is True]
        if found:
            return ScopeDecision(code, False, tuple(f"{v} recorded" for v, _ in found),
                                 tuple(sorted({ev.source.reference for _, ev in found})))
    try:
        age = state.age_years(when)
    except (MissingEvidence, ValueError):  # no birth date, or a reference date before it: reported as data
        return ScopeDecision(IN_SCOPE, True)
    if not PREVENT_MIN_AGE <= age <= PREVENT_MAX_AGE:
        return ScopeDecision(AGE_OUT_OF_RANGE, False, (f"age outside {PREVENT_MIN_AGE}-{PREVENT_MAX_AGE} years",),
                             (state.demographics.source.reference,) if state.demographics.source else ())
    return ScopeDecision(IN_SCOPE, True)
