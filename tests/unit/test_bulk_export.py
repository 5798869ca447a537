"""Bulk Data export client (fhirtwin.population.bulk): the protocol's edges against a scripted server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
import responses

from fhirtwin.engine import RESULT_TYPES, WATCHED_TYPES
from fhirtwin.fhir.client import FhirClient
from fhirtwin.fhir.ndjson import NdjsonSource
from fhirtwin.population.bulk import (
    BulkDownloadError,
    BulkExport,
    BulkExportTimeout,
    BulkJobFailed,
    BulkKickoffError,
    BulkManifestError,
    _LineCounter,
    deleted_references,
)
from fhirtwin.population.stage import iter_patient_records, list_partitions, stage_ndjson

BASE = "https://ehr.example.org/fhir"
STATUS = f"{BASE}/$export-poll-status?_jobId=job-1"
TT = "2026-11-27T10:00:00.000+00:00"


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def patient(pid: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "id": pid, "meta": {"versionId": "1"}}


def obs(oid: str, pid: str) -> dict[str, Any]:
    return {"resourceType": "Observation", "id": oid, "status": "final", "code": {"text": "x"},
            "subject": {"reference": f"Patient/{pid}"}}


def ndjson(*resources: dict[str, Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in resources)


def manifest(files: dict[str, str], *, requires_token: bool = True, base: str = BASE, **extra: Any) -> dict[str, Any]:
    return {"transactionTime": TT, "request": f"{BASE}/$export", "requiresAccessToken": requires_token,
            "output": [{"type": t, "url": f"{base}/Binary/{b}"} for b, t in files.items()], "error": [], **extra}


class RefreshingToken(requests.auth.AuthBase):
    """A bearer token that changes on each refresh, counting refreshes (like SmartBackendServices)."""

    def __init__(self) -> None:
        self.generation = 1
        self.invalidations = 0

    def invalidate(self) -> None:
        self.invalidations += 1
        self.generation += 1

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer t{self.generation}"
        return request


def kickoff(path: str = "$export") -> None:
    responses.get(f"{BASE}/{path}", status=202, headers={"Content-Location": STATUS})


@responses.activate
def test_polls_honouring_retry_after_and_progress_then_writes_a_stageable_folder(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, status=202, headers={"X-Progress": "10% done", "Retry-After": "4"})
    responses.get(STATUS, status=202, headers={"X-Progress": "60% done"})
    body = manifest({"b1": "Patient", "b2": "Observation", "b3": "Observation"}, deleted=[])
    responses.get(STATUS, body=json.dumps(body), content_type="application/json")
    responses.get(f"{BASE}/Binary/b1", body=ndjson(patient("a"), patient("b")))
    responses.get(f"{BASE}/Binary/b2", body=ndjson(obs("o1", "a")) + "\n")  # a blank line is not a resource
    responses.get(f"{BASE}/Binary/b3", body=json.dumps(obs("o2", "b")))  # last line without a line break
    sleeps = Sleeps()
    progress: list[str] = []
    export = BulkExport(FhirClient(BASE, sleep=sleeps), since="2026-01-01T00:00:00Z", poll_interval=3,
                        on_progress=progress.append)
    result = export.run(tmp_path / "out")

    assert sleeps == [4.0, 4.5]  # Retry-After as given; then the interval, backed off x1.5
    assert progress == ["10% done", "60% done"]
    call = responses.calls[0].request
    assert call.headers["Prefer"] == "respond-async" and call.headers["Cache-Control"] == "no-cache"
    query = parse_qs(urlsplit(call.url).query)
    # what the twin reads (Medication too), Consents, and fhirtwin's earlier results (what a new result supersedes)
    assert set(query["_type"][0].split(",")) == {*WATCHED_TYPES, "Consent", *RESULT_TYPES}
    assert query["_since"] == ["2026-01-01T00:00:00Z"]
    assert query["_outputFormat"] == ["application/fhir+ndjson"]
    assert not any("_history" in c.request.url for c in responses.calls)  # the manifest listed its deletions
    assert result.transaction_time == TT and result.polls == 3
    assert [f.path for f in result.output] == ["Patient.1.ndjson", "Observation.1.ndjson", "Observation.2.ndjson"]
    assert result.resources == {"Observation": 2, "Patient": 2}
    out = tmp_path / "out"
    assert json.loads((out / "manifest.json").read_text()) == body
    assert json.loads((out / "export.json").read_text())["transaction_time"] == TT
    assert not (tmp_path / "out.partial").exists() and not list(out.glob("*.part"))
    staged = stage_ndjson(out, tmp_path / "staged", buckets=1)
    assert staged.patients == 2 and staged.resources == {"Observation": 2, "Patient": 2}
    records = dict(iter_patient_records(list_partitions(tmp_path / "staged")[0]))
    assert [r["id"] for r in records["b"]] == ["b", "o2"]


@responses.activate
def test_a_429_while_polling_is_waited_out(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, status=429, headers={"Retry-After": "7"})
    responses.get(STATUS, status=202)
    responses.get(STATUS, json=manifest({"b1": "Patient"}))
    responses.get(f"{BASE}/Binary/b1", body=ndjson(patient("a")))
    sleeps = Sleeps()
    result = BulkExport(FhirClient(BASE, sleep=sleeps), poll_interval=2).run(tmp_path / "out")
    assert sleeps == [7.0, 3.0]
    assert result.throttled_polls == 1 and result.resources == {"Patient": 1}
    assert [c.request.method for c in responses.calls].count("GET") == 5


@responses.activate
def test_error_and_deleted_files_are_kept_beside_the_output_and_counted(tmp_path: Path) -> None:
    kickoff()
    body = manifest({"b1": "Patient"}, error=[{"type": "OperationOutcome", "url": f"{BASE}/Binary/e1"}],
                    deleted=[{"type": "Bundle", "url": f"{BASE}/Binary/d1"}])
    responses.get(STATUS, json=body)
    responses.get(f"{BASE}/Binary/b1", body=ndjson(patient("a")))
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "processing"}]}
    responses.get(f"{BASE}/Binary/e1", body=ndjson(outcome, outcome))
    deleted = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/o9"}},
        {"request": {"method": "DELETE", "url": f"{BASE}/Patient/p9/_history/3"}}]}
    responses.get(f"{BASE}/Binary/d1", body=ndjson(deleted))
    result = BulkExport(FhirClient(BASE, sleep=Sleeps()), since=TT).run(tmp_path / "out")
    assert [f.path for f in result.errors] == ["error/OperationOutcome.1.ndjson"]
    assert [f.path for f in result.deleted] == ["deleted/Bundle.1.ndjson"]
    assert result.error_outcomes == 2 and result.deleted_resources == 2
    assert list(deleted_references(tmp_path / "out")) == ["Observation/o9", "Patient/p9"]
    assert NdjsonSource(tmp_path / "out").types() == ["Patient"]  # the kept files do not pollute the input


@responses.activate
def test_deletions_come_from_history_when_a_since_manifest_has_no_deleted_list(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, json=manifest({"b1": "Observation"}))  # HAPI 8.8: no "deleted" key at all
    responses.get(f"{BASE}/Binary/b1", body=ndjson(obs("o1", "a")))
    responses.get(f"{BASE}/Patient/_history", json={"resourceType": "Bundle", "type": "history"})

    def entry(method: str, oid: str, version: int) -> dict[str, Any]:
        return {"fullUrl": f"{BASE}/Observation/{oid}",
                "request": {"method": method, "url": f"Observation/{oid}/_history/{version}"}}

    next_page = f"{BASE}?_getpages=abc&_getpagesoffset=3"
    responses.get(f"{BASE}/Observation/_history", json={
        "resourceType": "Bundle", "type": "history", "link": [{"relation": "next", "url": next_page}],
        "entry": [entry("DELETE", "o9", 3), entry("PUT", "o8", 3), entry("DELETE", "o8", 2)]})
    responses.get(next_page, json={"resourceType": "Bundle", "type": "history",
                                   "entry": [entry("POST", "o9", 2), entry("DELETE", "o7", 4)]})
    result = BulkExport(FhirClient(BASE, sleep=Sleeps()), types=["Patient", "Observation"], since=TT).run(
        tmp_path / "out")
    assert list(deleted_references(tmp_path / "out")) == ["Observation/o9", "Observation/o7"]  # o8 came back
    assert [f.path for f in result.deleted] == ["deleted/Bundle.history.ndjson"] and result.deleted_resources == 2
    history = [c.request.url for c in responses.calls if "/_history" in c.request.url]
    assert all(parse_qs(urlsplit(url).query)["_since"] == [TT] for url in history)


@responses.activate
def test_a_401_on_a_file_refreshes_the_token_once(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, json=manifest({"b1": "Patient", "b2": "Observation"}))
    responses.get(f"{BASE}/Binary/b1", body=ndjson(patient("a")))
    responses.get(f"{BASE}/Binary/b2", status=401)  # the token expired between files
    responses.get(f"{BASE}/Binary/b2", body=ndjson(obs("o1", "a")))
    auth = RefreshingToken()
    result = BulkExport(FhirClient(BASE, auth=auth, sleep=Sleeps())).run(tmp_path / "out")
    assert auth.invalidations == 1
    file_calls = [c.request for c in responses.calls if "/Binary/" in c.request.url]
    assert [r.headers["Authorization"] for r in file_calls] == ["Bearer t1", "Bearer t1", "Bearer t2"]
    assert result.resources == {"Observation": 1, "Patient": 1}


@responses.activate
def test_a_file_still_refused_after_the_refresh_is_a_typed_error_and_leaves_nothing(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, json=manifest({"b1": "Patient"}))
    responses.get(f"{BASE}/Binary/b1", status=401)
    auth = RefreshingToken()
    with pytest.raises(BulkDownloadError) as raised:
        BulkExport(FhirClient(BASE, auth=auth, sleep=Sleeps())).run(tmp_path / "out")
    assert raised.value.status == 401 and auth.invalidations == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@responses.activate
def test_files_that_need_no_token_get_none(tmp_path: Path) -> None:
    storage = "https://storage.example.org/x"
    kickoff()
    responses.get(STATUS, json=manifest({"b1": "Patient"}, requires_token=False, base=storage))
    responses.get(f"{storage}/Binary/b1", body=ndjson(patient("a")))
    BulkExport(FhirClient(BASE, auth=RefreshingToken(), sleep=Sleeps())).run(tmp_path / "out")
    assert "Authorization" not in responses.calls[-1].request.headers
    assert "Authorization" in responses.calls[0].request.headers


@responses.activate
def test_a_token_is_never_sent_to_another_origin(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, json=manifest({"b1": "Patient"}, base="https://elsewhere.example.org/x"))
    with pytest.raises(BulkManifestError, match="another origin"):
        BulkExport(FhirClient(BASE, auth=RefreshingToken(), sleep=Sleeps())).run(tmp_path / "out")
    assert all("elsewhere" not in c.request.url for c in responses.calls)


@responses.activate
def test_keyboard_interrupt_cancels_the_job(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, status=202, headers={"Retry-After": "5"})
    responses.delete(STATUS, status=202)

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        BulkExport(FhirClient(BASE, sleep=interrupted)).run(tmp_path / "out")
    assert responses.calls[-1].request.method == "DELETE" and responses.calls[-1].request.url == STATUS
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@responses.activate
def test_a_refused_kickoff_is_a_typed_error_with_the_outcome(tmp_path: Path) -> None:
    outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported"}]}
    responses.get(f"{BASE}/Group/g1/$export", status=400, json=outcome)
    with pytest.raises(BulkKickoffError) as raised:
        BulkExport(FhirClient(BASE), "group", group_id="g1").run(tmp_path / "out")
    assert raised.value.status == 400 and raised.value.issues[0]["code"] == "not-supported"
    assert len(responses.calls) == 1  # a kick-off is not repeated
    responses.get(f"{BASE}/Patient/$export", status=200, json={})
    with pytest.raises(BulkKickoffError, match="202"):
        BulkExport(FhirClient(BASE), "patient").kick_off()


@responses.activate
def test_a_failed_job_is_a_typed_error_but_a_transient_failure_is_polled_again(tmp_path: Path) -> None:
    transient = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "transient"}]}
    failed = {"resourceType": "OperationOutcome", "issue": [{"severity": "fatal", "code": "processing"}]}
    kickoff()
    responses.get(STATUS, status=500, json=transient)
    responses.get(STATUS, status=503)
    responses.get(STATUS, status=500, json=failed)
    with pytest.raises(BulkJobFailed) as raised:
        BulkExport(FhirClient(BASE, sleep=Sleeps())).run(tmp_path / "out")
    assert raised.value.status == 500 and raised.value.issues[0]["code"] == "processing"
    assert [c.request.method for c in responses.calls] == ["GET"] * 4


@responses.activate
def test_past_max_wait_the_job_is_cancelled(tmp_path: Path) -> None:
    kickoff()
    responses.get(STATUS, status=202)
    responses.delete(STATUS, status=202)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(BulkExportTimeout):
        BulkExport(FhirClient(BASE), sleep=sleep, clock=lambda: now[0], poll_interval=10, max_wait=30).run(
            tmp_path / "out")
    assert responses.calls[-1].request.method == "DELETE"
    assert now[0] <= 30


@responses.activate
def test_patient_level_reads_the_referenced_medications_by_id(tmp_path: Path) -> None:
    kickoff("Patient/$export")
    responses.get(STATUS, json=manifest({"b1": "Patient", "b2": "MedicationRequest"}))
    responses.get(f"{BASE}/Binary/b1", body=ndjson(patient("a")))
    requests_ = [{"resourceType": "MedicationRequest", "id": f"mr{i}", "subject": {"reference": "Patient/a"},
                  "medicationReference": {"reference": ref}}
                 for i, ref in enumerate(["Medication/m1", f"{BASE}/Medication/m2/_history/1", "Medication/m1",
                                          "Medication/gone", "#contained"])]
    responses.get(f"{BASE}/Binary/b2", body=ndjson(*requests_))
    found = {"resourceType": "Bundle", "type": "searchset", "entry": [
        {"resource": {"resourceType": "Medication", "id": m}} for m in ("m1", "m2")]}
    responses.post(f"{BASE}/Medication/_search", json=found)
    result = BulkExport(FhirClient(BASE, sleep=Sleeps()), "patient").run(tmp_path / "out")

    kickoff_types = parse_qs(urlsplit(responses.calls[0].request.url).query)["_type"][0].split(",")
    assert "Medication" not in kickoff_types and "Patient" in kickoff_types  # HAPI refuses it there (HAPI-0512)
    search = parse_qs(responses.calls[-1].request.body)
    assert search["_id"] == ["gone,m1,m2"]
    assert result.resources == {"Medication": 2, "MedicationRequest": 5, "Patient": 1}
    assert result.unresolved_references == 1
    source = NdjsonSource(tmp_path / "out")
    assert source.read("Medication", "m2")["id"] == "m2"


def test_since_must_be_an_instant_and_levels_are_checked() -> None:
    client = FhirClient(BASE)
    for bad in ("2026-01-01", "yesterday", "2026-01-01T00:00:00"):
        with pytest.raises(ValueError, match="instant"):
            BulkExport(client, since=bad)
    from datetime import datetime

    with pytest.raises(ValueError, match="time zone"):
        BulkExport(client, since=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        BulkExport(client, "group")
    with pytest.raises(ValueError):
        BulkExport(client, "everything")
    with pytest.raises(ValueError):
        BulkExport(client, types=["Patient", "not a type"])


def test_out_dir_must_be_new_or_empty(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError):
        BulkExport(FhirClient(BASE)).run(tmp_path / "full")


def test_line_counter_counts_lines_split_across_chunks() -> None:
    counter = _LineCounter()
    for chunk in (b'{"a":', b'1}\n{"b"', b":2}\n\n  \n", b'{"c":3}'):
        counter.feed(chunk)
    assert counter.close() == 3
