"""A draft CarePlan proposal (intent ``proposal``: a clinician approves) and its Goals, from a Plan.

Activities come from the planner's ranked options: one activity per distinct intervention (coded from
the fhirtwin CodeSystem, statins also by RxNorm ingredient) carrying its own expected absolute risk
reduction and NNT with 90 % intervals in the ``expected-benefit`` extension, plus the monitoring that
goes with it. The best combined option sits in the same extension on the CarePlan. Exclusions and
pharmacogenomic reasons are stated in ``note`` and in the activity descriptions.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from fhirtwin.vocabulary import EXT_EXPECTED_BENEFIT, LOINC, UCUM, coding, concept, meta
from fhirtwin.writeback.contracts import InterventionLike, OptionLike, PlanLike, StateLike
from fhirtwin.writeback.identifiers import configuration_of, identifier, prediction_key
from fhirtwin.writeback.riskassessment import OUTCOME_TEXT, outcome_concept, scope_extension

RXNORM_INGREDIENTS = {"atorvastatin": "83367", "rosuvastatin": "301542", "simvastatin": "36567",
                      "pravastatin": "42463"}
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"

# Goals. LDL-C: the plan's goal, from the 2026 ACC/AHA dyslipidemia guideline at the patient's PREVENT-ASCVD
# risk (< 70 mg/dL at >= 10 %, < 100 mg/dL at 5 to < 10 %; none below 5 %). SBP: < 130 mmHg, the 2025
# AHA/ACC high blood pressure guideline target.
SBP_TARGET_MM_HG = 130
GOAL_OF_KIND = {"statin": "ldl", "ezetimibe": "ldl", "pcsk9_inhibitor": "ldl", "bp_lowering": "sbp"}
GOALS: dict[str, dict[str, Any]] = {
    "ldl": {"code": "ldl-target",
            "loinc": ("13457-7", "Cholesterol in LDL [Mass/volume] in Serum or Plasma by calculation"),
            "unit": "mg/dL"},
    "sbp": {"code": "sbp-target", "loinc": ("8480-6", "Systolic blood pressure"), "unit": "mm[Hg]"},
}


def _activity_code(intervention: InterventionLike) -> str:
    if intervention.kind == "statin":
        return "statin-high-intensity" if intervention.intensity == "high" else "statin-moderate-intensity"
    return {"bp_lowering": "bp-lowering-agent", "sglt2i": "sglt2-inhibitor", "smoking_cessation": "smoking-cessation",
            "ezetimibe": "ezetimibe", "pcsk9_inhibitor": "pcsk9-inhibitor"}[intervention.kind]


def _harm_text(option: OptionLike | None) -> list[str]:
    """The option's trial-measured harms as one sentence (empty when it has none)."""
    if option is None or not option.harms:
        return []
    return ["Expected harms over the horizon: " + "; ".join(option.harms) + "."]


def _start(state: StateLike, occurrence: datetime) -> date:
    ref = state.reference_date
    if isinstance(ref, datetime):
        return ref.date()
    return ref if isinstance(ref, date) else occurrence.date()


def _key(plan: PlanLike, kind: str) -> str:
    f = plan.baseline
    return prediction_key(f.patient_id, f.model, f.model_version, f.sources, f.scenario.name, f.horizon_years, kind,
                          configuration_of(f.method))


def benefit_extension(option: OptionLike, plan: PlanLike) -> dict[str, Any]:
    """``expected-benefit``: ARR with 90 % interval and NNT (when defined) on the ranking outcome."""
    arr = option.arr
    parts: list[dict[str, Any]] = [
        {"url": "scenario", "valueString": option.scenario.name},
        {"url": "outcome", "valueCodeableConcept": outcome_concept(plan.outcome)},
        {"url": "horizon", "valueQuantity": {"value": plan.horizon_years, "unit": "a", "system": UCUM, "code": "a"}},
        {"url": "arr", "valueDecimal": round(arr["median"], 4)},
        {"url": "arrLower", "valueDecimal": round(arr["p05"], 4)},
        {"url": "arrUpper", "valueDecimal": round(arr["p95"], 4)},
    ]
    if option.nnt is not None:
        parts.append({"url": "nnt", "valueDecimal": round(option.nnt, 1)})
        if option.nnt_interval:
            parts.append({"url": "nntLower", "valueDecimal": round(option.nnt_interval[0], 1)})
            parts.append({"url": "nntUpper", "valueDecimal": round(option.nnt_interval[1], 1)})
    if option.nnt_note:
        parts.append({"url": "note", "valueString": option.nnt_note})
    return {"url": EXT_EXPECTED_BENEFIT, "extension": parts}


def _targets(plan: PlanLike) -> dict[str, tuple[float, str]]:
    """Goal name -> (upper target, text); the LDL-C Goal only where the guideline sets one."""
    targets = {"sbp": (float(SBP_TARGET_MM_HG), f"Systolic blood pressure below {SBP_TARGET_MM_HG} mmHg (2025 AHA/ACC "
                                                 "high blood pressure guideline)")}
    if plan.ldl_goal_mg_dl is not None:
        targets["ldl"] = (plan.ldl_goal_mg_dl, f"LDL cholesterol below {plan.ldl_goal_mg_dl:g} mg/dL (2026 ACC/AHA "
                                               "dyslipidemia guideline at the patient's PREVENT-ASCVD risk)")
    return targets


def goal_keys(plan: PlanLike) -> dict[str, str]:
    """Business identifier values of the Goals (``ldl`` where a goal applies, ``sbp``)."""
    return {name: _key(plan, f"Goal/{name}") for name in GOALS if name in _targets(plan)}


def build_goals(plan: PlanLike, state: StateLike, ra_refs: dict[str, str],
                occurrence: datetime) -> dict[str, dict[str, Any]]:
    """LDL-C and SBP target Goals (lifecycle ``proposed``), addressing the CVD RiskAssessments."""
    targets = _targets(plan)
    keys = goal_keys(plan)
    addresses = [{"reference": ra_refs[o]} for o in ("total_cvd", "ascvd") if o in ra_refs]
    goals = {}
    for name, spec in GOALS.items():
        if name not in targets:
            continue
        value, text = targets[name]
        goal: dict[str, Any] = {
            "resourceType": "Goal",
            "meta": meta("fhirtwin-goal"),
            "identifier": [identifier(keys[name])],
            "lifecycleStatus": "proposed",
            "description": {"coding": [coding(spec["code"])], "text": text},
            "subject": {"reference": f"Patient/{plan.baseline.patient_id}"},
            "startDate": _start(state, occurrence).isoformat(),
            "target": [{
                "measure": {"coding": [coding(spec["loinc"][0], LOINC, spec["loinc"][1])]},
                "detailQuantity": {"value": value, "comparator": "<", "unit": spec["unit"].replace("[Hg]", "Hg"),
                                   "system": UCUM, "code": spec["unit"]},
            }],
        }
        if addresses:
            goal["addresses"] = addresses
        goals[name] = goal
    return goals


def care_plan_key(plan: PlanLike) -> str:
    """Business identifier value of the CarePlan."""
    return _key(plan, "CarePlan")


def _activities(plan: PlanLike, ra_refs: dict[str, str], goal_refs: dict[str, str]) -> list[dict[str, Any]]:
    singles = {opt.scenario.interventions[0]: opt for opt in plan.options if len(opt.scenario.interventions) == 1}
    seen: list[Any] = []
    for option in plan.options:
        for intervention in option.scenario.interventions:
            if intervention not in seen:
                seen.append(intervention)
    activities = []
    for intervention in seen:
        code = _activity_code(intervention)
        detail: dict[str, Any] = {
            "kind": "ServiceRequest" if intervention.kind == "smoking_cessation" else "MedicationRequest",
            "code": concept(code, text=intervention.label),
            "status": "not-started",
            "description": " ".join([intervention.label + ".", *intervention.notes,
                                     *_harm_text(singles.get(intervention))]).strip(),
        }
        # R4 detail.reasonReference admits Condition/Observation/DiagnosticReport/DocumentReference only:
        # the RiskAssessments are linked from CarePlan.supportingInfo; the reason is stated as text here.
        detail["reasonCode"] = [{"text": f"{OUTCOME_TEXT.get(target, target)} risk (fhirtwin RiskAssessment)"}
                                for target in (["kidney_failure"] if intervention.kind == "sglt2i" else [])
                                + [plan.outcome] if target in ra_refs]
        if not detail["reasonCode"]:
            del detail["reasonCode"]
        goal = GOAL_OF_KIND.get(intervention.kind)
        if goal and goal in goal_refs:
            detail["goal"] = [{"reference": goal_refs[goal]}]
        if intervention.agent in RXNORM_INGREDIENTS:
            detail["productCodeableConcept"] = {
                "coding": [{"system": RXNORM, "code": RXNORM_INGREDIENTS[intervention.agent],
                            "display": intervention.agent}],
                "text": f"{intervention.agent} {intervention.dose_mg:g} mg daily" if intervention.dose_mg else
                intervention.agent,
            }
        activity: dict[str, Any] = {"detail": detail}
        if intervention in singles:
            activity["extension"] = [benefit_extension(singles[intervention], plan)]
        activities.append(activity)
    kinds = {i.kind for i in seen}
    monitoring: list[tuple[str, str, str | None]] = []
    if kinds & {"statin", "ezetimibe", "pcsk9_inhibitor"}:
        monitoring.append(("monitoring-lipids", "Repeat lipid panel 4-12 weeks after a statin change", "ldl"))
    if "bp_lowering" in kinds:
        monitoring.append(("monitoring-bp", "Blood pressure follow-up within 4 weeks of a change", "sbp"))
    if "sglt2i" in kinds:
        monitoring.append(("monitoring-kidney", "eGFR and UACR 2-4 weeks after starting, then yearly", None))
    for code, text, goal in monitoring:
        detail = {"kind": "ServiceRequest", "code": concept(code), "status": "not-started",
                  "scheduledString": text, "description": text}
        if goal and goal in goal_refs:
            detail["goal"] = [{"reference": goal_refs[goal]}]
        activities.append({"detail": detail})
    return activities


def build_care_plan(
    plan: PlanLike,
    state: StateLike,
    *,
    ra_refs: dict[str, str],
    goal_refs: dict[str, str],
    occurrence: datetime,
    device_reference: str,
) -> dict[str, Any]:
    """The draft CarePlan proposal (no id: the server assigns it)."""
    forecast = plan.baseline
    conditions = sorted({ref.split("/_history/")[0] for ref in forecast.sources if ref.startswith("Condition/")})
    notes = [{"text": "Proposal generated by fhirtwin for clinician review; nothing here is an order."}]
    if plan.excluded:
        notes.append({"text": "Not proposed: " + "; ".join(
            f"{e.candidate}: {e.reason}" + (f" [{e.source}]" if e.source else "") for e in plan.excluded)})
    if plan.notes:
        notes.append({"text": "Pharmacogenomic and other notes: " + "; ".join(plan.notes)})
    if forecast.scales:
        notes.append({"text": "What each scale of the twin contributed: " + "; ".join(
            s.text() for s in forecast.scales) + "."})
    care_plan: dict[str, Any] = {
        "resourceType": "CarePlan",
        "meta": meta("fhirtwin-careplan"),
        "identifier": [identifier(care_plan_key(plan))],
        "status": "draft",
        "intent": "proposal",
        "category": [concept("twin-care-plan")],
        "title": "fhirtwin cardiovascular and kidney risk reduction proposal",
        "description": (f"Guideline-indicated interventions ranked by {plan.horizon_years:g}-year net benefit "
                        "(ASCVD, heart-failure and kidney-failure events prevented minus weighted drug harms) "
                        "from the patient's digital twin; absolute risk reductions are on "
                        f"{OUTCOME_TEXT.get(plan.outcome, plan.outcome)}."),
        "subject": {"reference": f"Patient/{forecast.patient_id}"},
        "period": {"start": _start(state, occurrence).isoformat()},
        "created": occurrence.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "author": {"reference": device_reference},
        "note": notes,
    }
    # FHIR JSON has no empty arrays: supportingInfo and goal only when there is something to reference.
    if ra_refs:
        care_plan["supportingInfo"] = [{"reference": ref} for ref in ra_refs.values()]
    if goal_refs:
        care_plan["goal"] = [{"reference": ref} for ref in goal_refs.values()]
    if plan.options:
        care_plan["extension"] = [benefit_extension(plan.options[0], plan)]
    care_plan.setdefault("extension", []).append(scope_extension(plan.scope))
    if conditions:
        care_plan["addresses"] = [{"reference": ref} for ref in conditions]
    activities = _activities(plan, ra_refs, goal_refs)
    if activities:
        care_plan["activity"] = activities
    return care_plan


def draft_care_plan_key(plan: PlanLike) -> str:
    """Business identifier value of the standalone draft CarePlan (differs from the written CarePlan's)."""
    return _key(plan, "CarePlan/draft")


def build_draft_care_plan(plan: PlanLike, state: StateLike, *, occurrence: datetime,
                          device_reference: str) -> dict[str, Any]:
    """A standalone draft CarePlan proposal, e.g. for a CDS Hooks suggestion (nothing else is written).

    It conforms to the ``fhirtwin-careplan`` profile on its own: with no RiskAssessment stored to point
    at, ``supportingInfo`` (required by the profile) lists the versioned input resources the forecast used
    (``plan.baseline.sources``): R4 defines supportingInfo as information considered as part of the plan,
    which is what the inputs are. There are no Goals to reference. Its identifier is keyed as
    ``CarePlan/draft``, not as the CarePlan a write-back creates: if a clinician accepts the draft, a later
    write-back still creates its own signed CarePlan instead of matching the draft's identifier (the
    Provenance signature covers the CarePlan fhirtwin built, not the accepted draft).
    """
    care_plan = build_care_plan(plan, state, ra_refs={}, goal_refs={}, occurrence=occurrence,
                                device_reference=device_reference)
    care_plan["identifier"] = [identifier(draft_care_plan_key(plan))]
    care_plan["supportingInfo"] = [{"reference": ref} for ref in sorted(plan.baseline.sources)]
    care_plan["note"].append({"text": "Draft for review: the risk assessments behind it are not stored yet; "
                                      "supportingInfo lists the record entries the forecast used."})
    return care_plan
