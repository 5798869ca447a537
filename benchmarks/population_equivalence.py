"""A population run through Bulk export writes what the one-patient path writes: a check on a whole cohort.

Run: ``python benchmarks/population_equivalence.py [--server URL] [--prefix ftp-] [--draws 1000]`` against a
server holding a cohort (the sandbox's 240 patients by default). It puts the cohort in a Group, runs
``population run`` from that Group's ``$export`` (two Dask workers) and, for every patient, the engine's own
one-patient path (``Engine.run`` reading from the server with the TREAT consent check, then ``prepare`` or
``prepare_retirement``: what ``fhirtwin run --all`` sends) with the same reference date, recording time and
key. It compares each patient's status and bundle: the population bundle adapted for HAPI (``for_hapi``)
must equal the engine's byte for byte, signature values aside (ECDSA signatures differ on every signing).
Nothing is written; the Group is deleted afterwards. Prints one JSON object; exit 1 when any patient differs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:8080/fhir"
AS_OF = date(2026, 6, 30)
RECORDED = datetime(2026, 7, 1, 9, 30, tzinfo=UTC)


def _unsigned(bundle: dict[str, Any]) -> dict[str, Any]:
    copied = copy.deepcopy(bundle)
    for entry in copied["entry"]:
        for signature in entry["resource"].get("signature", []):
            signature.pop("data")
    return copied


def _patient_of(bundle: dict[str, Any]) -> str:
    return str(next(e["resource"]["subject"]["reference"] for e in bundle["entry"]
                    if e["resource"].get("resourceType") in ("RiskAssessment", "Goal", "CarePlan")).split("/")[1])


def compare(server: str, prefix: str, draws: int) -> dict[str, Any]:
    import pyarrow.parquet as pq
    from cryptography.hazmat.primitives import serialization

    from fhirtwin.consent import ConsentDenied, ConsentPolicy
    from fhirtwin.engine import Engine
    from fhirtwin.fhir.client import FhirClient
    from fhirtwin.population.run import ServerSource, run_population
    from fhirtwin.writeback.jws import ENV_KEY_FILE, generate_key
    from fhirtwin.writeback.transaction import for_hapi

    client = FhirClient(server)
    ids = sorted(r["id"] for r in client.search_all("Patient", {"_elements": "id", "_count": 500}, max_pages=100)
                 if str(r.get("id", "")).startswith(prefix))
    group_id = f"equivalence-{uuid.uuid4().hex[:12]}"
    client.update({"resourceType": "Group", "id": group_id, "type": "person", "actual": True,
                   "member": [{"entity": {"reference": f"Patient/{pid}"}} for pid in ids]})
    try:
        with tempfile.TemporaryDirectory(prefix="fhirtwin-equivalence-") as tmp:
            key = generate_key("ES256")
            key_file = Path(tmp) / "signing.pem"
            key_file.write_bytes(key.private_key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
            os.environ[ENV_KEY_FILE] = str(key_file)
            out = Path(tmp) / "out"
            report = run_population(None, out, server=ServerSource(client, "group", group_id), target=server,
                                    workers=2, draws=draws, as_of=AS_OF, recorded=RECORDED)
            rows = {r["patient_id"]: r for path in (out / "runs" / report.run_id / "summaries").glob("*.parquet")
                    for r in pq.read_table(path).to_pylist()}
            population = {}
            for path in (out / "runs" / report.run_id / "bundles").glob("*.ndjson"):
                for line in path.read_text("utf-8").splitlines():
                    bundle = json.loads(line)
                    population[_patient_of(bundle)] = for_hapi(bundle)
    finally:
        client.delete("Group", group_id)
    engine = Engine(client, signing_key=key, draws=draws, consent=ConsentPolicy("TREAT"))  # as `fhirtwin run`
    same = differ = 0
    mismatches: list[str] = []
    statuses: dict[str, int] = {}
    for pid in ids:
        try:
            run = engine.run(pid, as_of=AS_OF)
        except ConsentDenied:
            run = None
        if run is None:
            expected: dict[str, Any] | None = None
        elif run.plan is not None:
            expected = engine.prepare(run, now=RECORDED).bundle
        elif run.scope is not None and not run.scope.in_scope:
            retirement = engine.prepare_retirement(pid, run.stored, now=RECORDED)
            expected = retirement.bundle if retirement is not None else None
        else:
            expected = None
        row = rows.get(pid, {})
        statuses[row.get("status", "missing")] = statuses.get(row.get("status", "missing"), 0) + 1
        got = population.get(pid)
        if (expected is None and got is None) or (
                expected is not None and got is not None and _unsigned(expected) == _unsigned(got)):
            same += 1
        else:
            differ += 1
            mismatches.append(pid)
    return {"patients": len(ids), "population_statuses": statuses, "bundles": len(population),
            "identical": same, "different": differ, "different_patients": mismatches[:20],
            "export": report.export, "draws": draws}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default=DEFAULT_SERVER)
    parser.add_argument("--prefix", default="ftp-", help="ids of the cohort's patients start with this")
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args(argv)
    result = compare(args.server.rstrip("/"), args.prefix, args.draws)
    print(json.dumps(result, default=str))
    return 0 if result["different"] == 0 else 1


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
