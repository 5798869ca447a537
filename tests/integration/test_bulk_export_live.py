"""Bulk Data export as a population source, against the real sandbox: what the twin reads, complete, stageable,
equal to the Engine's reads, and incremental with ``_since``.

The full export is a Group export of the 240-patient cohort (plus this module's own patient): other suites load
the sandbox with more patients, and a system-level export of everything takes minutes longer without testing
more. Measured on the shared 2-core machine (HAPI 8.8, batch maintenance every second, load 4-7): the cohort's
Group export (about 27 k resources, 33 files, 21 MB) took 120-210 s; a Patient-level export of all 468
patients about 300 s and a system-level one 230-410 s; a one-patient Group export about 3 s; ``_since`` exports
of a few changes a few seconds. Counts are compared for the cohort's own patients and for resources last
updated before the transactionTime, since other suites write to the sandbox at the same time.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fhirtwin.adapters.reads import RECORD_TYPES
from fhirtwin.engine import RESULT_TYPES, WATCHED_TYPES, Engine
from fhirtwin.fhir.client import FhirClient, patient_reference_id
from fhirtwin.population.bulk import COMPARTMENT_TYPES, BulkExport, BulkExportResult, deleted_references
from fhirtwin.population.stage import bucket_of, iter_patient_records, list_partitions, stage_ndjson

pytestmark = pytest.mark.integration

LOINC_LDL = {"coding": [{"system": "http://loinc.org", "code": "18262-6"}]}


def _lines(folder: Path, resource_type: str) -> list[dict[str, Any]]:
    out = []
    for path in sorted(folder.glob(f"{resource_type}.*.ndjson")):
        with open(path, "rb") as handle:
            out.extend(json.loads(raw) for raw in handle if raw.strip())
    return out


def _observation(oid: str, pid: str, value: float) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": LOINC_LDL,
            "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": "2026-01-15",
            "valueQuantity": {"value": value, "unit": "mg/dL", "system": "http://unitsofmeasure.org", "code": "mg/dL"}}


@pytest.fixture(scope="module")
def blk_patient(loaded_cohort, base_url: str) -> dict[str, str]:
    """A patient of this module's own (never an ftp-* patient): three Observations, a MedicationRequest naming one of
    the cohort's Medications, and a Group holding only this patient."""
    client = FhirClient(base_url)
    pid = f"blk-{uuid.uuid4().hex[:12]}"
    medication = next(client.search_all("Medication", {"_count": 1}, max_pages=1))
    client.update({"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1961-03-04"})
    for index, value in enumerate((160.0, 150.0, 140.0)):
        client.update(_observation(f"{pid}-o{index}", pid, value))
    client.update({"resourceType": "MedicationRequest", "id": f"{pid}-mr", "status": "active", "intent": "order",
                   "subject": {"reference": f"Patient/{pid}"},
                   "medicationReference": {"reference": f"Medication/{medication['id']}"}})
    client.update({"resourceType": "Group", "id": f"{pid}-g", "type": "person", "actual": True,
                   "member": [{"entity": {"reference": f"Patient/{pid}"}}]})
    return {"patient": pid, "group": f"{pid}-g", "medication": medication["id"]}


@pytest.fixture(scope="module")
def cohort_export(loaded_cohort, blk_patient, base_url: str, tmp_path_factory) -> tuple[BulkExportResult, Path]:
    """A Group export of the cohort and this module's patient, with the twin's types (the default)."""
    client = FhirClient(base_url)
    members = [b["entry"][0]["resource"]["id"] for b in loaded_cohort.bundles] + [blk_patient["patient"]]
    group_id = f"{blk_patient['patient']}-cohort"
    client.update({"resourceType": "Group", "id": group_id, "type": "person", "actual": True,
                   "member": [{"entity": {"reference": f"Patient/{m}"}} for m in members]})
    folder = tmp_path_factory.mktemp("bulk") / "cohort"
    result = BulkExport(client, "group", group_id=group_id, max_wait=900).run(folder)
    return result, folder


def test_cohort_export_holds_the_cohort_as_the_server_counts_it(loaded_cohort, cohort_export, base_url: str) -> None:
    result, folder = cohort_export
    cohort = {b["entry"][0]["resource"]["id"] for b in loaded_cohort.bundles}
    assert len(cohort) == 240
    assert set(result.types) == {*WATCHED_TYPES, "Consent", *RESULT_TYPES}
    assert result.error_outcomes == 0 and result.unresolved_references == 0 and result.transaction_time
    client = FhirClient(base_url)
    ids = ",".join(sorted(cohort))
    before = f"le{result.transaction_time}"
    for resource_type in COMPARTMENT_TYPES:
        exported = sum(1 for r in _lines(folder, resource_type) if patient_reference_id(r) in cohort)
        param = "_id" if resource_type == "Patient" else "patient"
        counted = client.search(resource_type, {param: ids, "_lastUpdated": before, "_summary": "count"},
                                use_post=True)["total"]
        assert exported == counted, resource_type
        assert result.resources.get(resource_type, 0) >= exported
    assert sum(1 for r in _lines(folder, "Patient") if r["id"] in cohort) == 240
    medications = {r["id"] for r in _lines(folder, "Medication")}
    referenced = {r["medicationReference"]["reference"].split("/")[-1]
                  for t in ("MedicationRequest", "MedicationDispense", "MedicationStatement")
                  for r in _lines(folder, t) if patient_reference_id(r) in cohort
                  and not r.get("medicationReference", {}).get("reference", "#").startswith("#")}
    assert referenced and referenced <= medications


def test_staged_export_gives_each_patient_what_the_engine_reads(loaded_cohort, cohort_export, base_url: str,
                                                                tmp_path: Path) -> None:
    _, folder = cohort_export
    report = stage_ndjson(folder, tmp_path / "staged")
    assert report.patients >= 240
    partitions = {int(p.stem.split("-")[1]): p for p in list_partitions(tmp_path / "staged")}
    by_size = sorted(loaded_cohort.bundles, key=lambda b: len(b["entry"]))
    with_medication = next(b for b in by_size if any(e["resource"]["resourceType"] == "Medication"
                                                     for e in b["entry"]))
    sample = [by_size[0], by_size[len(by_size) // 2], by_size[-1], with_medication]
    engine = Engine(FhirClient(base_url))
    twin_types = set(WATCHED_TYPES)

    def versions(resources: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
        return {(r["resourceType"], r["id"], r["meta"]["versionId"]) for r in resources
                if r["resourceType"] in twin_types}

    sizes: dict[int, set[str]] = {}
    for index, bundle in enumerate(sample):
        pid = bundle["entry"][0]["resource"]["id"]
        records = dict(iter_patient_records(partitions[bucket_of(pid, report.buckets)]))
        staged = versions(records[pid])
        read = versions(engine.read(pid, with_stored=False).resources)
        assert staged == read, pid
        sizes[index] = {t for t, _, _ in staged}
    assert sizes[2] >= {"Patient", "Observation"} and "Medication" in sizes[3]


def test_incremental_export_returns_only_what_changed(blk_patient, cohort_export, base_url: str,
                                                      tmp_path: Path) -> None:
    first, _ = cohort_export
    client = FhirClient(base_url)
    pid = blk_patient["patient"]
    full = BulkExport(client, "group", group_id=blk_patient["group"], max_wait=300).run(tmp_path / "group")
    assert full.resources == {"Medication": 1, "MedicationRequest": 1, "Observation": 3, "Patient": 1}
    assert [r["id"] for r in _lines(tmp_path / "group", "Medication")] == [blk_patient["medication"]]

    changed = client.update(_observation(f"{pid}-o0", pid, 120.0))
    client.delete("Observation", f"{pid}-o2")
    since_group = BulkExport(client, "group", group_id=blk_patient["group"], since=full.transaction_time,
                             max_wait=300).run(tmp_path / "group-since")
    assert since_group.resources == {"Observation": 1}
    [observation] = _lines(tmp_path / "group-since", "Observation")
    assert (observation["id"], observation["meta"]["versionId"]) == (changed["id"], changed["meta"]["versionId"])
    assert observation["valueQuantity"]["value"] == 120.0
    # HAPI sends no "deleted" list; the deletion comes from history (other suites' deletions may come too)
    assert [r for r in deleted_references(tmp_path / "group-since") if pid in r] == [f"Observation/{pid}-o2"]

    # system level (Medication in _type) since the cohort export: others write to the sandbox too, so only this
    # patient's resources are counted exactly; everything returned changed after the transactionTime
    since_system = BulkExport(client, "system", since=first.transaction_time, max_wait=600).run(
        tmp_path / "system-since")
    mine = Counter()
    for resource_type in since_system.resources:
        for resource in _lines(tmp_path / "system-since", resource_type):
            assert resource["meta"]["lastUpdated"] >= first.transaction_time, resource_type
            if patient_reference_id(resource) == pid:
                mine[f"{resource['resourceType']}/{resource['id']}"] += 1
    assert mine == {f"Observation/{pid}-o0": 1}
    assert [r for r in deleted_references(tmp_path / "system-since") if pid in r] == [f"Observation/{pid}-o2"]
    assert set(since_system.resources) <= set(RECORD_TYPES) | {"Patient", "Consent", "Medication"}


def test_cli_export_is_a_stage_input(blk_patient, base_url: str, tmp_path: Path, capsys) -> None:
    from fhirtwin.cli import main

    exported = tmp_path / "export"
    assert main(["population", "export", "--server", base_url, "--group", blk_patient["group"], "--out",
                 str(exported), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result["resources"]) == {"Medication", "MedicationRequest", "Observation", "Patient"}
    assert result["resources"]["Patient"] == 1 and result["resources"]["Observation"] >= 2
    assert json.loads((exported / "manifest.json").read_text())["transactionTime"] == result["transaction_time"]
    assert main(["population", "stage", str(exported), "--out", str(tmp_path / "staged"), "--json"]) == 0
    staged = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert staged["patients"] == 1 and staged["shared_resources"] == 1
