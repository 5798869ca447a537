"""Known-truth check of fhirtwin's parametric g-formula, with pygformula as an independent cross-check.

Data: the generator of tests/unit/test_gformula_data.py (treatment-confounder feedback: LDL-C drives statin
start, the statin lowers later LDL-C, an unmeasured factor raises LDL-C and the event). Truth: the generator
run under each strategy on 400,000 simulated people. Prints, per strategy, the true 10-year risk, fhirtwin's
g-formula estimate with its bootstrap 95% interval, and the naive LDL-adjusted pooled logistic odds ratio.

    .venv/bin/python benchmarks/gformula_check.py [--n 4000] [--seed 9] [--bootstrap 200]
    .venv/bin/python benchmarks/gformula_check.py --pygformula PYTHON   # an interpreter with pygformula 1.2.0

pygformula is not a dependency of fhirtwin (see docs/causal.md for why): it runs in the interpreter given,
in a child process, on the same data written to a temporary CSV. Its 1.2.0 wheel lacks the module
``pygformula/version.py`` its ``__init__`` imports, and its plot module forces matplotlib's Qt5Agg backend,
which fails without a display: the child registers the missing module and keeps matplotlib headless before
importing pygformula.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "unit"))

from test_gformula_data import ALWAYS, NEVER, PERIODS, observational, start_above, true_risk  # noqa: E402

from fhirtwin.causal.gformula import (  # noqa: E402
    NATURAL_COURSE,
    Spec,
    always,
    gformula,
    naive_adjusted_odds_ratio,
    never,
    start_when,
)

THRESHOLD = 160.0

PYGFORMULA_CHILD = r"""
import json, sys, types
import numpy as np
import pandas as pd
sys.modules["pygformula.version"] = types.SimpleNamespace(__version__="1.2.0")  # missing from the 1.2.0 wheel
import matplotlib
matplotlib.use("Agg")
matplotlib.use = lambda *args, **kwargs: None  # its plot module forces Qt5Agg, which fails without a display
from pygformula import ParametricGformula
from pygformula.interventions import static

path, threshold = sys.argv[1], float(sys.argv[3])
periods, n_simul, seed = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
data = pd.read_csv(path)

def start_above(new_df, pool, int_var, time_name, t):
    rows = new_df[time_name] == t
    on = (new_df.loc[rows, "ldl"] > threshold).to_numpy()
    if t > 0:  # absorbing: once started, stays on
        name = int_var[0] if isinstance(int_var, list) else int_var
        before = pool.loc[pool[time_name] == t - 1].set_index("id")[name]
        on = on | (new_df.loc[rows, "id"].map(before).fillna(0).to_numpy() > 0)
    new_df.loc[rows, int_var] = on.astype(float)

g = ParametricGformula(
    obs_data=data, id="id", time_name="period", time_points=periods,
    int_descript=["never", "always", "ldl>%g" % threshold],
    Intervention1_statin=[static, np.zeros(periods)],
    Intervention2_statin=[static, np.ones(periods)],
    Intervention3_statin=[start_above],
    covnames=["ldl", "statin"], covtypes=["normal", "absorbing"],
    # an absorbing covariate's model must name its own lag in pygformula 1.2.0 (its rows are selected on it)
    covmodels=["ldl ~ lag1_ldl + lag1_statin + age0 + period",
               "statin ~ ldl + lag1_ldl + lag1_statin + age0 + period"],
    basecovs=["age0"], outcome_name="event", outcome_type="survival",
    ymodel="event ~ ldl + lag1_ldl + statin + lag1_statin + age0 + period",
    n_simul=n_simul, seed=seed, nsamples=0)
g.fit()
table = g.summary_dict["gformula_results"]
print("@@" + table.to_json(orient="records"))
"""


def run_pygformula(python: str, data_csv: Path, n_simul: int, seed: int) -> tuple[dict[str, float], float]:
    """pygformula's risk by the end of follow-up per strategy (its own output table), and its wall time."""
    start = time.perf_counter()
    out = subprocess.run([python, "-c", PYGFORMULA_CHILD, str(data_csv), str(PERIODS), str(THRESHOLD),
                          str(n_simul), str(seed)], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"pygformula failed: {out.stderr.strip().splitlines()[-6:]}")
    records = json.loads(next(line[2:] for line in out.stdout.splitlines() if line.startswith("@@")))
    risk_key = next(k for k in records[0] if k.lower().startswith("g-form risk"))
    last = max(int(r["period"]) for r in records)
    return {str(r["Intervention"]): float(r[risk_key]) for r in records if int(r["period"]) == last}, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--bootstrap", type=int, default=200)
    parser.add_argument("--monte-carlo", type=int, default=10_000)
    parser.add_argument("--pygformula", metavar="PYTHON", help="an interpreter with pygformula installed")
    args = parser.parse_args()

    data = observational(args.n, args.seed)
    truth = {"never": true_risk(NEVER), "always": true_risk(ALWAYS), f"ldl>{THRESHOLD:g}": true_risk(
        start_above(THRESHOLD))}
    spec = Spec(treatment="statin", covariates=("ldl",), baseline=("age0",))
    strategies = {"never": never(), "always": always(), f"ldl>{THRESHOLD:g}": start_when("ldl", THRESHOLD),
                  "natural course": NATURAL_COURSE}
    start = time.perf_counter()
    result = gformula(data, spec, strategies, monte_carlo=args.monte_carlo, bootstrap=args.bootstrap, seed=args.seed)
    seconds = time.perf_counter() - start
    odds_ratio, lo, hi = naive_adjusted_odds_ratio(data, spec)
    observed = float(data.groupby("id")["event"].max().mean())

    print(f"data: {args.n} people, {PERIODS} yearly periods, {len(data)} person-periods, "
          f"{int(data.event.sum())} events, seed {args.seed}")
    print(f"fhirtwin g-formula: {args.monte_carlo} Monte Carlo people, {result.bootstrap} bootstrap replicates, "
          f"{seconds:.1f} s")
    print(f"{'strategy':<16}{'truth':>8}{'g-formula':>11}{'95% interval':>20}{'covered':>9}")
    for name, risk in result.risk.items():
        lo_s, hi_s = result.interval[name]
        true = truth.get(name, observed if name == "natural course" else float("nan"))
        label = "observed" if name == "natural course" else "truth"
        covered = "yes" if lo_s <= true <= hi_s else "NO"
        print(f"{name:<16}{true:>8.4f}{risk:>11.4f}{f'[{lo_s:.4f}, {hi_s:.4f}]':>20}{covered:>9}"
              f"{'  (' + label + ')' if label == 'observed' else ''}")
    d_lo, d_hi = result.difference_interval["always"]
    print(f"always - never: truth {truth['always'] - truth['never']:+.4f}, g-formula "
          f"{result.difference['always']:+.4f} [{d_lo:+.4f}, {d_hi:+.4f}]")
    print(f"true 10-year risk ratio always/never: {truth['always'] / truth['never']:.3f}")
    print(f"naive pooled logistic adjusted for current LDL-C: statin OR {odds_ratio:.3f} [{lo:.3f}, {hi:.3f}]")

    if args.pygformula:
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "data.csv"
            data.to_csv(csv, index=False)
            try:
                risks, py_seconds = run_pygformula(args.pygformula, csv, args.monte_carlo, args.seed)
            except (RuntimeError, StopIteration, OSError, json.JSONDecodeError) as exc:
                print(f"pygformula: did not run ({exc})")
                return
        print(f"pygformula 1.2.0, same models and data ({args.monte_carlo} simulated people, point estimates, "
              f"{py_seconds:.1f} s):")
        print(f"{'strategy':<16}{'truth':>8}{'pygformula':>12}{'fhirtwin':>10}")
        for name, risk in risks.items():
            ours = "natural course" if name == "Natural course" else name
            true = truth.get(ours, observed)
            print(f"{ours:<16}{true:>8.4f}{risk:>12.4f}{result.risk[ours]:>10.4f}")


if __name__ == "__main__":
    main()
