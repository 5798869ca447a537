"""NdjsonSource over export folders, and the Bulk Data kick-off / poll / manifest / download flow."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import responses

from fhirtwin.adapters.reads import RECORD_TYPES
from fhirtwin.fhir.client import FhirClient
from fhirtwin.fhir.errors import BulkExportError, FhirError, FhirNotFound, NdjsonFormatError
from fhirtwin.fhir.ndjson import NdjsonSource, bulk_export, download_manifest

BASE = "http://127.0.0.1:8080/fhir"


def write_ndjson(path: Path, resources: list[dict], *, gz: bool = False, extra: str = "") -> None:
    text = "".join(json.dumps(r) + "\n" for r in resources) + extra
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def patient(pid: str) -> dict:
    return {"resourceType": "Patient", "id": pid}


def obs(oid: str, pid: str, ref_form: str = "Patient/{}") -> dict:
    return {"resourceType": "Observation", "id": oid, "subject": {"reference": ref_form.format(pid)}}


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    write_ndjson(tmp_path / "Patient.ndjson", [patient("a"), patient("b")])
    write_ndjson(tmp_path / "Observation.1.ndjson", [obs("o1", "a"), obs("o2", "b")], extra="\n")
    write_ndjson(
        tmp_path / "Observation.2.ndjson.gz",
        [obs("o3", "a", "http://x/fhir/Patient/{}/_history/3"), obs("o4", "b")],
        gz=True,
    )
    cond = {"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/b"}}
    write_ndjson(tmp_path / "Condition.ndjson", [cond])
    (tmp_path / "notes.txt").write_text("not data")
    return tmp_path


def ids(resources) -> list[str]:
    return [r["id"] for r in resources]


def test_source_lists_types_and_streams_files_in_order(export_dir: Path) -> None:
    source = NdjsonSource(export_dir)
    assert source.types() == ["Condition", "Observation", "Patient"]
    assert ids(source.iter_resources("Observation")) == ["o1", "o2", "o3", "o4"]
    assert ids(source.iter_patients()) == ["a", "b"]
    assert source.read("Condition", "c1")["id"] == "c1"
    with pytest.raises(FhirNotFound):
        source.read("Patient", "zzz")


def test_fetch_patient_record_uses_patient_and_subject_references(export_dir: Path) -> None:
    source = NdjsonSource(export_dir)
    assert ids(source.fetch_patient_record("a", RECORD_TYPES)) == ["a", "o1", "o3"]
    assert ids(source.fetch_patient_record("b", types=["Observation", "Condition"])) == ["b", "o2", "o4", "c1"]
    with pytest.raises(FhirNotFound):
        source.fetch_patient_record("nobody", RECORD_TYPES)
    assert {k: ids(v) for k, v in source.fetch_patients_records(["b", "a"], ["Condition"]).items()} == {
        "b": ["b", "c1"],
        "a": ["a"],
    }
    assert [pid for pid, _ in source.iter_patient_records(RECORD_TYPES)] == ["a", "b"]


def test_search_all_subset_semantics(export_dir: Path) -> None:
    source = NdjsonSource(export_dir)
    assert ids(source.search_all("Observation", {"patient": "a"})) == ["o1", "o3"]
    assert ids(source.search_all("Observation", {"subject": "Patient/b", "_count": 10})) == ["o2", "o4"]
    assert ids(source.search_all("Observation", {"patient": "a,b"})) == ["o1", "o3", "o2", "o4"]
    assert ids(source.search_all("Observation", {"_id": "o2,o3"})) == ["o2", "o3"]
    assert ids(source.search_all("Patient", {"_id": "b"})) == ["b"]
    with pytest.raises(FhirError, match="not supported"):
        list(source.search_all("Observation", {"code": "1234-5"}))


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "Patient.ndjson", [patient("a")], extra='{"resourceType": "Patient", "id": \n')
    with pytest.raises(NdjsonFormatError) as err:
        list(NdjsonSource(tmp_path).iter_patients())
    assert err.value.file == "Patient.ndjson" and err.value.line == 2
    assert "Patient.ndjson:2" in str(err.value)


def test_malformed_gzip_line_and_wrong_type(tmp_path: Path) -> None:
    write_ndjson(tmp_path / "Observation.ndjson.gz", [obs("o1", "a")], gz=True, extra="[1, 2]\n")
    with pytest.raises(NdjsonFormatError) as err:
        list(NdjsonSource(tmp_path).iter_resources("Observation"))
    assert err.value.line == 2
    write_ndjson(tmp_path / "Condition.ndjson", [patient("x")])
    with pytest.raises(NdjsonFormatError, match="Patient found in a Condition file"):
        list(NdjsonSource(tmp_path).iter_resources("Condition"))


# ------------------------------------------------------------------ Bulk Data


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def manifest(base: str = BASE, requires_token: bool = True) -> dict:
    return {
        "transactionTime": "2026-11-27T03:00:00.000+00:00",
        "request": f"{base}/$export",
        "requiresAccessToken": requires_token,
        "output": [
            {"type": "Patient", "url": f"{base}/Binary/b1"},
            {"type": "Observation", "url": f"{base}/Binary/b2"},
            {"type": "Observation", "url": f"{base}/Binary/b3"},
        ],
        "error": [{"type": "OperationOutcome", "url": f"{base}/Binary/e1"}],
    }


@responses.activate
def test_bulk_export_kickoff_poll_manifest() -> None:
    status_url = f"{BASE}/$export-poll-status?_jobId=job-1"
    responses.get(f"{BASE}/Group/g1/$export", status=202, headers={"Content-Location": status_url})
    responses.get(status_url, status=202, headers={"X-Progress": "10% done", "Retry-After": "4"})
    responses.get(status_url, status=202, headers={"X-Progress": "60% done"})
    responses.get(status_url, json=manifest())
    sleeps = Sleeps()
    client = FhirClient(BASE, sleep=sleeps)
    result = bulk_export(
        client, "group", group_id="g1", types=["Patient", "Observation"], since="2026-01-01T00:00:00Z", poll_interval=3
    )
    assert len(result["output"]) == 3
    assert sleeps == [4.0, 4.5]  # Retry-After honoured; then the interval, backed off x1.5 per poll
    kickoff = responses.calls[0].request
    assert kickoff.headers["Prefer"] == "respond-async"
    assert kickoff.headers["Accept"] == "application/fhir+json"
    query = parse_qs(urlsplit(kickoff.url).query)
    assert query == {
        "_outputFormat": ["application/fhir+ndjson"],
        "_type": ["Patient,Observation"],
        "_since": ["2026-01-01T00:00:00Z"],
    }
    assert client.request_count == 4


@responses.activate
def test_bulk_export_times_out_and_cancels() -> None:
    status_url = f"{BASE}/$export-poll-status?_jobId=job-2"
    responses.get(f"{BASE}/$export", status=202, headers={"Content-Location": status_url})
    responses.get(status_url, status=202)
    responses.delete(status_url, status=202)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(BulkExportError):
        bulk_export(FhirClient(BASE), sleep=sleep, clock=lambda: now[0], poll_interval=10, timeout=30)
    assert responses.calls[-1].request.method == "DELETE"


@responses.activate
def test_bulk_export_kickoff_must_be_async() -> None:
    responses.get(f"{BASE}/Patient/$export", status=200, json={"resourceType": "OperationOutcome"})
    with pytest.raises(BulkExportError):
        bulk_export(FhirClient(BASE), "patient")
    with pytest.raises(ValueError):
        bulk_export(FhirClient(BASE), "group")


@responses.activate
def test_download_manifest_writes_a_readable_source(tmp_path: Path) -> None:
    lines = {
        "b1": json.dumps(patient("a")) + "\n",
        "b2": json.dumps(obs("o1", "a")) + "\n",
        "b3": json.dumps(obs("o2", "a")) + "\n",
        "e1": json.dumps({"resourceType": "OperationOutcome", "issue": []}) + "\n",
    }
    for binary_id, body in lines.items():
        responses.get(f"{BASE}/Binary/{binary_id}", body=body, content_type="application/fhir+ndjson")
    client = FhirClient(BASE, auth=lambda r: (r.headers.__setitem__("Authorization", "Bearer t"), r)[1])
    written = download_manifest(client, manifest(), tmp_path / "out")
    assert [p.name for p in written["output"]] == ["Patient.1.ndjson", "Observation.1.ndjson", "Observation.2.ndjson"]
    assert [p.relative_to(tmp_path / "out").as_posix() for p in written["error"]] == ["error/OperationOutcome.1.ndjson"]
    assert all(c.request.headers["Accept"] == "application/fhir+ndjson" for c in responses.calls)
    assert all(c.request.headers["Authorization"] == "Bearer t" for c in responses.calls)
    source = NdjsonSource(tmp_path / "out")
    assert ids(source.fetch_patient_record("a", RECORD_TYPES)) == ["a", "o1", "o2"]
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["transactionTime"].startswith("2026")
    assert not list((tmp_path / "out").glob("*.part"))


@responses.activate
def test_download_without_required_token_sends_no_credentials(tmp_path: Path) -> None:
    storage = "https://storage.example.org/exports"
    for binary_id in ("b1", "b2", "b3", "e1"):
        responses.get(f"{storage}/Binary/{binary_id}", body="")
    client = FhirClient(BASE, auth=lambda r: (r.headers.__setitem__("Authorization", "Bearer t"), r)[1])
    download_manifest(client, manifest(storage, requires_token=False), tmp_path)
    assert all("Authorization" not in c.request.headers for c in responses.calls)
    with pytest.raises(FhirError, match="credentials"):
        download_manifest(client, manifest(storage, requires_token=True), tmp_path / "again")
