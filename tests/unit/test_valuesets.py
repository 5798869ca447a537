"""Value set files: each parses, cites its source, and its members point at registered twin variables."""

from __future__ import annotations

import re

import pytest

from fhirtwin.adapters.conditions import load_valueset, valueset_names
from fhirtwin.twin import get_variable

NAMES = valueset_names()
OID = re.compile(r"^\d+(\.\d+)+$")
SYSTEMS = {
    "http://snomed.info/sct",
    "http://hl7.org/fhir/sid/icd-10-cm",
    "http://hl7.org/fhir/sid/icd-10",
    "http://www.cms.gov/Medicare/Coding/ICD10",
    "http://www.ama-assn.org/go/cpt",
    "https://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
    "http://www.cms.gov/Medicare/Coding/HCPCSReleaseCodeSets",
}


def test_every_concept_has_a_value_set():
    expected = {
        "myocardial_infarction",
        "ischaemic_heart_disease",
        "coronary_artery_disease",
        "angina",
        "cabg_surgery",
        "pci",
        "cabg_or_pci_procedure",
        "coronary_revascularisation_history",
        "ischaemic_stroke",
        "tia",
        "cerebrovascular_disease",
        "atherosclerosis_pad",
        "peripheral_arterial_disease",
        "diabetes",
        "type1_diabetes",
        "diabetic_kidney_disease",
        "diabetic_retinopathy",
        "essential_hypertension",
        "diagnosis_of_hypertension",
        "chronic_kidney_disease",
        "ckd_stage_5",
        "end_stage_renal_disease",
        "heart_failure",
        "familial_hypercholesterolemia",
        "dialysis_services",
        "kidney_transplant",
        "kidney_transplant_recipient",
        "pregnancy",
    }
    assert expected <= {n.removesuffix(".json") for n in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_value_set_parses_and_cites_its_source(name):
    vs = load_valueset(name)
    meta = vs["fhirtwin"]
    assert vs["id"] and vs["version"] and vs["title"] and vs["description"]
    assert meta["concept"] == name.removesuffix(".json")
    assert set(meta["resources"]) <= {"Condition", "Procedure"} and meta["resources"]
    for var in meta["variables"]:
        get_variable(var)
    src = meta["source"]
    members = vs["expansion"]["contains"]
    assert vs["expansion"]["total"] == len(members)
    if src["kind"] == "local":
        assert src["basis"] and not members and meta["local_additions"]
    else:
        assert OID.match(src["oid"]) and src["vsac_name"] and src["vsac_version"] and src["measures"]
        assert src["expansion_timestamp"] and src["repository"].startswith("cqframework/ecqm-content")
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]) and src["path"]
        assert vs["identifier"][0]["value"] == "urn:oid:" + src["oid"]
        assert members
    for entry in members + meta.get("local_additions", []):
        assert entry["system"] in SYSTEMS and entry["code"].strip() == entry["code"] and entry["code"]
        for prop in entry.get("property", []):
            get_variable(prop["code"])
    for entry in meta.get("local_additions", []):
        assert entry["reason"] and entry["display"]


@pytest.mark.parametrize(
    ("name", "code", "published"),
    [
        ("ischaemic_heart_disease.json", "414545008", True),
        ("diabetic_kidney_disease.json", "127013003", True),
        ("diabetic_retinopathy.json", "422034002", True),
        ("diabetes.json", "422034002", True),
        ("coronary_revascularisation_history.json", "399261000", False),
        ("diabetic_kidney_disease.json", "90781000119102", False),
        ("diabetic_kidney_disease.json", "157141000119108", False),
        ("kidney_transplant_recipient.json", "161665007", False),
    ],
)
def test_issue_codes_are_published_members_or_documented_additions(name, code, published):
    vs = load_valueset(name)
    in_expansion = any(c["code"] == code for c in vs["expansion"]["contains"])
    local = [c for c in vs["fhirtwin"].get("local_additions", []) if c["code"] == code]
    assert in_expansion is published
    assert bool(local) is not published
