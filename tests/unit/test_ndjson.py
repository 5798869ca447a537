"""NdjsonSource over export folders, and the Bulk Data kick-off / poll / manifest / download flow."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from fhirtwin.adapters.reads import RECORD_TYPES
from fhirtwin.fhir.errors import FhirError, FhirNotFound, NdjsonFormatError
from fhirtwin.fhir.ndjson import NdjsonSource

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
