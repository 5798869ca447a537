"""RiskAssessment, Goal, CarePlan and Device building; identifiers; profiles and CodeSystem in sync."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from writeback_fixtures import NOW, changed_run, cohort_run

from fhirtwin.sim.guidelines import risk_category
from fhirtwin.vocabulary import (
    CODESYSTEM,
    CONCEPTS,
    GENERATED_TAG,
    PREDICTION_ID_SYSTEM,
    coding,
    is_fhirtwin_generated,
)
from fhirtwin.writeback.careplan import build_care_plan, build_draft_care_plan, build_goals
from fhirtwin.writeback.device import device_resource
from fhirtwin.writeback.identifiers import prediction_key
from fhirtwin.writeback.riskassessment import (
    KFRE_CODES,
    PREVENT_CODES,
    build_risk_assessment,
    method_concept,
    risk_key,
    simulation_model_extension,
)

PROFILES = Path(__file__).resolve().parents[2] / "fhirtwin" / "profiles"


def _ra(outcome: str = "total_cvd") -> dict:
    run = cohort_run()
    return build_risk_assessment(run.plan, run.state, outcome, occurrence=NOW, device_reference="Device/d")


def test_risk_assessment_probability_is_a_fraction_with_interval() -> None:
    ra = _ra()
    forecast = cohort_run().plan.baseline
    assert ra["status"] == "final" and ra["subject"]["reference"] == f"Patient/{forecast.patient_id}"
    assert ra["meta"]["profile"] == ["https://fhirtwin.org/fhir/StructureDefinition/fhirtwin-riskassessment"]
    assert GENERATED_TAG in ra["meta"]["tag"]
    assert [p["whenPeriod"]["end"][:4] for p in ra["prediction"]] == ["2031", "2036"]
    for prediction, years in zip(ra["prediction"], (5.0, 10.0), strict=True):
        at = forecast.at_horizon("total_cvd", years)
        p = prediction["probabilityDecimal"]
        assert 0 <= p <= 1 and abs(p - at["median"]) < 1e-4
        parts = {e["url"]: e["valueDecimal"] for e in prediction["extension"][0]["extension"]}
        assert parts["lower"] <= p <= parts["upper"] and parts["level"] == 0.9
        assert "drivers" in prediction["rationale"]
    expected = "high" if p >= 0.075 else "low"  # 2025 AHA/ACC: PREVENT total CVD 7.5 % treatment threshold
    assert ra["prediction"][1]["qualitativeRisk"]["coding"][0]["code"] == expected
    assert "qualitativeRisk" not in ra["prediction"][0]  # no guideline category at 5 years


def test_basis_is_every_input_versioned() -> None:
    ra = _ra()
    refs = [b["reference"] for b in ra["basis"]]
    assert refs == sorted(cohort_run().plan.baseline.sources)
    assert refs and all("/_history/1" in r for r in refs)


def test_qualitative_categories_only_where_a_guideline_defines_them() -> None:
    # 2026 ACC/AHA dyslipidemia guideline, PREVENT-ASCVD: < 3 % low, 3-< 5 % borderline, 5-< 10 % intermediate
    assert [(c.code, c.name) for c in (risk_category("ascvd", 10.0, p) for p in (0.029, 0.03, 0.05, 0.0999, 0.10))
            if c] == [("low", "low"), ("low", "borderline"), ("moderate", "intermediate"),
                      ("moderate", "intermediate"), ("high", "high")]
    assert risk_category("total_cvd", 10.0, 0.074).code == "low"
    assert risk_category("total_cvd", 10.0, 0.075).code == "high"
    assert risk_category("kidney_failure", 5.0, 0.031).code == "moderate"
    assert risk_category("heart_failure", 10.0, 0.5) is None
    assert risk_category("total_cvd", 5.0, 0.5) is None


def test_method_is_one_concept_the_anchoring_equation_and_mitigation_names_interventions() -> None:
    ra = _ra()
    # one concept per CodeableConcept: the equation variant in method, the simulation model in its extension
    assert [c["code"] for c in ra["method"]["coding"]] == ["prevent-2024-full"]
    model = next(e for e in ra["extension"] if e["url"].endswith("/simulation-model"))["valueCodeableConcept"]
    assert [c["code"] for c in model["coding"]] == ["fhirtwin-mechanistic"] and "0.3.0" in model["text"]
    assert cohort_run().plan.options[0].scenario.name in ra["mitigation"]
    kidney = _ra("kidney_failure")
    assert [c["code"] for c in kidney["method"]["coding"]] == ["kfre-4var"]


def test_method_codes_every_variant_and_the_imputed_uacr_route() -> None:
    def forecast(**method: object) -> SimpleNamespace:
        return SimpleNamespace(method=method, model="fhirtwin-equations", model_version="0.1.0")

    for variant, code in PREVENT_CODES.items():
        assert method_concept(forecast(prevent={"variant": variant}), "ascvd")["coding"] == [coding(code)]
    imputed = method_concept(forecast(kidney_mode="kfre-imputed-uacr", kfre={"variant": "4-variable"}),
                             "kidney_failure")
    assert imputed["coding"] == [coding("kfre-4var")] and "UACR not measured" in imputed["text"]
    kfre8 = method_concept(forecast(kidney_mode="kfre", kfre={"variant": "8-variable"}), "kidney_failure")
    assert kfre8["coding"] == [coding("kfre-8var")]
    assert all(c in CONCEPTS for c in [*PREVENT_CODES.values(), *KFRE_CODES.values()])
    ext = simulation_model_extension(forecast())
    assert ext["valueCodeableConcept"]["coding"] == [coding("fhirtwin-equations")]


def test_identifiers_deterministic_and_input_sensitive() -> None:
    forecast = cohort_run().plan.baseline
    assert risk_key(forecast, "ascvd") == risk_key(forecast, "ascvd") != risk_key(forecast, "total_cvd")
    assert risk_key(changed_run().plan.baseline, "ascvd") != risk_key(forecast, "ascvd")
    args = ("p", "m", "1", ["b/1", "a/1"], "baseline", 10.0, "k")
    assert prediction_key(*args) == prediction_key("p", "m", "1", ["a/1", "b/1", "a/1"], "baseline", 10, "k")
    assert prediction_key(*args) != prediction_key("p", "m", "2", ["a/1", "b/1"], "baseline", 10.0, "k")
    assert _ra()["identifier"][0]["system"] == PREDICTION_ID_SYSTEM


def test_goals_and_care_plan() -> None:
    run = cohort_run()
    ra_refs = {"total_cvd": "urn:uuid:1", "ascvd": "urn:uuid:2", "kidney_failure": "urn:uuid:3"}
    goals = build_goals(run.plan, run.state, ra_refs, NOW)
    assert set(goals) == {"ldl", "sbp"}
    ldl = goals["ldl"]["target"][0]
    assert ldl["measure"]["coding"][0]["code"] == "13457-7" and ldl["detailQuantity"]["comparator"] == "<"
    assert goals["sbp"]["target"][0]["detailQuantity"]["value"] == 130
    care_plan = build_care_plan(run.plan, run.state, ra_refs=ra_refs, goal_refs={"ldl": "urn:uuid:g1"},
                                occurrence=NOW, device_reference="Device/d")
    assert (care_plan["status"], care_plan["intent"]) == ("draft", "proposal")
    assert [s["reference"] for s in care_plan["supportingInfo"]] == list(ra_refs.values())
    assert all(a["reference"].startswith("Condition/") and "_history" not in a["reference"]
               for a in care_plan.get("addresses", []))
    activities = care_plan["activity"]
    codes = [a["detail"]["code"]["coding"][0]["code"] for a in activities]
    assert all(code in CONCEPTS for code in codes)
    assert any(code.startswith("monitoring-") for code in codes)
    benefit = [a for a in activities if "extension" in a]
    assert benefit, "single-intervention options carry their expected benefit"
    parts = {e["url"] for e in benefit[0]["extension"][0]["extension"]}
    assert {"arr", "arrLower", "arrUpper", "outcome", "horizon"} <= parts
    assert "extension" in care_plan  # the best combined option
    assert all("reasonReference" not in a["detail"] for a in activities)
    assert "goal" not in build_care_plan(run.plan, run.state, ra_refs=ra_refs, goal_refs={}, occurrence=NOW,
                                         device_reference="Device/d")  # FHIR JSON has no empty arrays


def test_draft_care_plan_stands_alone_with_its_inputs_as_supporting_info() -> None:
    run = cohort_run()
    draft = build_draft_care_plan(run.plan, run.state, occurrence=NOW, device_reference="Device/d")
    written = build_care_plan(run.plan, run.state, ra_refs={"total_cvd": "urn:uuid:1"}, goal_refs={},
                              occurrence=NOW, device_reference="Device/d")
    assert draft["meta"]["profile"] == ["https://fhirtwin.org/fhir/StructureDefinition/fhirtwin-careplan"]
    assert [s["reference"] for s in draft["supportingInfo"]] == sorted(run.plan.baseline.sources)
    assert all("/_history/" in s["reference"] for s in draft["supportingInfo"])
    assert "goal" not in draft and "urn:uuid" not in json.dumps(draft)
    assert draft["identifier"][0]["system"] == PREDICTION_ID_SYSTEM
    assert draft["identifier"] != written["identifier"]  # accepting the draft never satisfies a write's ifNoneExist
    assert [a["detail"]["code"] for a in draft["activity"]] == [a["detail"]["code"] for a in written["activity"]]
    assert (draft["status"], draft["intent"]) == ("draft", "proposal")


def test_device_and_generated_marker() -> None:
    device = device_resource("fhirtwin-mechanistic", "0.1.0")
    assert device["id"] == "fhirtwin-mechanistic-0-1-0"
    assert device["type"]["coding"][0]["code"] == "706689003"
    assert is_fhirtwin_generated(_ra()) and not is_fhirtwin_generated({"resourceType": "Observation"})


def test_profiles_are_r4_and_codesystem_matches_codes() -> None:
    files = sorted(PROFILES.rglob("*.json"))
    assert len(files) >= 15
    resources = [json.loads(f.read_text()) for f in files]
    assert all("resourceType" in r and "id" in r for r in resources)
    for sd in (r for r in resources if r["resourceType"] == "StructureDefinition"):
        assert sd["fhirVersion"] == "4.0.1" and sd["url"].startswith("https://fhirtwin.org/fhir/")
        assert sd["derivation"] == "constraint" and sd["differential"]["element"]
    cs = next(r for r in resources if r["resourceType"] == "CodeSystem")
    assert cs["url"] == CODESYSTEM
    assert {c["code"]: c["display"] for c in cs["concept"]} == CONCEPTS
    cohort_codes = json.loads((Path(__file__).resolve().parents[2] / "fhirtwin/sandbox/cohort_data/codes.json")
                              .read_text())["fhirtwin_codes"]
    assert all(v["code"] in CONCEPTS for k, v in cohort_codes.items() if isinstance(v, dict))
    declared = {r["url"] for r in resources if "url" in r}
    profiles_used = {p for t in ("riskassessment", "careplan", "goal", "provenance", "device", "organization")
                     for p in [f"https://fhirtwin.org/fhir/StructureDefinition/fhirtwin-{t}"]}
    assert profiles_used <= declared
    op = next(r for r in resources if r["resourceType"] == "OperationDefinition")
    assert op["code"] == "simulate" and op["instance"] and op["resource"] == ["Patient"]
    assert op["affectsState"] is True  # write=true (the default) commits
    horizon = next(p for p in op["parameter"] if p["name"] == "horizon")
    assert "5 to 30 inclusive" in horizon["documentation"]
    vs_codes = {r["id"]: {c["code"] for i in r["compose"]["include"] for c in i.get("concept", [])}
                for r in resources if r["resourceType"] == "ValueSet"}
    assert all(codes <= set(CONCEPTS) for codes in vs_codes.values())
    assert {*PREVENT_CODES.values(), *KFRE_CODES.values()} <= vs_codes["fhirtwin-models"]
    assert vs_codes["fhirtwin-simulation-models"] == {"fhirtwin-mechanistic", "fhirtwin-equations", "fhirtwin-hybrid"}
