"""``fhirtwin demo``: the whole vertical path on the embedded default, the local sandbox and its cohort.

Start the sandbox, load the synthetic cohort, read every patient (twenty per request), build each
TwinState, fit the mechanistic twin, rank interventions, write RiskAssessment, CarePlan, Goals and a
signed Provenance back in one transaction per patient, verify one signature, and write an HTML
report. Every step prints what it did and what it measured.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from fhirtwin.engine import Engine, TwinRun
from fhirtwin.fhir.client import FhirClient
from fhirtwin.keys import signing_key_for
from fhirtwin.progress import progress
from fhirtwin.report import write_report
from fhirtwin.sandbox.cohort import DEFAULT_PATIENTS, generate_cohort
from fhirtwin.sandbox.load import load_sandbox
from fhirtwin.sandbox.server import Sandbox
from fhirtwin.twin import Scale

DEMO_DRAWS = 500


def _pct(x: float) -> str:
    return f"{100 * x:4.1f}%"


def _words(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.most_common()) or "nothing"


def _scale_rows(runs: list[TwinRun]) -> list[tuple[str, int, float]]:
    """Median 10-year total CVD risk by which scales of data the patient's twin holds."""
    rows = []
    for scale in (Scale.MOLECULAR, Scale.ENVIRONMENTAL, Scale.BEHAVIORAL):
        for has in (True, False):
            risks = sorted(r.require_plan().baseline.at_horizon("total_cvd")["median"] for r in runs
                           if bool(r.state.by_scale()[scale]) is has)
            if risks:
                rows.append((f"{'with' if has else 'without'} {scale.value} data", len(risks), risks[len(risks) // 2]))
    return rows


def run_demo(*, port: int | None = None, data_dir: str | Path | None = None, patients: int | None = None,
             show: int = 10) -> int:
    """Run the demo and print what happened at each step; returns a process exit code."""
    sandbox = Sandbox.from_env(port=port, data_dir=data_dir)
    print(f"1. sandbox: {sandbox.start()}")
    n = patients or DEFAULT_PATIENTS
    report = load_sandbox(sandbox.base_url, n_patients=n, cohort_dir=sandbox.data_dir / "cohort")
    action = "already loaded" if report.skipped else f"loaded in {report.seconds:.0f} s"
    print(f"2. cohort: {report.patients} synthetic patients, {report.entries} resources, "
          f"{report.profiles} conformance and registration resources ({action})")

    client = FhirClient(sandbox.base_url)
    engine = Engine(client, signing_key=signing_key_for(sandbox.base_url), draws=DEMO_DRAWS)
    ids = [bundle["entry"][0]["resource"]["id"] for bundle in generate_cohort(n_patients=n).bundles]
    started = time.monotonic()
    states = [engine.twin(record) for record in progress(engine.read_many(ids), total=len(ids), desc="read")]
    read_s = time.monotonic() - started
    ledger = Counter(entry.kind.value for state in states for entry in state.ledger)
    print(f"3. read: {len(states)} twins from {client.request_count} HTTP requests in {read_s:.1f} s; "
          f"data-quality ledger: {_words(ledger)}")

    started = time.monotonic()
    runs: list[TwinRun] = [engine.simulate(state) for state in progress(states, desc="simulate")]
    sim_s = time.monotonic() - started
    planned = [r for r in runs if r.plan is not None]
    scopes = Counter(r.scope.code for r in runs if r.scope is not None and not r.scope.in_scope)
    lacking = [r.state.patient_id for r in runs if r.plan is None and (r.scope is None or r.scope.in_scope)]
    print(f"4. simulate: {len(planned)} of {len(runs)} patients ({DEMO_DRAWS} draws x 10 years, baseline and "
          f"every eligible intervention) in {sim_s:.1f} s; {sum(scopes.values())} out of scope for the "
          f"primary-prevention equations ({_words(scopes)}); {len(lacking)} lacked required data and get no "
          "prediction (nothing is guessed)")

    print("\n   10-year total CVD risk by the scales of data available:")
    for label, count, median in _scale_rows(planned):
        print(f"     {label:<28} {count:>4} patients   median {_pct(median)}")
    print("\n   highest risks (ARR: absolute risk reduction in percentage points over 10 years):"
          "\n   patient    age sex     10-y total CVD (90% interval)   best option (ARR, NNT)")
    ranked = sorted(planned, key=lambda r: -r.require_plan().baseline.at_horizon("total_cvd")["median"])
    for run in ranked[:show]:
        state, plan = run.state, run.require_plan()
        risk = plan.baseline.at_horizon("total_cvd")
        best = plan.options[0] if plan.options else None
        option = "none eligible"
        if best is not None:
            nnt = f"NNT {best.nnt:.0f}" if best.nnt else "NNT n/a"
            option = f"{best.scenario.name} ({100 * best.arr['median']:.1f} points, {nnt})"
        print(f"   {state.patient_id:<10} {state.age_years():>3} {str(state.demographics.sex):<7} "
              f"{_pct(risk['median'])} ({_pct(risk['p05'])}-{_pct(risk['p95'])})      {option}")
    if lacking:
        print(f"   not simulated ({len(lacking)}): required inputs missing, e.g. "
              f"`fhirtwin state --server {sandbox.base_url} --patient {lacking[0]}` shows what the twin holds")

    before = client.request_count
    started = time.monotonic()
    results = list(progress(engine.write(runs), total=len(runs), desc="write"))
    write_s = time.monotonic() - started
    status = Counter(r.status for r in results)
    created = sum(r.created for r in results)
    print(f"\n5. write-back: {_words(status)} patients; {created} resources created (RiskAssessment, Goal, "
          f"CarePlan, Provenance) with {client.request_count - before} requests in {write_s:.1f} s; "
          "a rerun creates nothing")
    signed = next((r.provenance for r in results if r.provenance), None)
    if signed:
        verdict = engine.verify(signed)
        print(f"6. signature: {signed} {'verifies' if verdict.valid else 'DOES NOT verify'} against its "
              f"{len(verdict.targets)} targets ({verdict.message})")
    path = write_report(ranked[:show], sandbox.data_dir / "report.html", title="fhirtwin demo: highest risks")
    print(f"7. report: {path}")
    print(f"\nNext: fhirtwin state --server {sandbox.base_url} --patient {ids[2]}   |   "
          f"fhirtwin serve --dev-no-auth --fhir-server {sandbox.base_url}")
    return 0 if status.get("failed", 0) == 0 else 1
