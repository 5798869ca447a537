"""Benchmark: population write-back throughput (patients written per second) by bundle size and writers.

Run: ``python benchmarks/population_write.py [--server http://127.0.0.1:8080/fhir] [--patients 40]
[--sizes 1,10,50] [--writers 1,2]``

Each configuration writes its own fresh patients (results are conditional creates keyed by the patient's
inputs, so a second write of the same patients would only find them): the script uploads
``patients x configurations`` synthetic patients with ids unique to this call, reads each back as the engine
reads it (with versions, as a Bulk export gives it), makes one population run per configuration for the
server, and times :func:`fhirtwin.population.writeback.write_population` on it. The shared Organization and
Device transaction is included in each time. Ratios are to bundle size 1 with 1 writer of the same call.

Measured on the shared 2-core machine (HAPI 8.8 sandbox on the same cores, load 3-4 from other work), 40
patients per configuration (23-32 planned): bundle size 1 / 10 / 50 with 1 writer 0.9 / 2.1 / 1.8 patients/s,
with 2 writers 1.3 / 2.0 / 1.9 (ratios to 1x1: 2.31, 1.96, 1.40, 2.11, 2.04). The server's work dominates: a
patient's transaction carries 200-300 versioned references (each RiskAssessment's basis, the Provenance's
entities) that HAPI checks and versions, about 0.5-0.8 s per patient even when it creates nothing; grouping
saves the per-transaction overhead (about half), and a second writer gains little while HAPI has the same
two cores.

Not a test: never collected by pytest, and nothing here asserts on wall time. It writes to the server it is
given: use the local sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fhirtwin.engine import Engine
from fhirtwin.fhir.client import FhirClient
from fhirtwin.population.run import run_population
from fhirtwin.population.writeback import write_population
from fhirtwin.sandbox.cohort import generate_patient
from fhirtwin.writeback.jws import ENV_KEY_FILE, generate_key


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", default="http://127.0.0.1:8080/fhir")
    parser.add_argument("--patients", type=int, default=40, help="patients uploaded per configuration")
    parser.add_argument("--sizes", type=_numbers, default=[1, 10, 50], help="bundle sizes (patients per transaction)")
    parser.add_argument("--writers", type=_numbers, default=[1, 2], help="writer counts")
    parser.add_argument("--draws", type=int, default=50, help="ensemble draws of the population runs")
    args = parser.parse_args()
    configs = [(size, writers) for writers in args.writers for size in args.sizes]
    client = FhirClient(args.server)
    engine = Engine(client)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        key = generate_key("ES256")
        (work / "signing.pem").write_bytes(key.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        os.environ[ENV_KEY_FILE] = str(work / "signing.pem")
        runs = []
        started = time.monotonic()
        for number, _ in enumerate(configs):
            prefix = f"pwb{uuid.uuid4().hex[:8]}"
            source = work / f"ndjson-{number}"
            source.mkdir()
            handles = {}
            for k in range(1, args.patients + 1):
                bundle, _ = generate_patient(k, 20261127 + number)
                bundle = json.loads(json.dumps(bundle).replace("ftp-", f"{prefix}-"))
                client.transaction(bundle)
                for resource in engine.read(bundle["entry"][0]["resource"]["id"], with_stored=False).resources:
                    rtype = resource["resourceType"]
                    if rtype not in handles:
                        handles[rtype] = open(source / f"{rtype}.ndjson", "w", encoding="utf-8")  # noqa: SIM115
                    handles[rtype].write(json.dumps(resource) + "\n")
            for handle in handles.values():
                handle.close()
            made = run_population(source, work / "out", serial=True, draws=args.draws, as_of=date(2026, 6, 30),
                                    recorded=datetime.now(UTC), target=args.server, buckets=2)
            runs.append((made.run_id, made.patients.get("planned", 0)))
        print(f"prepared {len(configs)} runs of {args.patients} patients in {time.monotonic() - started:.0f} s")
        rates: dict[tuple[int, int], float] = {}
        print(f"{'bundle size':>11} {'writers':>7} {'patients':>8} {'transactions':>12} {'seconds':>8} "
              f"{'patients/s':>10}")
        for (size, writers), (run_id, planned) in zip(configs, runs, strict=True):
            report = write_population(work / "out", run_id, server=args.server, bundle_size=size, writers=writers)
            assert report.written == planned and report.failed == 0, report.failures
            rates[size, writers] = report.written / report.seconds
            print(f"{size:>11} {writers:>7} {report.written:>8} {report.transactions:>12} {report.seconds:>8.2f} "
                  f"{rates[size, writers]:>10.1f}")
        base = rates.get((1, 1))
        if base:
            print("ratio to bundle size 1, 1 writer: " + ", ".join(
                f"{size}x{writers} {rate / base:.2f}" for (size, writers), rate in rates.items()))


if __name__ == "__main__":
    main()
