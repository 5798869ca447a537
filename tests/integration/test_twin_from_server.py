"""The read side end to end: every cohort patient read from the real server, compared with ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date, timedelta

import pytest

from fhirtwin.engine import Engine
from fhirtwin.fhir.client import FhirClient
from fhirtwin.sim.inputs import diabetes_status
from fhirtwin.twin import LedgerKind, TwinState

pytestmark = pytest.mark.integration

REFERENCE = date(2026, 6, 30)  # the cohort generator's reference date
CONDITION_FLAGS = {"htn": "hypertension", "t2d": "diabetes", "t1d": "diabetes", "t2d_complication": "diabetes",
                   "t1d_complication": "diabetes", "ckd3a": "ckd", "ckd3b": "ckd", "ckd4": "ckd", "esrd": "ckd",
                   "mi": "prior_mi", "stroke": "prior_stroke", "hf": "heart_failure", "tia": "tia",
                   "pad": "peripheral_arterial_disease", "chd": "coronary_heart_disease",
                   "fh": "familial_hypercholesterolemia"}
HISTORY_KINDS = {"mi", "stroke", "tia"}  # history flags: true whatever the episode's clinical status
MESSY_LEDGER_KIND = {
    "missing-unit": LedgerKind.MISSING_UNIT,
    "entered-in-error": LedgerKind.ENTERED_IN_ERROR,
    "duplicate": LedgerKind.DUPLICATE,
    "implausible": LedgerKind.IMPLAUSIBLE,
    "preliminary": LedgerKind.NOT_FINAL,
    "condition-refuted": LedgerKind.REFUTED,
    "condition-entered-in-error": LedgerKind.ENTERED_IN_ERROR,
    "lipid-mmol-l": None,  # converted, or rejected for another injected reason: some ledger entry
    "creatinine-umol-l": None,
}
INTENSITY_RANK = {"low": 1, "moderate": 2, "high": 3}


@pytest.fixture(scope="module")
def twins(loaded_cohort, base_url: str) -> dict[str, TwinState]:
    client = FhirClient(base_url)
    ids = [b["entry"][0]["resource"]["id"] for b in loaded_cohort.bundles]
    engine = Engine(client)
    states = {state.patient_id: state for state in (engine.twin(r, REFERENCE) for r in engine.read_many(ids))}
    assert client.request_count <= len(ids) / 20 + client.pages_followed + 1
    return states


def _value(state: TwinState, variable: str):
    evidence = state.latest_or_none(variable, as_of=REFERENCE)
    return None if evidence is None else evidence.value


def _resources(bundle: dict) -> list[dict]:
    return [e["resource"] for e in bundle["entry"]]


def test_every_resource_is_used_or_in_the_ledger(twins, loaded_cohort) -> None:
    for bundle in loaded_cohort.bundles:
        resources = _resources(bundle)
        state = twins[resources[0]["id"]]
        used = {source.unversioned for source in state.sources()}
        ledgered = {s.split("/_history/")[0] for s in state.ledger.sources()}
        rejected = {e.source.split("/_history/")[0] for e in state.ledger if e.rejected}
        for resource in resources:
            key = f"{resource['resourceType']}/{resource['id']}"
            assert key in used or key in ledgered, key
        assert not (rejected & used), "a rejected resource must never feed the twin"


def test_messy_items_are_caught(twins, loaded_cohort) -> None:
    checked = 0
    for patient_id, truth in loaded_cohort.truth.items():
        state = twins[patient_id]
        for item in truth["messy"]:
            if item["kind"] == "sparse-patient":
                continue
            kinds = {e.kind for e in state.ledger if e.source.split("/_history/")[0].endswith("/" + item["id"])}
            assert kinds, item
            expected = MESSY_LEDGER_KIND[item["kind"]]
            assert expected is None or expected in kinds, (item, kinds)
            checked += 1
    assert checked > 1000


def test_demographics_conditions_medications_and_smoking_match_truth(twins, loaded_cohort) -> None:
    for patient_id, truth in loaded_cohort.truth.items():
        state = twins[patient_id]
        assert state.demographics.sex == truth["sex"], patient_id
        assert state.age_years(REFERENCE) == truth["age"], patient_id
        active = {CONDITION_FLAGS[c["kind"]] for c in truth["conditions"] if c["kind"] in CONDITION_FLAGS
                  and c["verification_status"] == "confirmed"
                  and (c["clinical_status"] == "active" or c["kind"] in HISTORY_KINDS)
                  and c["codes"] != ["icd10cm|Z86.73"]}  # TIA or infarction: see the ASCVD test
        for flag in active:
            assert _value(state, flag) is True, (patient_id, flag)
        statins = [m for m in truth["medications"] if m["class"] == "statin" and m["status"] == "active"
                   and date.fromisoformat(m["start"]) <= REFERENCE]
        if statins:
            assert _value(state, "on_statin") is True, patient_id
            strongest = max(statins, key=lambda m: INTENSITY_RANK[m["intensity"]])["intensity"]
            assert _value(state, "statin_intensity") == strongest, patient_id
        if not truth["sparse"] and truth["smoking"]["at_reference"] in ("current", "never"):
            smoker = _value(state, "current_smoker")
            if smoker is not None:
                assert smoker is (truth["smoking"]["at_reference"] == "current"), patient_id


def _phenotype(text) -> str:
    return str(text).removesuffix("_metabolizer")


def test_genomics_match_truth(twins, loaded_cohort) -> None:
    tested = 0
    for patient_id, truth in loaded_cohort.truth.items():
        genotypes = truth["genotypes"]
        if not genotypes.get("tested") or truth["sparse"]:
            continue
        state = twins[patient_id]
        tested += 1
        assert _value(state, "apol1_risk_alleles") == genotypes["apol1_risk_alleles"], patient_id
        assert _phenotype(_value(state, "cyp2c19_phenotype")) == _phenotype(genotypes["cyp2c19_phenotype"])
        assert _value(state, "slco1b1_phenotype") == genotypes["slco1b1_phenotype"], patient_id
        assert bool(_value(state, "fh_variant")) == bool(genotypes["fh_variant"]), patient_id
        assert _value(state, "cad_prs_z") == pytest.approx(genotypes["prs_cad_z"], abs=1e-3), patient_id
    assert tested > 100


def test_latest_values_follow_the_generated_trends(twins, loaded_cohort) -> None:
    """LDL after statin start is lower than the untreated baseline the generator used."""
    lower = 0
    compared = 0
    for patient_id, truth in loaded_cohort.truth.items():
        statins = [m for m in truth["medications"] if m["class"] == "statin" and m["status"] == "active"]
        ldl = twins[patient_id].latest_or_none("ldl_cholesterol_mg_dl", as_of=REFERENCE,
                                                lookback=timedelta(days=3 * 365))
        if statins and ldl is not None and min(date.fromisoformat(m["start"]) for m in statins) < ldl.instant.date():
            compared += 1
            lower += ldl.value < truth["latent"]["ldl_baseline_mg_dl"]
    assert compared > 20
    assert lower / compared > 0.9


def test_one_request_per_patient_when_read_alone(loaded_cohort, base_url: str) -> None:
    for bundle in loaded_cohort.bundles[::10]:
        client = FhirClient(base_url)
        engine = Engine(client)
        state = engine.twin(engine.read(bundle["entry"][0]["resource"]["id"], with_stored=False), REFERENCE)
        assert client.request_count == 1 and client.pages_followed == 0, state.patient_id


def test_state_cli_json_shows_every_scale(loaded_cohort, base_url: str) -> None:
    with_variant = next(pid for pid, t in loaded_cohort.truth.items()
                        if t["genotypes"].get("fh_variant") and not t["sparse"])
    result = subprocess.run([sys.executable, "-m", "fhirtwin.cli", "state", "--server", base_url,
                             "--patient", with_variant, "--as-of", REFERENCE.isoformat(), "--json"],
                            capture_output=True, text=True, timeout=120, check=True)
    summary = json.loads(result.stdout)
    assert set(summary["scales"]) == {"molecular", "cellular", "tissue", "organ", "clinical", "behavioral",
                                      "environmental"}
    assert summary["scales"]["molecular"]["fh_variant"]
    assert isinstance(summary["ledger"], list)
    assert summary["requests"] == 1 and summary["pages_followed"] == 0
    assert with_variant not in result.stderr


def _misses(twins, loaded_cohort, check) -> list:
    out = []
    for patient_id, truth in loaded_cohort.truth.items():
        problem = check(twins[patient_id], truth)
        if problem:
            out.append((patient_id, problem))
    return out


def _codes(truth: dict, kind: str) -> list[str]:
    return [k for c in truth["conditions"] if c["kind"] == kind for k in c["codes"]]


def test_established_ascvd_and_its_parts_match_truth(twins, loaded_cohort) -> None:
    def check(state, truth):
        problems = []
        if bool(_value(state, "established_ascvd")) != truth["ascvd"]["established"]:
            problems.append(("established_ascvd", truth["ascvd"], [c["codes"] for c in truth["conditions"]],
                             [p["codes"] for p in truth["procedures"]]))
        for part in ("prior_mi", "prior_stroke", "tia", "peripheral_arterial_disease", "coronary_revascularisation"):
            if part == "prior_stroke" and _codes(truth, "stroke") == ["icd10cm|Z86.73"]:
                # Z86.73 is history of TIA *or* cerebral infarction: only cerebrovascular disease is certain
                if _value(state, "cerebrovascular_disease") is not True and _value(state, "prior_stroke") is not True:
                    problems.append((part, ["icd10cm|Z86.73"]))
                continue
            if truth["ascvd"][part] and _value(state, part) is not True:
                problems.append((part, [c["codes"] for c in truth["conditions"]],
                                 [p["codes"] for p in truth["procedures"]]))
        if truth["ascvd"]["coronary_heart_disease"] and not (_value(state, "coronary_heart_disease")
                                                            or _value(state, "angina")):
            problems.append(("coronary_heart_disease", _codes(truth, "chd")))
        return problems
    assert _misses(twins, loaded_cohort, check) == []


def test_heart_failure_dialysis_transplant_and_scope_match_truth(twins, loaded_cohort) -> None:
    from fhirtwin.sim.scope import decide_scope

    def check(state, truth):
        problems = []
        for flag in ("heart_failure", "dialysis", "kidney_transplant"):
            if bool(_value(state, flag)) != truth[flag]:
                problems.append((flag, truth[flag], _value(state, flag), truth["kidney_recorded_as"],
                                 _codes(truth, {"heart_failure": "hf", "dialysis": "dialysis_dependence",
                                                "kidney_transplant": "transplant_status"}[flag])))
        decision = decide_scope(state, REFERENCE)
        if decision.code != truth["scope"]:
            problems.append(("scope", truth["scope"], decision.code, decision.reasons))
        return problems
    assert _misses(twins, loaded_cohort, check) == []


def test_diabetes_type_complications_insulin_and_ckd_stage_match_truth(twins, loaded_cohort) -> None:
    def check(state, truth):
        problems = []
        has_diabetes, _ = diabetes_status(state, REFERENCE)  # the engine's one rule (diagnosis, treatment, labs)
        if bool(truth["diabetes_type"]) != has_diabetes:
            problems.append(("diabetes", truth["diabetes_coded_by"], has_diabetes, _codes(truth, "t2d_complication")))
        if truth["diabetes_type"] and truth["diabetes_coded_by"] != "insulin-only":
            got = _value(state, "diabetes_type")
            if got != truth["diabetes_type"]:
                problems.append(("diabetes_type", truth["diabetes_type"], got,
                                 [c["codes"] for c in truth["conditions"] if "complication" in c["kind"]
                                  or c["kind"] in ("t1d", "t2d")]))
        if truth["diabetic_kidney_disease"] and _value(state, "diabetic_kidney_disease") is not True:
            problems.append(("diabetic_kidney_disease", _codes(truth, "t2d_complication")
                             + _codes(truth, "t1d_complication")))
        if truth["diabetic_retinopathy"] and _value(state, "diabetic_retinopathy") is not True:
            problems.append(("diabetic_retinopathy", _codes(truth, "t2d_complication")))
        if bool(_value(state, "on_insulin")) != truth["on_insulin"]:
            problems.append(("on_insulin", truth["on_insulin"],
                             [(m["rxcui"], m["form"]) for m in truth["medications"] if m["class"] == "insulin"]))
        if truth["ckd_stage_recorded"] and _value(state, "ckd_stage") != truth["ckd_stage_recorded"]:
            problems.append(("ckd_stage", truth["ckd_stage_recorded"], _value(state, "ckd_stage"),
                             [c["codes"] for c in truth["conditions"] if c["clinical_status"] == "active"]))
        return problems
    assert _misses(twins, loaded_cohort, check) == []


def test_statin_agent_dose_and_intensity_match_truth(twins, loaded_cohort) -> None:
    def check(state, truth):
        statin = truth["statin"]
        if statin is None:
            return [("on_statin", False, True)] if _value(state, "on_statin") is True else []
        got = (_value(state, "statin_agent"), _value(state, "statin_daily_dose_mg"), _value(state, "statin_intensity"))
        if got != (statin["agent"], statin["daily_dose_mg"], statin["intensity"]):
            meds = [(m["rxcui"], m["form"], m["daily_dose_mg"]) for m in truth["medications"]
                    if m["class"] == "statin" and m["status"] == "active"]
            return [("statin", statin, got, meds)]
        return []
    assert _misses(twins, loaded_cohort, check) == []
