"""Review findings on population runs and write-back, each shown by a test that failed before its fix:
incremental runs that carried bundles made for another server or signed by another key, a write that fell
back to the non-HAPI mode when the server's CapabilityStatement could not be read, a lost response on a
server other than HAPI that left its Provenances unversioned, a count of created resources that counted the
shared entries with every patient, and corrupt bundle lines that raised untyped errors."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from test_population_writeback import BASE, FakeClient, FakeServer, planned, subjects

from fhirtwin.cli import main
from fhirtwin.fhir.errors import FhirServerError
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.run import run_population
from fhirtwin.population.writeback import PopulationWriteError, write_import_ndjson, write_population
from fhirtwin.writeback.jws import ENV_KEY_FILE, SigningKey, generate_key

OTHER = "https://other-fhir.example.test/fhir"
AS_OF = date(2026, 6, 30)

pytestmark = pytest.mark.usefixtures("deployment_key")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """(NDJSON folder, output folder, run id) of one small run made for BASE."""
    folder = tmp_path_factory.mktemp("review")
    write_cohort_ndjson(folder / "ndjson", 8, seed=7)
    report = run_population(folder / "ndjson", folder / "out", serial=True, draws=30, as_of=AS_OF,
                            recorded=datetime(2026, 7, 1, 9, 0, tzinfo=UTC), target=BASE, buckets=2)
    assert report.failed == 0
    return folder / "ndjson", folder / "out", report.run_id


@pytest.fixture()
def run(made: tuple[Path, Path, str], tmp_path: Path) -> tuple[Path, Path, str]:
    source, out, run_id = made
    shutil.copytree(out, tmp_path / "out")
    return source, tmp_path / "out", run_id


def bundles(out: Path, run_id: str) -> list[dict[str, Any]]:
    return [json.loads(line) for path in sorted((out / "runs" / run_id / "bundles").glob("*.ndjson"))
            for line in path.read_text("utf-8").splitlines() if line.strip()]


def signing_kids(bundle: dict[str, Any]) -> set[str]:
    """The ``kid`` of every Provenance signature of a bundle (read from the JWS header, not verified)."""
    kids = set()
    for entry in bundle["entry"]:
        for signature in entry["resource"].get("signature", []):
            header = base64.b64decode(signature["data"]).decode().split(".")[0]
            kids.add(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])
    return kids


def pem_file(key: SigningKey, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return path


# ------------------------------------------------------------------------------------------------ incremental


def test_an_incremental_run_for_another_server_carries_no_bundle_made_for_the_first(
        run: tuple[Path, Path, str]) -> None:
    source, out, first = run
    report = run_population(source, out, serial=True, incremental_from=first, target=OTHER)
    assert report.failed == 0
    lines = bundles(out, report.run_id)
    assert len(lines) == len(bundles(out, first)) > 0
    text = json.dumps(lines)
    assert BASE not in text, "a bundle made for the first run's server was carried into a run for another"
    # what is written there is what a run made for OTHER writes
    assert {e["fullUrl"].rsplit("/", 2)[0] for b in lines for e in b["entry"]
            if e["request"]["method"] == "PUT"} == {OTHER}


def test_an_incremental_run_with_a_new_signing_key_carries_no_bundle_signed_by_the_old_one(
        run: tuple[Path, Path, str], deployment_key: SigningKey, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    source, out, first = run
    assert {k for b in bundles(out, first) for k in signing_kids(b)} == {deployment_key.kid}
    rotated = generate_key("ES256")
    monkeypatch.setenv(ENV_KEY_FILE, str(pem_file(rotated, tmp_path / "rotated.pem")))
    report = run_population(source, out, serial=True, incremental_from=first)
    assert report.failed == 0
    kids = {k for b in bundles(out, report.run_id) for k in signing_kids(b)}
    assert kids == {rotated.kid}, "bundles signed by the retired key were carried into the new run"


# ------------------------------------------------------------------------------------------------ write-back


class NoCapabilities(FakeClient):
    """A HAPI server whose CapabilityStatement cannot be read just now (a 503 after the client's retries)."""

    def capabilities(self) -> dict[str, Any]:
        raise FhirServerError("server error", method="GET", url=f"{self.base_url}/metadata", status=503)


def test_an_unreadable_capability_statement_stops_the_write_instead_of_changing_its_mode(
        run: tuple[Path, Path, str]) -> None:
    _, out, run_id = run
    server = FakeServer()
    # before: the write went on as if the server were not HAPI: results without HAPI's auto-version extension
    # (HAPI then strips the input versions the signatures cover) and a Provenance PUT per patient
    with pytest.raises(PopulationWriteError, match="CapabilityStatement"):
        write_population(out, run_id, server=BASE, client=NoCapabilities(server), sleep=lambda _: None)
    assert server.transactions == [] and server.updates == []


class VersioningServer(FakeServer):
    """The in-memory server with version ids on what it stores, as a read of a real server returns them."""

    def commit(self, bundle: dict[str, Any]) -> dict[str, Any]:
        response = super().commit(bundle)
        for resource in self.resources.values():
            resource.setdefault("meta", {}).setdefault("versionId", "1")
        return response


class ReadingClient(FakeClient):
    def read(self, resource_type: str, resource_id: str) -> dict[str, Any]:
        return dict(self.server.resources[f"{resource_type}/{resource_id}"])


def test_a_lost_response_on_another_server_still_versions_the_provenance_targets(
        run: tuple[Path, Path, str]) -> None:
    _, out, run_id = run
    server = VersioningServer(software="Another FHIR Server")
    report = write_population(out, run_id, server=BASE, client=ReadingClient(server, lambda _, n: "lose" if n == 2
                                                                             else None),
                              bundle_size=3, writers=1, sleep=lambda _: None)
    assert report.confirmed == 3 and report.written == len(planned(out, run_id))
    # every Provenance, the confirmed group's included, is PUT again with versioned targets
    assert len(server.updates) == report.written
    assert all("/_history/" in t["reference"] for p in server.updates for t in p["target"])
    stored = [r for ref, r in server.resources.items() if ref.startswith("Provenance/")]
    assert len(stored) == report.written
    assert all("/_history/" in t["reference"] for p in stored for t in p["target"])
    # a second write sends nothing and versions nothing again
    again = write_population(out, run_id, server=BASE, client=ReadingClient(server), sleep=lambda _: None)
    assert (again.transactions, len(server.updates)) == (0, report.written)


def test_created_counts_the_shared_entries_once(run: tuple[Path, Path, str]) -> None:
    _, out, run_id = run
    server = FakeServer()
    report = write_population(out, run_id, server=BASE, client=FakeClient(server), bundle_size=3,
                              sleep=lambda _: None)
    created_puts = 3  # the Organization, the model's Device and the key's Device, new on this server
    assert report.created == sum(server.creates.values()) + created_puts


@pytest.mark.parametrize("line", ['{"resourceType": "Bundle", "type": "trans', "[1, 2]",
                                  '{"resourceType": "Bundle", "type": "transaction", "entry": [7]}'])
def test_a_corrupt_bundle_line_is_a_typed_error_naming_the_file_and_line(
        run: tuple[Path, Path, str], line: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, run_id = run
    path = sorted((out / "runs" / run_id / "bundles").glob("*.ndjson"))[0]
    path.write_text(path.read_text("utf-8") + line + "\n", encoding="utf-8")
    number = len(path.read_text("utf-8").splitlines())
    with pytest.raises(PopulationWriteError, match=f"{path.name}:{number}"):
        write_population(out, run_id, server=BASE, client=FakeClient(FakeServer()), sleep=lambda _: None)
    with pytest.raises(PopulationWriteError, match=f"{path.name}:{number}"):
        write_import_ndjson(out, run_id, tmp_path / "import")
    assert main(["population", "write", str(out / "runs" / run_id), "--ndjson", str(tmp_path / "again")]) == 2
    assert "Traceback" not in capsys.readouterr().err


class ConflictAfterLoss(ReadingClient):
    """The second transaction commits but its answer is lost and the confirmation read fails too (the server
    is struggling); the resend of that content then conflicts (409), as the ``ifMatch`` of a superseding PUT
    does once its first attempt committed."""

    def __init__(self, server: FakeServer) -> None:
        super().__init__(server)
        self.lost: set[str] = set()
        self.batch_fails = False

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        from fhirtwin.fhir.errors import FhirTimeout, FhirTransactionError

        self.calls += 1
        if self.lost & subjects(bundle):
            raise FhirTransactionError("transaction rejected", method="POST", url=self.base_url, status=409)
        response = self.server.commit(bundle)
        if self.calls == 2:
            self.lost = subjects(bundle)
            self.batch_fails = True
            raise FhirTimeout("ReadTimeout after 5 attempt(s)", method="POST", url=self.base_url)
        return response

    def batch(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        if self.batch_fails:
            self.batch_fails = False
            raise FhirServerError("server error", method="POST", url=self.base_url, status=503)
        return super().batch(entries)


def test_a_conflict_on_resending_a_group_whose_first_attempt_committed_is_confirmed_not_failed(
        run: tuple[Path, Path, str]) -> None:
    _, out, run_id = run
    server = FakeServer()
    client = ConflictAfterLoss(server)
    report = write_population(out, run_id, server=BASE, client=client, bundle_size=3, writers=1,
                              sleep=lambda _: None)
    assert client.lost, "the scenario did not happen"
    # before: every patient of that group was failed, and failed again on every later write (409 each time)
    assert report.failures == {} and report.written == len(planned(out, run_id))
    assert report.confirmed >= len(client.lost)
    assert all(count == 1 for count in server.creates.values())
