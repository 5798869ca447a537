"""What the guidelines say a patient should be offered, the risk categories they define, and drug harms.

Why a separate layer from eligibility: ``interventions.candidate_interventions`` says what *could* be
started safely (pharmacogenomics, contraindications); this module says what is *indicated* at the
patient's published risk (thresholds cited in ``guidelines.json``). The planner ranks only indicated
options, by net benefit after harms, and "no drug indicated" is a valid answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fhirtwin.sim._params import intervention_parameters, load
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.interventions import Intervention

INDICATED, CONSIDER, NOT_INDICATED = "indicated", "consider", "not-indicated"


def guideline_parameters() -> dict[str, Any]:
    """Thresholds, categories, harms and net-benefit weights (``guidelines.json``)."""
    return load("guidelines.json")


@dataclass(frozen=True)
class RiskCategory:
    """A guideline risk category: the HL7 risk-probability code, its guideline name, and the source."""

    code: str
    name: str
    source: str


_CATEGORY_KEYS = {("ascvd", 10.0): "ascvd_10y", ("total_cvd", 10.0): "total_cvd_10y",
                  ("kidney_failure", 5.0): "kidney_failure_5y"}


def risk_category(outcome: str, horizon_years: float, probability: float) -> RiskCategory | None:
    """The category a published guideline gives this risk, or None where no guideline defines one."""
    key = _CATEGORY_KEYS.get((outcome, float(horizon_years)))
    if key is None:
        return None
    spec = guideline_parameters()["risk_categories"][key]
    for upper, code, name in spec["bands"]:
        if upper is None or probability < upper:
            return RiskCategory(str(code), str(name), str(spec["source"]))
    return None


@dataclass(frozen=True)
class Indication:
    """Whether a kind of intervention is indicated for this patient, why, and by which guideline.

    ``intensities``: for statins, the intensities the guideline supports at this risk.
    """

    kind: str
    status: str
    reason: str
    source: str
    intensities: tuple[str, ...] = ()


def statin_ldl_goal(published: dict[str, float]) -> float | None:
    """The LDL-C goal (mg/dL) at the published PREVENT-ASCVD risk; None below the intermediate category."""
    ascvd = published["prevent_10y_ascvd"]
    if ascvd < guideline_parameters()["statin"]["moderate_intensity_at_ascvd_10y"]:
        return None
    return _ldl_goal(ascvd)


def _ldl_goal(ascvd_10y: float) -> float:
    for upper, goal in guideline_parameters()["statin"]["ldl_goal_mg_dl"]:
        if upper is None or ascvd_10y < upper:
            return float(goal)
    raise AssertionError("the last LDL goal band is open-ended")


def _statin(inputs: PatientInputs, ascvd: float) -> Indication:
    spec = guideline_parameters()["statin"]
    lo_age, hi_age = spec["diabetes_age_range"]
    current = inputs.statin_intensity if inputs.on_statin else None
    risk = f"PREVENT-ASCVD 10-year {100 * ascvd:.1f} %"
    if ascvd >= spec["high_intensity_at_ascvd_10y"] or inputs.ldl_cholesterol_mg_dl >= spec["severe_ldl_mg_dl"]:
        why = (f"{risk} (high)" if ascvd >= spec["high_intensity_at_ascvd_10y"]
               else f"LDL-C {inputs.ldl_cholesterol_mg_dl:.0f} mg/dL >= {spec['severe_ldl_mg_dl']}")
        if current == "high":
            return Indication("statin", NOT_INDICATED, f"{why}: already on a high-intensity statin", spec["source"])
        return Indication("statin", INDICATED, f"{why}: high-intensity statin", spec["source"], ("high",))
    moderate = ascvd >= spec["moderate_intensity_at_ascvd_10y"]
    diabetic = inputs.diabetes and lo_age <= inputs.age_years <= hi_age
    if moderate or diabetic:
        why = f"{risk} (intermediate)" if moderate else f"diabetes at age {inputs.age_years:.0f}"
        source = spec["source"] if moderate else spec["source_2018"]
        goal = _ldl_goal(max(ascvd, spec["moderate_intensity_at_ascvd_10y"]))
        if current == "moderate" and inputs.ldl_cholesterol_mg_dl >= goal:
            return Indication("statin", INDICATED, f"{why}: LDL-C {inputs.ldl_cholesterol_mg_dl:.0f} mg/dL above the "
                              f"goal of {goal:.0f} on a moderate-intensity statin: intensify", source, ("high",))
        if current in ("moderate", "high"):
            return Indication("statin", NOT_INDICATED, f"{why}: already on a statin of at least moderate intensity",
                              source)
        return Indication("statin", INDICATED, f"{why}: at least a moderate-intensity statin", source,
                          ("moderate", "high"))
    if ascvd >= 0.03:
        return Indication("statin", CONSIDER, f"{risk} (borderline): a shared decision with risk enhancers or "
                          "coronary calcium, not a threshold indication", spec["source"])
    return Indication("statin", NOT_INDICATED, f"{risk} (low): no statin indicated", spec["source"])


def _ezetimibe(inputs: PatientInputs, ascvd: float, statin_room: bool) -> Indication:
    source = guideline_parameters()["nonstatin"]["source"]
    if not inputs.on_statin:
        return Indication("ezetimibe", NOT_INDICATED, "not on a statin: a statin comes first", source)
    goal = _ldl_goal(ascvd)
    if inputs.ldl_cholesterol_mg_dl < goal:
        return Indication("ezetimibe", NOT_INDICATED,
                          f"LDL-C {inputs.ldl_cholesterol_mg_dl:.0f} mg/dL is below the goal of {goal:.0f}", source)
    if inputs.statin_intensity != "high" and statin_room:
        return Indication("ezetimibe", NOT_INDICATED, "the statin can still be intensified first", source)
    severe_ldl = guideline_parameters()["statin"]["severe_ldl_mg_dl"]
    severe = bool(inputs.fh_variant) or inputs.ldl_cholesterol_mg_dl >= severe_ldl
    if ascvd < guideline_parameters()["statin"]["moderate_intensity_at_ascvd_10y"] and not severe:
        return Indication("ezetimibe", NOT_INDICATED, "PREVENT-ASCVD below 5 %: no LDL-C goal applies", source)
    return Indication("ezetimibe", INDICATED,
                      f"LDL-C {inputs.ldl_cholesterol_mg_dl:.0f} mg/dL above the goal of {goal:.0f} on the statin",
                      source)


def _pcsk9(inputs: PatientInputs) -> Indication:
    spec = guideline_parameters()["nonstatin"]
    severe_ldl = guideline_parameters()["statin"]["severe_ldl_mg_dl"]
    severe = bool(inputs.fh_variant) or inputs.ldl_cholesterol_mg_dl >= severe_ldl
    if severe and inputs.on_statin and inputs.ldl_cholesterol_mg_dl >= spec["pcsk9_ldl_on_treatment_mg_dl"]:
        return Indication("pcsk9_inhibitor", CONSIDER, "familial or severe hypercholesterolaemia with LDL-C >= 100 "
                          "mg/dL on a statin: may be considered after ezetimibe (IIb)", spec["source"])
    return Indication("pcsk9_inhibitor", NOT_INDICATED,
                      "no familial or severe hypercholesterolaemia above goal on treatment", spec["source"])


def _blood_pressure(inputs: PatientInputs, total_cvd: float) -> Indication:
    spec = guideline_parameters()["blood_pressure"]
    sbp = inputs.systolic_bp_mm_hg
    if sbp >= spec["stage_2_sbp_mm_hg"]:
        return Indication("bp_lowering", INDICATED, f"SBP {sbp:.0f} mmHg >= {spec['stage_2_sbp_mm_hg']}",
                          spec["source"])
    if sbp >= spec["stage_1_sbp_mm_hg"]:
        high = total_cvd >= spec["stage_1_total_cvd_10y"]
        if high or inputs.diabetes or inputs.ckd or inputs.on_bp_treatment:
            why = (f"PREVENT total CVD {100 * total_cvd:.1f} % >= 7.5 %" if high
                   else "on treatment above the 130 mmHg target" if inputs.on_bp_treatment else "diabetes or CKD")
            return Indication("bp_lowering", INDICATED, f"SBP {sbp:.0f} mmHg (stage 1) with {why}", spec["source"])
        return Indication("bp_lowering", NOT_INDICATED, f"SBP {sbp:.0f} mmHg (stage 1) with PREVENT total CVD "
                          f"{100 * total_cvd:.1f} % < 7.5 %: lifestyle first", spec["source"])
    return Indication("bp_lowering", NOT_INDICATED, f"SBP {sbp:.0f} mmHg below {spec['stage_1_sbp_mm_hg']}",
                      spec["source"])


def _sglt2i(inputs: PatientInputs) -> Indication:
    spec = guideline_parameters()["sglt2i"]
    egfr, uacr = inputs.egfr_ml_min_1_73m2, inputs.uacr_mg_g
    if inputs.on_sglt2i:
        return Indication("sglt2i", NOT_INDICATED, "already on an SGLT2 inhibitor", spec["source"])
    if egfr < spec["min_egfr_ml_min_1_73m2"]:
        return Indication("sglt2i", NOT_INDICATED, f"eGFR {egfr:.0f} < {spec['min_egfr_ml_min_1_73m2']}: not started",
                          spec["source"])
    ckd = inputs.ckd or egfr < 60 or (uacr is not None and uacr >= 30)
    if inputs.diabetes and ckd:
        return Indication("sglt2i", INDICATED, "diabetes (type 2 assumed: not for type 1) with CKD", spec["source"])
    if ckd and uacr is not None and uacr >= spec["albuminuria_uacr_mg_g"]:
        return Indication("sglt2i", INDICATED, f"CKD with UACR {uacr:.0f} mg/g", spec["source"])
    if ckd and egfr < spec["ckd_any_albuminuria_below_egfr"]:
        return Indication("sglt2i", CONSIDER, f"CKD with eGFR {egfr:.0f} (20-45) and UACR below 200 mg/g: "
                          "suggested (KDIGO 2B)", spec["source"])
    return Indication("sglt2i", NOT_INDICATED, "no diabetic kidney disease, albuminuric CKD or eGFR 20-45",
                      spec["source"])


def indications(inputs: PatientInputs, published: dict[str, float], statin_room: bool = True) -> dict[str, Indication]:
    """Indication per intervention kind at the published 10-year PREVENT risks (``Anchors.published``).

    ``statin_room``: whether a higher statin intensity is allowed (pharmacogenomics may forbid it).
    """
    ascvd, total = published["prevent_10y_ascvd"], published["prevent_10y_total_cvd"]
    smoking = (Indication("smoking_cessation", INDICATED, "current smoker", "USPSTF 2021 tobacco cessation (A)")
               if inputs.current_smoker else
               Indication("smoking_cessation", NOT_INDICATED, "not a current smoker", ""))
    found = (_statin(inputs, ascvd), _ezetimibe(inputs, ascvd, statin_room), _pcsk9(inputs),
             _blood_pressure(inputs, total), _sglt2i(inputs), smoking)
    return {i.kind: i for i in found}


@dataclass(frozen=True)
class Harm:
    """Expected excess events of one drug harm over the horizon, per 1,000 treated."""

    intervention: str
    harm: str
    per_1000: float
    serious: bool
    source: str

    def text(self) -> str:
        """One line for the plan (``harm: N per 1,000 over the horizon``)."""
        kind = "serious, " if self.serious else ""
        return f"{self.harm}: about {self.per_1000:.1f} per 1,000 treated ({kind}{self.source})"


def expected_harms(intervention: Intervention, inputs: PatientInputs, horizon_years: float) -> tuple[Harm, ...]:
    """Trial-measured excess harms of one intervention over the horizon."""
    rows = guideline_parameters()["harms_per_1000_person_years"].get(intervention.kind, [])
    out = []
    for row in rows:
        if (row.get("only_with_diabetes") and not inputs.diabetes) or (row.get("only_without_diabetes")
                                                                       and inputs.diabetes):
            continue
        years = min(float(row.get("years", horizon_years)), horizon_years)
        scale = 1.0
        if "sbp_difference_mm_hg" in row:  # measured at a larger SBP difference than one drug gives
            one_drug = float(intervention_parameters()["sbp_lowering_one_drug_mm_hg"]["value"])
            drop = intervention.sbp_drop_mm_hg or one_drug
            scale = min(drop / float(row["sbp_difference_mm_hg"]), 1.0)
        out.append(Harm(intervention.label, str(row["harm"]), float(row["rate"]) * years * scale,
                        bool(row["serious"]), str(row["source"])))
    return tuple(out)


def harm_weight(harms: tuple[Harm, ...]) -> float:
    """Harms in major-event equivalents (probability scale), with the configured weights."""
    weights = guideline_parameters()["net_benefit_weights"]
    return float(sum(h.per_1000 / 1000.0 * (weights["serious_harm"] if h.serious else weights["other_harm"])
                     for h in harms))


def outcome_weights() -> dict[str, float]:
    """Weight of each outcome in the net benefit (major-event equivalents)."""
    return {k: float(v) for k, v in guideline_parameters()["net_benefit_weights"]["outcomes"].items()}
