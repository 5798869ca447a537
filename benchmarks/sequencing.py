"""Treatment sequencing: the learned policy against the exact optimum on held-out synthetic patients.

Run: ``.venv/bin/python benchmarks/sequencing.py [--patients 600] [--draws 100] [--seed 7]``

The synthetic cohort (``fhirtwin.sandbox.cohort``) is read offline into TwinStates; in-scope patients with
enough data get their decision process (``fhirtwin.sequencing.process``). A seeded hash of the patient id
puts 30 % of them in the held-out set. The learned policy (``fhirtwin.sequencing.learn``: a process model
solved exactly, plus a correction fitted on exact advantages) is fitted on the rest; every held-out
patient's own process is then solved exactly and each policy evaluated exactly on it. Printed: the value
ratio learned / optimal (per patient with a positive optimum; per patient with a material optimum of at
least 1 per 1,000, with the regret of the others; and pooled), and the mean net benefit per 1,000 of the
optimum, the learned policy, all-eligible-now and the guideline
sequences, with 90 % bootstrap intervals over held-out patients and paired differences.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from datetime import date

import numpy as np

from fhirtwin.adapters import build_twin
from fhirtwin.sandbox.cohort import generate_cohort
from fhirtwin.sequencing.learn import fit_policy
from fhirtwin.sequencing.mdp import evaluate, solve
from fhirtwin.sequencing.policies import FIXED_POLICIES
from fhirtwin.sequencing.process import TherapyProcess, build_process
from fhirtwin.sim import InsufficientData, inputs_from_state
from fhirtwin.sim.scope import decide_scope

REFERENCE = date(2026, 6, 30)
HELD_OUT_SHARE = 0.3
#: Net benefit below this (events per patient) counts as "nothing to gain" (ratio not defined).
ZERO = 1e-5
#: An optimum of at least this (1 event-equivalent per 1,000) is "material" for the restricted ratio.
MATERIAL = 1e-3


def held_out(patient_id: str, seed: int) -> bool:
    """Seeded split rule: the first bits of SHA-256(seed:patient id)."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).hexdigest()
    return int(digest[:8], 16) / 0xFFFFFFFF < HELD_OUT_SHARE


def processes(patients: int, draws: int) -> list[TherapyProcess]:
    """Decision processes of the cohort's in-scope patients with enough data."""
    out = []
    for bundle in generate_cohort(patients, reference_date=REFERENCE.isoformat()).bundles:
        resources = [entry["resource"] for entry in bundle["entry"]]
        patient_id = next(r["id"] for r in resources if r["resourceType"] == "Patient")
        state = build_twin(patient_id, resources, REFERENCE)
        if not decide_scope(state).in_scope:
            continue
        try:
            inputs = inputs_from_state(state, REFERENCE)
        except InsufficientData:
            continue
        if inputs.egfr_ml_min_1_73m2 < 15:
            continue
        out.append(build_process(inputs, draws=draws, seed=0))
    return out


def interval(values: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float]:
    """90 % bootstrap interval of the mean over patients."""
    means = np.array([np.mean(values[rng.integers(0, values.size, values.size)]) for _ in range(n)])
    lo, hi = np.percentile(means, [5, 95])
    return float(lo), float(hi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=600)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    start = time.perf_counter()
    every = processes(args.patients, args.draws)
    train = [p for p in every if not held_out(p.inputs.patient_id, args.seed)]
    test = [p for p in every if held_out(p.inputs.patient_id, args.seed)]
    built = time.perf_counter()
    policy = fit_policy(train, seed=args.seed)
    fitted = time.perf_counter()
    names = ["optimum", "learned", *[n for n in FIXED_POLICIES if n != "current care"]]
    rows: dict[str, list[float]] = {name: [] for name in names}
    for process in test:
        mdp = process.mdp()
        base = evaluate(mdp, FIXED_POLICIES["current care"](process))[0, process.start]
        tables = {"optimum": solve(mdp).policy, "learned": policy.policy(process),
                  **{n: make(process) for n, make in FIXED_POLICIES.items() if n != "current care"}}
        for name, table in tables.items():
            rows[name].append(evaluate(mdp, table)[0, process.start] - base)
    nb = {name: np.array(values) for name, values in rows.items()}
    rng = np.random.default_rng(args.seed)
    positive = nb["optimum"] > ZERO
    ratio = nb["learned"][positive] / nb["optimum"][positive]
    print(f"patients: {len(every)} in scope ({len(train)} training, {len(test)} held out, seed {args.seed}); "
          f"{args.draws} draws; processes {built - start:.0f} s, fit {fitted - built:.0f} s")
    print(f"held-out patients with a positive optimum: {int(positive.sum())}; with nothing to gain: "
          f"{int((~positive).sum())}, of whom the learned policy loses > 0.1 per 1,000 in "
          f"{int(np.sum(nb['learned'][~positive] < -1e-4))}")
    lo, hi = interval(ratio, rng)
    print(f"value ratio learned/optimal per patient: mean {ratio.mean():.4f} (90 % bootstrap {lo:.4f}-{hi:.4f}), "
          f"median {np.median(ratio):.4f}, minimum {ratio.min():.4f}; share of patients >= 0.98: "
          f"{np.mean(ratio >= 0.98):.3f}")
    material = nb["optimum"] >= MATERIAL
    small = positive & ~material
    restricted = nb["learned"][material] / nb["optimum"][material]
    rest = 1000 * (nb["optimum"][small] - nb["learned"][small])
    print(f"restricted to a material optimum (>= {1000 * MATERIAL:g} per 1,000; {int(material.sum())} patients): "
          f"mean {restricted.mean():.4f}, median {np.median(restricted):.4f}, minimum {restricted.min():.4f}, "
          f"share >= 0.98: {np.mean(restricted >= 0.98):.3f}; the other {int(small.sum())} with a positive optimum: "
          f"regret per 1,000 mean {rest.mean() if rest.size else 0.0:.3f}, maximum {rest.max(initial=0.0):.3f}")
    print(f"pooled value ratio (sum learned / sum optimal net benefit): "
          f"{nb['learned'].sum() / nb['optimum'].sum():.4f}")
    regret = 1000 * (nb["optimum"] - nb["learned"])
    print(f"regret of the learned policy per 1,000 (optimal minus learned net benefit): mean {regret.mean():.3f}, "
          f"95th percentile {np.percentile(regret, 95):.3f}, maximum {regret.max():.3f}; zero (learned optimal) "
          f"for {int(np.sum(regret < 1e-6))} of {regret.size}")
    print("mean net benefit per 1,000 held-out patients (events-prevented-equivalents, vs current care):")
    for name in names:
        lo, hi = interval(1000 * nb[name], rng)
        print(f"  {name:20s} {1000 * nb[name].mean():7.2f}  (90 % bootstrap {lo:.2f} to {hi:.2f})")
    print("paired differences per 1,000 (learned minus comparator):")
    for name in names[2:]:
        diff = 1000 * (nb["learned"] - nb[name])
        lo, hi = interval(diff, rng)
        print(f"  learned - {name:20s} {diff.mean():6.2f}  (90 % bootstrap {lo:.2f} to {hi:.2f}); "
              f"learned worse on {int(np.sum(diff < -1e-6))} of {diff.size}")


if __name__ == "__main__":
    main()
