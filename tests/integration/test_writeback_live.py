"""Write-back against the live sandbox: profiles validate, reruns write nothing, changed inputs supersede,
Provenance verifies and detects changes, --dry-run writes nothing, basis/entity references resolve."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest
import requests

from fhirtwin.cli import main
from fhirtwin.sim.model import MechanisticTwin
from fhirtwin.writeback.device import device_id

pytestmark = pytest.mark.integration

MODEL_DEVICE = device_id(MechanisticTwin.name, MechanisticTwin.version)

GENERATED = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"
SUPERSEDED = "https://fhirtwin.org/CodeSystem/fhirtwin|superseded"
RESULT_TYPES = ("RiskAssessment", "Goal", "CarePlan")
PATIENTS = ["ftp-0006", "ftp-0007", "ftp-0008"]
TEST_TAG = "https://fhirtwin.org/CodeSystem/fhirtwin-tests|writeback-supersede"
LDL_CODES = "http://loinc.org|13457-7,http://loinc.org|18262-6,http://loinc.org|2089-1"


@pytest.fixture(scope="module")
def profiles_loaded(base_url: str, loaded_cohort) -> str:
    """load_sandbox (via loaded_cohort) uploads profiles/ whenever its content changed."""
    return base_url


def run_cli(capsys, *args: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["run", *args, "--json", "--no-checkpoint"])  # every run simulates and writes (or finds) its results
    out = capsys.readouterr().out
    return code, json.loads(out)


def count(http: requests.Session, base_url: str, rtype: str, patient: str, extra: dict | None = None) -> int:
    params = {"_tag": GENERATED, "_summary": "count", **(extra or {})}
    params["patient" if rtype == "Provenance" else "subject"] = f"Patient/{patient}"
    if rtype == "Provenance":
        params.pop("patient")
        return len(provenances(http, base_url, patient))
    return http.get(f"{base_url}/{rtype}", params=params).json()["total"]


def provenances(http: requests.Session, base_url: str, patient: str) -> list[dict]:
    ras = search(http, base_url, "RiskAssessment", {"subject": f"Patient/{patient}", "_tag": GENERATED})
    found = {}
    for ra in ras:
        for p in search(http, base_url, "Provenance", {"target": f"RiskAssessment/{ra['id']}"}):
            found[p["id"]] = p
    return list(found.values())


def search(http: requests.Session, base_url: str, rtype: str, params: dict) -> list[dict]:
    bundle = http.get(f"{base_url}/{rtype}", params={"_count": 500, **params}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def counts(http, base_url, patients) -> dict:
    return {(p, t): count(http, base_url, t, p) for p in patients for t in (*RESULT_TYPES, "Provenance")}


def test_run_writes_then_rerun_writes_nothing(profiles_loaded, http, capsys) -> None:
    base_url = profiles_loaded
    args = ["--server", base_url, *[a for p in PATIENTS for a in ("--patient", p)]]
    code, first = run_cli(capsys, *args)
    assert code == 0, first
    assert {p["status"] for p in first["patients"]} <= {"written", "unchanged"}
    before = counts(http, base_url, PATIENTS)
    for p in PATIENTS:
        # the SBP Goal always; the LDL-C Goal only where the guideline sets one (PREVENT-ASCVD >= 5 %)
        assert before[(p, "RiskAssessment")] >= 4 and before[(p, "CarePlan")] >= 1 and before[(p, "Goal")] >= 1
        assert before[(p, "Provenance")] >= 1
    code, second = run_cli(capsys, *args)
    assert code == 0
    assert [p["status"] for p in second["patients"]] == ["unchanged"] * len(PATIENTS)
    assert all(p["created"] == 0 for p in second["patients"])
    # one Consent search, one record read (earlier results ride in its batch) and one transaction per patient
    assert second["requests"] == 3 * len(PATIENTS) + 1  # + one CapabilityStatement read per client (is it HAPI?)
    assert all(p["requests"] == 1 for p in second["patients"])  # the write is the transaction alone
    assert counts(http, base_url, PATIENTS) == before


def test_every_written_resource_validates_against_its_profile(profiles_loaded, http, capsys) -> None:
    base_url = profiles_loaded
    assert run_cli(capsys, "--server", base_url, "--patient", PATIENTS[0])[0] == 0
    resources = [r for t in RESULT_TYPES for r in search(http, base_url, t, {"subject": f"Patient/{PATIENTS[0]}",
                                                                              "_tag:not": SUPERSEDED})]
    resources += provenances(http, base_url, PATIENTS[0])[:1]
    resources += [http.get(f"{base_url}/Device/{MODEL_DEVICE}").json(),
                  http.get(f"{base_url}/Organization/fhirtwin-deployment").json()]
    assert {r["resourceType"] for r in resources} == {*RESULT_TYPES, "Provenance", "Device", "Organization"}
    for resource in resources:
        profile = resource["meta"]["profile"][0]
        assert profile.startswith("https://fhirtwin.org/fhir/StructureDefinition/fhirtwin-")
        outcome = http.post(f"{base_url}/{resource['resourceType']}/$validate", params={"profile": profile},
                            data=json.dumps(resource)).json()
        errors = [i for i in outcome.get("issue", []) if i["severity"] in ("error", "fatal")]
        assert errors == [], (resource["resourceType"], errors)


def test_basis_and_entity_references_resolve_with_versions(profiles_loaded, http) -> None:
    base_url = profiles_loaded
    ra = search(http, base_url, "RiskAssessment", {"subject": f"Patient/{PATIENTS[1]}", "_tag": GENERATED})[0]
    provenance = search(http, base_url, "Provenance", {"target": f"RiskAssessment/{ra['id']}"})[0]
    refs = [b["reference"] for b in ra["basis"]] + [e["what"]["reference"] for e in provenance["entity"]]
    refs += [t["reference"] for t in provenance["target"]]
    assert refs and all("/_history/" in r for r in refs)
    for ref in sorted(set(refs)):
        assert http.get(f"{base_url}/{ref}").status_code == 200, ref


def test_provenance_verifies_and_fails_after_a_target_changes(profiles_loaded, http, capsys) -> None:
    base_url = profiles_loaded
    patient = "ftp-0009"
    code, result = run_cli(capsys, "--server", base_url, "--patient", patient)
    assert code == 0
    current = [p for p in provenances(http, base_url, patient)
               if all(not t["reference"].startswith("RiskAssessment/") or
                      SUPERSEDED not in json.dumps(http.get(f"{base_url}/{t['reference'].split('/_history')[0]}")
                                                   .json().get("meta", {}))
                      for t in p["target"])]
    ref = f"Provenance/{current[0]['id']}"
    assert main(["verify", "--server", base_url, ref]) == 0
    target = current[0]["target"][-1]["reference"].split("/_history")[0]
    original = http.get(f"{base_url}/{target}").json()
    changed = copy.deepcopy(original)
    changed.setdefault("note", []).append({"text": "edited after signing"})
    assert http.put(f"{base_url}/{target}", data=json.dumps(changed)).status_code == 200
    try:
        assert main(["verify", "--server", base_url, ref]) != 0
        assert "INVALID" in capsys.readouterr().err
    finally:
        restored = copy.deepcopy(original)
        restored.pop("meta", None)
        http.put(f"{base_url}/{target}", data=json.dumps(restored))
    assert main(["verify", "--server", base_url, ref]) == 0


def test_dry_run_writes_nothing(profiles_loaded, http, capsys) -> None:
    base_url = profiles_loaded
    patient = "ftp-0010"
    before = counts(http, base_url, [patient])
    code, result = run_cli(capsys, "--server", base_url, "--patient", patient, "--dry-run")
    assert code == 0 and result["patients"][0]["status"] == "dry-run"
    assert any(e.startswith("POST RiskAssessment") for e in result["patients"][0]["entries"])
    assert counts(http, base_url, [patient]) == before


def _current_by_code(http, base_url, patient) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for ra in search(http, base_url, "RiskAssessment", {"subject": f"Patient/{patient}", "_tag": GENERATED,
                                                        "_tag:not": SUPERSEDED}):
        found.setdefault(ra["code"]["coding"][0]["code"], []).append(ra["id"])
    return found


def test_changed_inputs_supersede_and_reverting_reinstates(profiles_loaded, http, capsys) -> None:
    base_url = profiles_loaded
    patient = "ftp-0011"
    for leftover in search(http, base_url, "Observation", {"subject": f"Patient/{patient}", "_tag": TEST_TAG}):
        assert leftover["status"] == "entered-in-error", "an earlier interrupted run left a live test lab"
    assert run_cli(capsys, "--server", base_url, "--patient", patient)[0] == 0
    old = _current_by_code(http, base_url, patient)
    assert len(old) == 4 and all(len(v) == 1 for v in old.values())
    ldl = search(http, base_url, "Observation", {"subject": f"Patient/{patient}", "code": LDL_CODES, "status": "final",
                                                 "_sort": "-date", "_count": 1})[0]
    new = {k: v for k, v in ldl.items() if k not in ("id", "meta")}
    new["status"] = "final"
    new["effectiveDateTime"] = datetime.now(UTC).replace(microsecond=0).isoformat()
    new.pop("issued", None)
    new["valueQuantity"] = {**ldl["valueQuantity"], "value": 77}
    new["meta"] = {"tag": [{"system": TEST_TAG.split("|")[0], "code": TEST_TAG.split("|")[1]}]}
    created = http.post(f"{base_url}/Observation", data=json.dumps(new))
    assert created.status_code == 201
    obs_id = created.json()["id"]
    try:
        code, result = run_cli(capsys, "--server", base_url, "--patient", patient)
        assert code == 0 and result["patients"][0]["status"] == "written"
        now = _current_by_code(http, base_url, patient)
        assert set(now) == set(old) and all(len(v) == 1 for v in now.values())
        assert all(now[c] != old[c] for c in old), "a new current assessment per outcome"
        for ids in old.values():
            stale = http.get(f"{base_url}/RiskAssessment/{ids[0]}").json()
            assert SUPERSEDED.split("|")[1] in [t["code"] for t in stale["meta"]["tag"]]
            assert stale["status"] == "final"
        fresh = http.get(f"{base_url}/RiskAssessment/{now['risk-total-cvd'][0]}").json()
        assert any(b["reference"].startswith(f"Observation/{obs_id}/_history/") for b in fresh["basis"])
        # the superseded results' Provenance still verifies (only meta changed)
        old_prov = search(http, base_url, "Provenance", {"target": f"RiskAssessment/{old['risk-total-cvd'][0]}"})
        assert main(["verify", "--server", base_url, f"Provenance/{old_prov[0]['id']}"]) == 0
    finally:
        # referenced resources cannot be deleted (referential integrity): the lab is withdrawn instead,
        # which the twin ledgers and never uses, so the inputs are back to the earlier state
        withdrawn = http.get(f"{base_url}/Observation/{obs_id}").json()
        withdrawn["status"] = "entered-in-error"
        assert http.put(f"{base_url}/Observation/{obs_id}", data=json.dumps(withdrawn)).status_code == 200
    assert run_cli(capsys, "--server", base_url, "--patient", patient)[0] == 0
    back = _current_by_code(http, base_url, patient)
    assert back == old, "inputs back to the earlier state: the earlier results are current again"
