"""Validate forecast trajectories against the synthetic cohort's held-out future measurements.

Run: ``python benchmarks/validate_calibration.py [--patients 240] [--holdout-years 3]``

For each patient of ``fhirtwin.sandbox.cohort.generate_cohort`` the twin is built from the FHIR bundle
(adapters), the model is fitted as of ``reference_date - holdout`` (only data up to then), and the
measurements taken after the cut-off are compared with the 90% predictive intervals of the baseline
forecast. Prints per-variable coverage and calibration (observed ~ slope * predicted + intercept), for
all held-out points and for points whose treatment did not change after the cut-off (the baseline
scenario cannot know about a statin or antihypertensive started later).

Each biomarker PASSes when the coverage of all its held-out points lies in 85-95%; the script exits
with status 1 if any biomarker FAILs.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date, timedelta

import numpy as np

from fhirtwin.adapters import build_twin
from fhirtwin.sandbox.cohort import generate_cohort
from fhirtwin.sim import InsufficientData, get_model, inputs_from_state
from fhirtwin.sim.inputs import HISTORY_VARIABLES
from fhirtwin.sim.validation import VariableScore, score_forecast

REGIMEN = {
    "ldl_cholesterol_mg_dl": ("statin_start_years",),
    "systolic_bp_mm_hg": ("bp_treatment_start_years",),
    "egfr_ml_min_1_73m2": ("sglt2i_start_years",),
    "hba1c_percent": ("sglt2i_start_years",),
}


TARGET = (0.85, 0.95)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=240)
    parser.add_argument("--seed", type=int, default=20261127)
    parser.add_argument("--holdout-years", type=float, default=3.0)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--model", default="fhirtwin-mechanistic")
    args = parser.parse_args()

    reference = date(2026, 6, 30)
    cut = reference - timedelta(days=round(365.25 * args.holdout_years))
    cohort = generate_cohort(args.patients, args.seed, reference.isoformat())
    pooled = {v: VariableScore() for v in HISTORY_VARIABLES}
    stable = {v: VariableScore() for v in HISTORY_VARIABLES}
    skipped: dict[str, int] = {}
    used = 0
    for pid, bundle in zip(cohort.truth, cohort.bundles, strict=True):
        state = build_twin(pid, [bundle], reference)
        try:
            full = inputs_from_state(state, reference)
            at_cut = inputs_from_state(state, cut)
        except InsufficientData as exc:
            key = exc.missing[0].split(" ")[0]
            skipped[key] = skipped.get(key, 0) + 1
            continue
        shift = args.holdout_years
        heldout = {}
        for v in HISTORY_VARIABLES:
            h = full.history(v)
            rows = h[h[:, 0] > -shift + 1e-6]
            heldout[v] = np.column_stack([rows[:, 0] + shift, rows[:, 1]]) if len(rows) else np.zeros((0, 2))
        model = get_model(args.model).fit(at_cut)
        forecast = model.simulate(None, args.holdout_years + 0.5, args.draws, seed=used)
        scores = score_forecast(forecast, heldout, seed=used, posteriors=getattr(model, "posteriors_", None))
        used += 1
        for v, s in scores.items():
            pooled[v].add(s)
            changed = any((getattr(full, a) is not None and getattr(full, a) > -shift) for a in REGIMEN.get(v, ()))
            if not changed:
                stable[v].add(s)

    print(
        f"cohort: {args.patients} patients (seed {args.seed}); fitted as of {cut} "
        f"({args.holdout_years:g} y held out); used {used}; skipped {sum(skipped.values())} {skipped}"
    )
    print(f"model: {args.model}; target 90% interval coverage {100 * TARGET[0]:g}-{100 * TARGET[1]:g}% (all points)")
    header = (
        f"{'variable':24s} {'subset':8s} {'n':>5s} {'coverage':>9s} {'slope':>7s} {'intercept':>10s}  result"
    )
    print(header)
    print("-" * len(header))
    failed = []
    for v in HISTORY_VARIABLES:
        for name, table in (("all", pooled), ("stable", stable)):
            s = table[v]
            slope, intercept = s.calibration()
            cov = s.coverage()
            verdict = ""
            if name == "all":
                ok = s.n > 0 and TARGET[0] <= cov <= TARGET[1]
                verdict = "PASS" if ok else "FAIL"
                if not ok:
                    failed.append(v)
            print(f"{v:24s} {name:8s} {s.n:5d} {100 * cov:8.1f}% {slope:7.3f} {intercept:10.2f}  {verdict}")
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all biomarkers PASS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
