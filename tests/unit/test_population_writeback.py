"""Population write-back against an in-memory FHIR server: groups of patients per transaction with the shared
entries once, a refused patient split out, throttling waited out, a lost response confirmed, a killed writer
resumed with nothing created twice, and the $import NDJSON."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from fhirtwin.cli import main
from fhirtwin.fhir.errors import FhirThrottled, FhirTimeout, FhirTransactionError, FhirUnauthorized
from fhirtwin.population.generate import write_cohort_ndjson
from fhirtwin.population.run import LEDGER_FILE, run_population
from fhirtwin.population.writeback import (
    PopulationWriteError,
    WriteReport,
    locate_run,
    write_import_ndjson,
    write_population,
)
from fhirtwin.vocabulary import AUTO_VERSION_EXT
from fhirtwin.writeback.jws import SigningKey
from fhirtwin.writeback.signing import verify_targets
from fhirtwin.writeback.transaction import for_hapi

BASE = "https://fhir.example.test/fhir"
N_PATIENTS = 16


# ------------------------------------------------------------------------------------------------ a server


class FakeServer:
    """Just enough of a FHIR server: conditional creates and PUTs in transactions, the searches and reads the
    confirmation batch sends. Counts what it creates per condition, so a duplicate is visible."""

    def __init__(self, software: str = "HAPI FHIR Server") -> None:
        self.software = software
        self.resources: dict[str, dict[str, Any]] = {}
        self.by_condition: dict[str, str] = {}
        self.creates: Counter[str] = Counter()
        self.transactions: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def commit(self, bundle: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.transactions.append(bundle)
            ids = {e["fullUrl"]: f"{e['resource']['resourceType']}/{uuid.uuid4().hex}" for e in bundle["entry"]
                   if e["request"]["method"] == "POST"}
            answers = []
            for entry in bundle["entry"]:
                request, resource = entry["request"], json.loads(json.dumps(entry["resource"]))
                if request["method"] == "POST":
                    condition = f"{request['url']}?{request['ifNoneExist']}"
                    if condition in self.by_condition:
                        answers.append(self._answer("200 OK", self.by_condition[condition]))
                        continue
                    ref = ids[entry["fullUrl"]]
                    self.by_condition[condition] = ref
                    self.creates[condition] += 1
                    status = "201 Created"
                else:
                    ref, status = request["url"], "201 Created" if request["url"] not in self.resources else "200 OK"
                resource["id"] = ref.split("/")[1]
                self.resources[ref] = _replace(resource, {k: v for k, v in ids.items()})
                answers.append(self._answer(status, ref))
            return {"resourceType": "Bundle", "type": "transaction-response", "entry": answers}

    @staticmethod
    def _answer(status: str, ref: str) -> dict[str, Any]:
        return {"response": {"status": status, "location": f"{ref}/_history/1"}}

    def get(self, url: str) -> dict[str, Any]:
        if "?" in url:
            ref = self.by_condition.get(url)
            matches = [{"resource": self.resources[ref], "search": {"mode": "match"}}] if ref else []
            return {"resource": {"resourceType": "Bundle", "type": "searchset", "entry": matches},
                    "response": {"status": "200 OK"}}
        if url in self.resources:
            return {"resource": self.resources[url], "response": {"status": "200 OK"}}
        return {"response": {"status": "404 Not Found"}}


def _replace(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: refs.get(v, v) if k == "reference" else _replace(v, refs) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, refs) for v in node]
    return node


class FakeClient:
    """The FhirClient surface the write uses; ``fail(bundle, call)`` may raise before or after the commit."""

    def __init__(self, server: FakeServer, fail: Callable[[dict[str, Any], int], str | None] | None = None,
                 base_url: str = BASE) -> None:
        self.server = server
        self.base_url = base_url
        self.fail = fail
        self.calls = 0

    def capabilities(self) -> dict[str, Any]:
        return {"resourceType": "CapabilityStatement", "software": {"name": self.server.software}}

    def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        when = self.fail(bundle, self.calls) if self.fail else None
        if when == "refuse":
            raise FhirTransactionError("transaction rejected", method="POST", url=self.base_url, status=400)
        if when in ("throttle", "throttle for an hour"):
            try:
                raise FhirThrottled("throttled", retry_after=7.0 if when == "throttle" else 3600.0, status=429)
            except FhirThrottled as exc:
                raise FhirTransactionError("transaction rejected", status=429) from exc
        if when == "unavailable":
            raise FhirTransactionError("transaction rejected", status=503)
        if when == "unauthorized":
            raise FhirUnauthorized("forbidden", method="POST", url=self.base_url, status=403)
        response = self.server.commit(bundle)
        if when == "lose":
            raise FhirTimeout("ReadTimeout after 5 attempt(s)", method="POST", url=self.base_url)
        if when == "kill":
            raise RuntimeError("writer killed")
        return response

    def batch(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        return {"resourceType": "Bundle", "type": "batch-response",
                "entry": [self.server.get(e["request"]["url"]) for e in entries]}

    def update(self, resource: dict[str, Any]) -> dict[str, Any]:
        self.server.updates.append(resource)
        self.server.resources[f"{resource['resourceType']}/{resource['id']}"] = resource
        return resource


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def key(deployment_key: SigningKey) -> SigningKey:
    return deployment_key


@pytest.fixture(scope="module")
def made(key: SigningKey, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One population run made for BASE (two partitions)."""
    folder = tmp_path_factory.mktemp("cohort")
    write_cohort_ndjson(folder / "ndjson", N_PATIENTS, seed=41)
    report = run_population(folder / "ndjson", folder / "out", serial=True, draws=40, as_of=date(2026, 6, 30),
                            recorded=datetime(2026, 7, 1, 9, 0, tzinfo=UTC), target=BASE, buckets=2)
    return folder / "out", report.run_id


@pytest.fixture()
def run(made: tuple[Path, str], tmp_path: Path) -> tuple[Path, str]:
    """A copy of the run for one test (the write state goes into its ledger)."""
    out = tmp_path / "out"
    shutil.copytree(made[0], out)
    return out, made[1]


def planned(out: Path, run_id: str) -> set[str]:
    """The planned patients as the run's summaries list them."""
    rows = [r for f in (out / "runs" / run_id / "summaries").glob("*.parquet")
            for r in pq.read_table(f, columns=["patient_id", "status"]).to_pylist()]
    return {r["patient_id"] for r in rows if r["status"] == "planned"}


def subjects(bundle: dict[str, Any]) -> set[str]:
    return {e["resource"]["subject"]["reference"].split("/")[1] for e in bundle["entry"]
            if "subject" in e["resource"]}


def ledger_rows(out: Path, run_id: str) -> dict[str, tuple[str, str | None]]:
    with sqlite3.connect(out / LEDGER_FILE) as db:
        rows = db.execute("SELECT patient_id, state, locations FROM population_writes WHERE run_id = ?", (run_id,))
        return {pid: (state, locations) for pid, state, locations in rows}


def write(out: Path, run_id: str, client: FakeClient, **options: Any) -> WriteReport:
    sleeps: list[float] = options.pop("sleeps", [])
    return write_population(out, run_id, server=BASE, client=client, sleep=sleeps.append, **options)


# ------------------------------------------------------------------------------------------------ tests


def test_patients_are_grouped_and_shared_entries_sent_once(run: tuple[Path, str]) -> None:
    out, run_id = run
    expected = planned(out, run_id)
    assert len(expected) >= 8
    server = FakeServer()
    report = write(out, run_id, FakeClient(server), bundle_size=3, writers=2)
    assert (report.written, report.failed, report.already_written) == (len(expected), 0, 0)
    shared, *groups = server.transactions
    assert {e["resource"]["resourceType"] for e in shared["entry"]} == {"Organization", "Device"}
    assert all(e["request"]["method"] == "PUT" for e in shared["entry"])
    assert len(groups) == -(-len(expected) // 3)
    seen: Counter[str] = Counter()
    for bundle in groups:
        urls = [e["fullUrl"] for e in bundle["entry"]]
        assert len(urls) == len(set(urls)), "a resource twice in one transaction"
        assert not {e["resource"]["resourceType"] for e in bundle["entry"]} & {"Organization", "Device"}
        assert len(subjects(bundle)) <= 3
        seen.update(subjects(bundle))
    assert set(seen) == expected and set(seen.values()) == {1}
    assert all(count == 1 for count in server.creates.values())
    rows = ledger_rows(out, run_id)
    assert set(rows) == expected and {state for state, _ in rows.values()} == {"written"}
    # the ledger keeps the server's locations: every result the patient's bundle created
    pid = sorted(expected)[0]
    locations = json.loads(rows[pid][1] or "[]")
    assert {loc.split("/")[0] for loc in locations} >= {"RiskAssessment", "CarePlan", "Provenance"}
    assert all(server.resources.get("/".join(loc.split("/")[:2])) for loc in locations)


def test_a_second_write_sends_nothing(run: tuple[Path, str]) -> None:
    out, run_id = run
    server = FakeServer()
    first = write(out, run_id, FakeClient(server), bundle_size=4)
    sent = len(server.transactions)
    again = write(out, run_id, FakeClient(server), bundle_size=4)
    assert first.written == again.already_written == len(planned(out, run_id))
    assert (again.written, again.transactions) == (0, 0) and len(server.transactions) == sent
    # a later run of the ledger whose patients' bundles are the same (an incremental run's unchanged patients)
    with sqlite3.connect(out / LEDGER_FILE) as db:
        db.execute("UPDATE population_writes SET run_id = 'an-earlier-run'")
    later = write(out, run_id, FakeClient(server), bundle_size=4)
    assert (later.written, later.already_written, later.transactions) == (0, first.written, 0)
    assert set(ledger_rows(out, run_id)) == planned(out, run_id)


def test_on_hapi_new_results_carry_the_auto_version_extension_elsewhere_provenances_are_versioned(
        run: tuple[Path, str]) -> None:
    out, run_id = run
    hapi = FakeServer()
    write(out, run_id, FakeClient(hapi), bundle_size=5)
    for bundle in hapi.transactions[1:]:
        for entry in bundle["entry"]:
            paths = [x["valueString"] for x in entry["resource"]["meta"].get("extension", [])
                     if x["url"] == AUTO_VERSION_EXT]
            expected = {"RiskAssessment": ["basis"], "Provenance": ["target", "entity.what"]}
            assert paths == expected.get(entry["resource"]["resourceType"], [])
    assert hapi.updates == []
    other = FakeServer(software="Another FHIR Server")
    other_out = out.parent / "other"
    shutil.copytree(out, other_out)
    with sqlite3.connect(other_out / LEDGER_FILE) as db:
        db.execute("DELETE FROM population_writes")
    report = write(other_out, run_id, FakeClient(other), bundle_size=5)
    assert not any(x["url"] == AUTO_VERSION_EXT for b in other.transactions for e in b["entry"]
                   for x in e["resource"].get("meta", {}).get("extension", []))
    assert len(other.updates) == report.written
    assert all(t["reference"].count("/") == 3 and "/_history/" in t["reference"]
               for p in other.updates for t in p["target"])


def test_for_hapi_copies_and_leaves_the_signed_bundle_alone(run: tuple[Path, str]) -> None:
    out, run_id = run
    line = next(iter((out / "runs" / run_id / "bundles").glob("*.ndjson"))).read_text("utf-8").splitlines()[0]
    bundle = json.loads(line)
    adapted = for_hapi(bundle)
    assert bundle == json.loads(line)
    assert any(e["resource"]["meta"].get("extension") for e in adapted["entry"])
    strip = [{k: v for k, v in e["resource"].items() if k != "meta"} for e in adapted["entry"]]
    assert strip == [{k: v for k, v in e["resource"].items() if k != "meta"} for e in bundle["entry"]]


def test_a_refused_patient_is_split_out_and_the_others_are_written(run: tuple[Path, str]) -> None:
    out, run_id = run
    expected = sorted(planned(out, run_id))
    bad = expected[4]
    server = FakeServer()

    def refuse(bundle: dict[str, Any], _: int) -> str | None:
        return "refuse" if bad in subjects(bundle) else None

    report = write(out, run_id, FakeClient(server, refuse), bundle_size=4, writers=2)
    assert report.failed == 1 and set(report.failures) == {bad} and "400" in report.failures[bad]
    assert report.written == len(expected) - 1 and report.splits >= 2
    rows = ledger_rows(out, run_id)
    assert rows[bad][0] == "failed" and {rows[p][0] for p in expected if p != bad} == {"written"}
    # the patient fixed (say its record restored): the next write sends only that patient
    again = write(out, run_id, FakeClient(server), bundle_size=4)
    assert (again.written, again.already_written, again.failed) == (1, len(expected) - 1, 0)
    assert subjects(server.transactions[-1]) == {bad}


def test_throttling_waits_for_retry_after_then_sends_again(run: tuple[Path, str]) -> None:
    out, run_id = run
    server = FakeServer()
    sleeps: list[float] = []
    report = write(out, run_id, FakeClient(server, lambda _, n: "throttle" if n in (2, 3) else None),
                   bundle_size=50, writers=1, sleeps=sleeps)
    assert sleeps == [7.0, 7.0] and report.retries == 2 and report.written == len(planned(out, run_id))
    with sqlite3.connect(out / LEDGER_FILE) as db:
        db.execute("DELETE FROM population_writes")
    with pytest.raises(PopulationWriteError, match="asks to wait 3600 s"):
        write(out, run_id, FakeClient(server, lambda _, n: "throttle for an hour" if n == 2 else None),
              bundle_size=50, writers=1, sleeps=sleeps)
    assert len(sleeps) == 2


def test_an_unavailable_server_stops_the_write_and_a_later_one_resumes(run: tuple[Path, str]) -> None:
    out, run_id = run
    server = FakeServer()
    sleeps: list[float] = []
    with pytest.raises(PopulationWriteError, match="unavailable"):
        write(out, run_id, FakeClient(server, lambda _, n: "unavailable" if n > 2 else None), bundle_size=3,
              writers=1, retries=2, sleeps=sleeps)
    assert sleeps == [1.0, 2.0]  # backoff without Retry-After
    done = {pid for pid, (state, _) in ledger_rows(out, run_id).items() if state == "written"}
    assert len(done) == 3
    report = write(out, run_id, FakeClient(server), bundle_size=3)
    assert report.already_written == 3 and report.written == len(planned(out, run_id)) - 3
    assert all(count == 1 for count in server.creates.values())


def test_refused_access_stops_the_write_at_once_and_marks_nobody_failed(run: tuple[Path, str]) -> None:
    """A 403 (the token's scopes do not cover the write) is not an outage: no retry, no backoff, no patient
    marked failed; the next call (with credentials that do) resumes."""
    out, run_id = run
    server = FakeServer()
    sleeps: list[float] = []
    client = FakeClient(server, lambda _, n: "unauthorized" if n == 2 else None)
    with pytest.raises(PopulationWriteError, match="refused access"):
        write(out, run_id, client, bundle_size=3, writers=1, retries=2, sleeps=sleeps)
    assert client.calls == 2 and sleeps == []
    assert not [pid for pid, (state, _) in ledger_rows(out, run_id).items() if state == "failed"]
    report = write(out, run_id, FakeClient(server), bundle_size=3)
    assert report.failed == 0 and report.written == len(planned(out, run_id))


def test_a_lost_response_is_confirmed_on_the_server(run: tuple[Path, str]) -> None:
    out, run_id = run
    server = FakeServer()
    report = write(out, run_id, FakeClient(server, lambda _, n: "lose" if n == 2 else None), bundle_size=3,
                   writers=1)
    assert report.confirmed == 3 and report.failed == 0 and report.written == len(planned(out, run_id))
    assert len(server.transactions) == 1 + -(-report.written // 3)  # the confirmed group was not sent again
    rows = ledger_rows(out, run_id)
    confirmed = subjects(server.transactions[1])
    for pid in confirmed:
        locations = json.loads(rows[pid][1] or "[]")
        assert [loc for loc in locations if loc.startswith("Provenance/")]


def test_a_killed_writer_resumes_and_nothing_is_created_twice(run: tuple[Path, str]) -> None:
    out, run_id = run
    expected = planned(out, run_id)
    server = FakeServer()
    # the third group commits on the server, then its writer dies before the ledger hears of it
    with pytest.raises(RuntimeError, match="killed"):
        write(out, run_id, FakeClient(server, lambda _, n: "kill" if n == 4 else None), bundle_size=2, writers=2)
    rows = ledger_rows(out, run_id)
    assert 0 < sum(state == "written" for state, _ in rows.values()) < len(expected)
    assert any(state == "sending" for state, _ in rows.values())
    report = write(out, run_id, FakeClient(server), bundle_size=2, writers=2)
    assert report.written + report.already_written == len(expected) and report.failed == 0
    assert {state for state, _ in ledger_rows(out, run_id).values()} == {"written"}
    assert all(count == 1 for count in server.creates.values())
    provenances = [c for c in server.creates if c.startswith("Provenance?")]
    assert len(provenances) == len(expected)
    assert write(out, run_id, FakeClient(server), bundle_size=2).transactions == 0


def test_another_server_or_a_run_without_target_is_refused(run: tuple[Path, str], key: SigningKey,
                                                          tmp_path: Path) -> None:
    out, run_id = run
    with pytest.raises(PopulationWriteError, match="another FHIR server"):
        write_population(out, run_id, server="https://other.example.test/fhir", client=FakeClient(FakeServer()))
    with pytest.raises(PopulationWriteError, match="client given is for another"):
        write_population(out, run_id, server=BASE, client=FakeClient(FakeServer(), base_url="https://x.test/fhir"))
    with pytest.raises(PopulationWriteError, match="no run"):
        write_population(out, "20990101T000000Z-000000", server=BASE, client=FakeClient(FakeServer()))
    assert main(["population", "write", str(out / "runs" / run_id), "--server", "https://other.example.test/fhir"]) == 2
    assert main(["population", "write", str(out), "--server", BASE]) == 2  # OUT without --run
    assert locate_run(out / "runs" / run_id, None) == (out, run_id)
    write_cohort_ndjson(tmp_path / "nd", 3, seed=2)
    untargeted = run_population(tmp_path / "nd", tmp_path / "untargeted", serial=True, draws=20)
    with pytest.raises(PopulationWriteError, match="no target"):
        write_population(tmp_path / "untargeted", untargeted.run_id, server=BASE, client=FakeClient(FakeServer()))


def test_import_ndjson_holds_each_resource_once_with_ids_and_signatures_that_verify(
        run: tuple[Path, str], key: SigningKey, tmp_path: Path) -> None:
    out, run_id = run
    report = write_import_ndjson(out, run_id, tmp_path / "import")
    files = {p.stem: [json.loads(line) for line in p.read_text("utf-8").splitlines()]
             for p in (tmp_path / "import").glob("*.ndjson")}
    kinds = {"Organization", "Device", "RiskAssessment", "CarePlan", "Provenance"}
    assert kinds <= set(files) <= kinds | {"Goal"}
    resources = {f"{t}/{r['id']}": r for t, rows in files.items() for r in rows}
    assert len(resources) == sum(len(rows) for rows in files.values()) == report.created
    assert "urn:uuid:" not in json.dumps(files)
    assert len(files["Provenance"]) == report.patients == len(planned(out, run_id))
    assert len(files["Organization"]) == 1 and len(files["Device"]) == 2  # the model's and the key's
    for provenance in files["Provenance"]:
        refs = [t["reference"] for t in provenance["target"]]
        targets = [resources[ref] for ref in refs]  # every target is in the files under its id
        verify_targets(provenance["signature"][0]["data"], targets, refs, key.private_key.public_key())
    # deterministic ids: the same run imported twice gives the same files
    write_import_ndjson(out, run_id, tmp_path / "again")
    for name in files:
        assert (tmp_path / "again" / f"{name}.ndjson").read_bytes() == (tmp_path / "import" / f"{name}.ndjson"
                                                                         ).read_bytes()
    with pytest.raises(PopulationWriteError, match="already holds"):
        write_import_ndjson(out, run_id, tmp_path / "import")
