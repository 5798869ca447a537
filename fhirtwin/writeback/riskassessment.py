"""RiskAssessment resources from a Plan's baseline Forecast: one per outcome, predictions per horizon.

Decisions (also stated in the fhirtwin-riskassessment profile):

* **Probability scale**: ``prediction.probabilityDecimal`` is the ensemble **median as a fraction 0–1**
  (as in the official R4 examples and the Genomics IG), never a percentage; the profile enforces
  ``<= 1`` with invariant ``ftw-ra-1``. The 90 % interval (5th–95th percentile of the ensemble) goes in
  the ``probability-interval`` extension (lower, upper, level 0.9), also as fractions.
* **One RiskAssessment per outcome** (ASCVD, total CVD, heart failure, kidney failure) so that "the
  current assessment per outcome" is one resource: ``RiskAssessment?subject=Patient/X&code=<risk code>
  &_tag:not=https://fhirtwin.org/CodeSystem/fhirtwin|superseded``.
* **qualitativeRisk** only where a guideline defines categories for that outcome and horizon (the
  Forecast's ``risk_category``: PREVENT-ASCVD and total CVD at 10 years, KFRE at 5); ``relativeRisk`` is
  omitted: the Forecast carries no population reference risk, and a ratio to an invented reference would
  mislead.
* **Model card**: the ``model-card`` extension (valueCanonical) names the Library of the HTI-1 source
  attributes of the model version that made the assessment (:mod:`fhirtwin.writeback.library`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from fhirtwin.vocabulary import (
    CONCEPTS,
    EXT_MODEL_CARD,
    EXT_PROBABILITY_INTERVAL,
    EXT_SCOPE_DECISION,
    EXT_SUPERSEDES,
    OUTCOMES,
    RISK_PROBABILITY,
    SNOMED,
    SNOMED_DISPLAY,
    coding,
    concept,
    meta,
    profile,
)
from fhirtwin.writeback.contracts import ForecastLike, PlanLike, StateLike
from fhirtwin.writeback.identifiers import configuration_of, identifier, prediction_key
from fhirtwin.writeback.library import model_card_url

HORIZONS_YEARS = (5.0, 10.0)

RISK_DISPLAY = {"low": "Low likelihood", "moderate": "Moderate likelihood", "high": "High likelihood"}
OUTCOME_TEXT = {"ascvd": "ASCVD", "total_cvd": "total CVD", "heart_failure": "heart failure",
                "kidney_failure": "kidney failure"}


def _fraction(value: float) -> float:
    return round(min(1.0, max(0.0, float(value))), 4)


def _add_years(start: date, years: float) -> date:
    whole = int(years)
    try:
        return start.replace(year=start.year + whole)
    except ValueError:  # 29 February
        return start.replace(year=start.year + whole, day=28)


#: PREVENT model (``method_of("prevent_risk", model)["variant"]``) -> fhirtwin code of the equation variant.
PREVENT_CODES = {"base": "prevent-2024-base", "uacr": "prevent-2024-uacr", "hba1c": "prevent-2024-hba1c",
                 "sdi": "prevent-2024-sdi", "full": "prevent-2024-full"}
#: KFRE model -> fhirtwin code.
KFRE_CODES = {"4-variable": "kfre-4var", "8-variable": "kfre-8var"}
EXT_SIMULATION_MODEL = profile("simulation-model")


def method_concept(forecast: ForecastLike, outcome: str) -> dict[str, Any]:
    """``method``: the one published equation (and variant) that anchors this outcome's risk.

    A CodeableConcept's codings must all mean the same concept, so ``method`` names only the anchoring
    equation: PREVENT (its model variant) for the cardiovascular outcomes; for kidney failure the KFRE
    variant (averaged over a published UACR distribution when UACR was not measured). The simulation model
    that projects it over time is in the ``simulation-model`` extension (:func:`simulation_model_extension`).
    """
    method = forecast.method or {}
    code = None
    if outcome == "kidney_failure":
        anchor = method.get("kfre") or {}
        code = KFRE_CODES.get(str(anchor.get("variant", "")))
    else:
        anchor = method.get("prevent") or {}
        code = PREVENT_CODES.get(str(anchor.get("variant", "")))
    text = (f"{anchor.get('model', 'n/a')} (variant {anchor.get('variant', 'n/a')}, implementation "
            f"{anchor.get('implementation_version', 'n/a')})")
    if outcome == "kidney_failure" and method.get("kidney_mode") == "kfre-imputed-uacr":
        text += "; UACR not measured: averaged over a published UACR distribution"
    out: dict[str, Any] = {"text": text}
    if code:
        out["coding"] = [coding(code)]
    return out


def scope_extension(scope: str) -> dict[str, Any]:
    """The coded scope decision (``scope-decision`` extension) that an integration engine can filter on."""
    return {"url": EXT_SCOPE_DECISION, "valueCodeableConcept": concept(scope)}


def simulation_model_extension(forecast: ForecastLike) -> dict[str, Any]:
    """``simulation-model``: the fhirtwin model (code) and its version (text) that projected the risk."""
    value: dict[str, Any] = {"text": f"{forecast.model} {forecast.model_version}"}
    if forecast.model in CONCEPTS:
        value["coding"] = [coding(forecast.model)]
    return {"url": EXT_SIMULATION_MODEL, "valueCodeableConcept": value}


def model_card_extension(forecast: ForecastLike) -> dict[str, Any]:
    """``model-card``: the canonical URL of the model version's model card (a Library; HTI-1 attributes)."""
    return {"url": EXT_MODEL_CARD, "valueCanonical": model_card_url(forecast.model, forecast.model_version)}


def outcome_concept(outcome: str) -> dict[str, Any]:
    """Coded outcome: the fhirtwin code, plus SNOMED CT where a single concept fits."""
    code, snomed, _ = OUTCOMES[outcome]
    codings = [coding(code)]
    if snomed:
        codings.append(coding(snomed, SNOMED, SNOMED_DISPLAY[snomed]))
    return {"coding": codings, "text": OUTCOME_TEXT[outcome]}


def rationale(forecast: ForecastLike, outcome: str) -> str:
    """The main drivers of this outcome's risk, largest first, in percentage points."""
    drivers = sorted((d for d in forecast.drivers if d.outcome == outcome), key=lambda d: -abs(d.contribution))
    parts = [f"{d.factor} {d.value} (reference {d.reference}): {100 * d.contribution:+.1f} percentage points"
             for d in drivers[:4]]
    text = "Main drivers of the 10-year risk: " + ("; ".join(parts) if parts else "none above the reference values")
    years = 5.0 if outcome == "kidney_failure" else 10.0
    if years <= forecast.horizon_years:
        category = forecast.risk_category(outcome, years, forecast.at_horizon(outcome, years)["median"])
        if category is not None:
            text += f". Qualitative risk at {years:g} years: {category.name} ({category.source})"
    return text + " Probabilities are fractions (0-1): ensemble median, 90 % interval in the extension."


def mitigation(plan: PlanLike, outcome: str, top: int = 3) -> str | None:
    """The top-ranked interventions with their effect on this outcome."""
    if not plan.options:
        return None
    lines = []
    for rank, option in enumerate(plan.options[:top], 1):
        if outcome == plan.outcome:
            arr = option.arr
            effect = f"ARR {100 * arr['median']:.1f} % (90 % interval {100 * arr['p05']:.1f} to {100 * arr['p95']:.1f})"
            if option.nnt is not None:
                effect += f", NNT {option.nnt:.0f}"
        else:
            effect = f"ARR {100 * option.arr_by_outcome.get(outcome, 0.0):.1f} % (median)"
        lines.append(f"{rank}. {option.scenario.name}: {effect}")
    return (f"Guideline-indicated interventions ranked by {plan.horizon_years:g}-year net benefit after harms "
            f"(ARR on {OUTCOME_TEXT.get(outcome, outcome)}): " + "; ".join(lines)
            + ". See the fhirtwin CarePlan proposal.")


def quality_notes(forecast: ForecastLike, state: StateLike) -> list[dict[str, str]]:
    """Annotations: the Forecast's caveats and a summary of the data-quality ledger (kinds and counts)."""
    notes = []
    if forecast.caveats:
        notes.append({"text": "Model caveats: " + "; ".join(forecast.caveats)})
    rejected = Counter(e.kind.value for e in state.ledger if e.rejected)
    other = Counter(e.kind.value for e in state.ledger if not e.rejected)
    if rejected or other:
        text = "Data-quality ledger: "
        text += ("inputs or parts not used: " + ", ".join(f"{k} {n}" for k, n in sorted(rejected.items()))
                 if rejected else "no input rejected")
        if other:
            text += "; values transformed: " + ", ".join(f"{k} {n}" for k, n in sorted(other.items()))
        notes.append({"text": text})
    return notes


def risk_key(forecast: ForecastLike, outcome: str) -> str:
    """Business identifier value of the RiskAssessment for one outcome."""
    return prediction_key(forecast.patient_id, forecast.model, forecast.model_version, forecast.sources,
                          forecast.scenario.name, forecast.horizon_years, f"RiskAssessment/{outcome}",
                          configuration_of(forecast.method))


def build_risk_assessment(
    plan: PlanLike,
    state: StateLike,
    outcome: str,
    *,
    occurrence: datetime,
    device_reference: str,
    supersedes: Sequence[str] = (),
) -> dict[str, Any]:
    """The RiskAssessment of one outcome from the Plan's baseline Forecast (no id: the server assigns it)."""
    forecast = plan.baseline
    start = state.reference_date if isinstance(state.reference_date, date) else occurrence.date()
    if isinstance(start, datetime):
        start = start.date()
    predictions = []
    for years in HORIZONS_YEARS:
        if years > forecast.horizon_years + 1e-9:
            continue
        at = forecast.at_horizon(outcome, years)
        median = _fraction(at["median"])
        prediction: dict[str, Any] = {
            "extension": [{
                "url": EXT_PROBABILITY_INTERVAL,
                "extension": [
                    {"url": "lower", "valueDecimal": _fraction(at["p05"])},
                    {"url": "upper", "valueDecimal": _fraction(at["p95"])},
                    {"url": "level", "valueDecimal": 0.9},
                ],
            }],
            "outcome": outcome_concept(outcome),
            "probabilityDecimal": median,
            "whenPeriod": {"start": start.isoformat(), "end": _add_years(start, years).isoformat()},
        }
        category = forecast.risk_category(outcome, years, median)
        if category is not None:
            prediction["qualitativeRisk"] = {"coding": [coding(category.code, RISK_PROBABILITY,
                                                               RISK_DISPLAY[category.code])],
                                             "text": category.name}
        predictions.append(prediction)
    _, _, assessment_code = OUTCOMES[outcome]
    resource: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "meta": meta("fhirtwin-riskassessment"),
        "identifier": [identifier(risk_key(forecast, outcome))],
        "status": "final",
        "method": method_concept(forecast, outcome),
        "code": concept(assessment_code),
        "subject": {"reference": f"Patient/{forecast.patient_id}"},
        "occurrenceDateTime": occurrence.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "performer": {"reference": device_reference},
        "basis": [{"reference": ref} for ref in sorted(forecast.sources)],
        "prediction": predictions,
    }
    resource["extension"] = [simulation_model_extension(forecast), scope_extension(plan.scope),
                             model_card_extension(forecast)]
    resource["extension"] += [{"url": EXT_SUPERSEDES, "valueReference": {"reference": ref}} for ref in supersedes]
    text = mitigation(plan, outcome)
    if text:
        resource["mitigation"] = text
    notes = quality_notes(forecast, state)
    for prediction in predictions:
        prediction["rationale"] = rationale(forecast, outcome)
    if notes:
        resource["note"] = notes
    return resource

