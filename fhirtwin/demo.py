"""``fhirtwin demo``: the whole vertical path on the embedded default, the local sandbox and its cohort.

Start the sandbox, load the synthetic cohort, read every patient (twenty per request), build each
TwinState, fit the mechanistic twin, rank interventions, and print a summary. Write-back of
RiskAssessment/CarePlan/Provenance is not implemented yet; the demo says so instead of pretending.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from fhirtwin.fhir.client import FhirClient
from fhirtwin.pipeline import read_twins, simulate_twin
from fhirtwin.sandbox.cohort import DEFAULT_PATIENTS, generate_cohort
from fhirtwin.sandbox.load import load_sandbox
from fhirtwin.sandbox.server import Sandbox

DEMO_DRAWS = 500


def _pct(x: float) -> str:
    return f"{100 * x:4.1f}%"


def run_demo(*, port: int | None = None, data_dir: str | Path | None = None, patients: int | None = None,
             show: int = 10) -> int:
    """Run the demo and print what happened at each step; returns a process exit code."""
    sandbox = Sandbox.from_env(port=port, data_dir=data_dir)
    print(f"1. sandbox: {sandbox.start()}")
    n = patients or DEFAULT_PATIENTS
    report = load_sandbox(sandbox.base_url, n_patients=n, cohort_dir=sandbox.data_dir / "cohort")
    action = "already loaded" if report.skipped else f"loaded in {report.seconds:.0f} s"
    print(f"2. cohort: {report.patients} synthetic patients, {report.entries} resources ({action})")

    client = FhirClient(sandbox.base_url)
    ids = [bundle["entry"][0]["resource"]["id"] for bundle in generate_cohort(n_patients=n).bundles]
    started = time.monotonic()
    states = list(read_twins(client, ids))
    read_s = time.monotonic() - started
    ledger = Counter(entry.kind.value for state in states for entry in state.ledger)
    print(f"3. read: {len(states)} twins from {client.request_count} HTTP requests in {read_s:.1f} s "
          f"({len(states) / read_s:.0f} patients/s); data-quality ledger: "
          + ", ".join(f"{k} {v}" for k, v in ledger.most_common()))

    started = time.monotonic()
    runs = [simulate_twin(state, draws=DEMO_DRAWS) for state in states]
    sim_s = time.monotonic() - started
    planned = [r for r in runs if r.plan is not None]
    print(f"4. simulate: {len(planned)} of {len(runs)} patients simulated ({DEMO_DRAWS} draws x 10 years, "
          f"baseline + every eligible intervention) in {sim_s:.1f} s; "
          f"{len(runs) - len(planned)} lacked required data (reasons are reported, nothing is guessed)")

    print("\n   patient    age sex     10-y total CVD (90% interval)   best option (ARR, NNT)")
    for run in sorted(planned, key=lambda r: -r.plan.baseline.at_horizon("total_cvd")["median"])[:show]:
        state, plan = run.state, run.plan
        risk = plan.baseline.at_horizon("total_cvd")
        best = plan.options[0] if plan.options else None
        option = "none eligible"
        if best is not None:
            nnt = f"NNT {best.nnt:.0f}" if best.nnt else "NNT n/a"
            option = f"{best.scenario.name} ({_pct(best.arr['median']).strip()}, {nnt})"
        print(f"   {state.patient_id:<10} {state.age_years():>3} {str(state.demographics.sex):<7} "
              f"{_pct(risk['median'])} ({_pct(risk['p05'])}-{_pct(risk['p95'])})      {option}")
    reasons = Counter(r.error.split(":", 1)[-1].strip() for r in runs if r.error)
    if reasons:
        print("\n   not simulated: " + "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(3)))
    print("\n5. write-back (RiskAssessment, CarePlan, signed Provenance): not implemented yet; "
          "nothing was written to the server.")
    return 0
