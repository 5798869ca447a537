"""Benchmark: vectorised ensemble vs integrating each draw separately with scipy's solve_ivp.

Run: ``python benchmarks/bench_ensemble.py [--draws 1000] [--reference-draws 40]``

Budget (design): 1,000 draws x 10 years (120 months) x all outcomes <= 20 ms per patient on one core,
and >= 100x faster than the per-draw solve_ivp reference. The reference integrates the same system
(treatment-onset ODEs, eGFR ODE driven by HbA1c, then survival/incidence ODEs per outcome with the same
equation-anchored hazards) for each draw with RK45; it is timed on ``--reference-draws`` draws and the
per-draw time is scaled to the full ensemble (it is linear in draws). Both use the same parameter
draws, so their outputs are compared too (continuous-time vs monthly discrete-time incidence).

Not a test: never collected by pytest, and nothing here asserts on wall time.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402

from fhirtwin.sim import PatientInputs, get_model  # noqa: E402
from fhirtwin.sim._params import dynamics_parameters  # noqa: E402
from fhirtwin.sim.dynamics import SBP_TREATMENT_FLOOR_MM_HG, month_grid, simulate_trajectories  # noqa: E402
from fhirtwin.sim.ensemble import ParameterDraws, draw_parameters  # noqa: E402
from fhirtwin.sim.hazards import (  # noqa: E402
    MG_DL_PER_MMOL_L_LDL,
    background_death_hazard,
    kfre_log_hazard,
    prevent_log_ratio,
)
from fhirtwin.sim.interventions import candidate_interventions, combinations  # noqa: E402

HORIZON = 10.0
OUTCOMES = ("ascvd", "total_cvd", "heart_failure", "kidney_failure")


def bench_patient() -> PatientInputs:
    """A patient exercising every path: KFRE (UACR known), HbA1c coupling, PRS, all four interventions."""
    t = np.arange(-6.0, 0.5, 0.5)
    rng = np.random.default_rng(0)

    def hist(level: float, slope: float, sd: float) -> np.ndarray:
        return np.column_stack([t, level + slope * t + sd * rng.standard_normal(t.size)])

    return PatientInputs(
        patient_id="bench",
        sex="male",
        age_years=62.0,
        total_cholesterol_mg_dl=225.0,
        hdl_cholesterol_mg_dl=42.0,
        ldl_cholesterol_mg_dl=148.0,
        systolic_bp_mm_hg=146.0,
        egfr_ml_min_1_73m2=48.0,
        bmi_kg_m2=31.0,
        diabetes=True,
        current_smoker=True,
        on_bp_treatment=True,
        on_statin=False,
        hba1c_percent=7.9,
        uacr_mg_g=150.0,
        cad_prs_z=0.8,
        history_ldl_cholesterol_mg_dl=hist(148, 0.5, 10),
        history_systolic_bp_mm_hg=hist(146, 0.8, 8),
        history_egfr_ml_min_1_73m2=hist(48, -2.5, 2.5),
        history_hba1c_percent=hist(7.9, 0.05, 0.2),
        history_bmi_kg_m2=hist(31, 0.1, 0.5),
    )


# ------------------------------------------------------------------------------------------------
# naive reference: one solve_ivp per draw
# ------------------------------------------------------------------------------------------------


def _knot_fn(knots: np.ndarray):
    """Piecewise-linear function of yearly knots and its derivative."""
    years = np.arange(knots.size, dtype=float)

    def value(t: float) -> float:
        return float(np.interp(t, years, knots))

    def slope(t: float) -> float:
        i = min(int(t), knots.size - 2)
        return float(knots[i + 1] - knots[i])

    return value, slope


def reference_one_draw(model, draws: ParameterDraws, d: int, scenario, t_eval: np.ndarray) -> dict[str, np.ndarray]:
    """Integrate one draw: biomarker/treatment ODEs, then survival and incidence ODEs."""
    inputs = model.inputs_
    params = dynamics_parameters()
    tau = params["treatment_onset_time_constant_years"]
    gamma = params["egfr_slope_per_hba1c_percent"]["value"]
    bio = params["biomarkers"]
    ls = {k: v[d] for k, v in draws.level_slope.items()}
    walk = {k: _knot_fn(v[d]) for k, v in draws.walk_knots.items()}
    statin = scenario.has("statin")
    rho = 1.0 - draws.ldl_lowering[statin.intensity][d] if statin is not None else 1.0
    bp_on = scenario.has("bp_lowering") is not None
    drop = draws.sbp_drop_mm_hg[d]
    rr_sglt2 = draws.ratios["sglt2i_kidney_progression_rr"][d]
    f_sglt2 = rr_sglt2 if scenario.has("sglt2i") is not None else 1.0

    def nat(name: str, t: float) -> float:
        a, b = ls[name]
        rel = "relative" in bio[name]["process_sd_per_sqrt_year"]
        w = walk[name][0](t)
        return (a + b * t) * np.exp(w) if rel else a + b * t + w

    def hba1c(t: float) -> float:
        return max(nat("hba1c_percent", t), bio["hba1c_percent"]["floor"])

    a0 = hba1c(0.0)

    def rhs_bio(t: float, y: np.ndarray) -> list[float]:
        e_stat, e_bp, egfr, egfr_nat = y
        coupling = gamma * (hba1c(t) - a0) + walk["egfr_ml_min_1_73m2"][1](t)
        s = ls["egfr_ml_min_1_73m2"][1]
        return [(1.0 - e_stat) / tau["statin"], (1.0 - e_bp) / tau["bp_lowering"], s * f_sglt2 + coupling, s + coupling]

    e0 = ls["egfr_ml_min_1_73m2"][0]
    sol = solve_ivp(
        rhs_bio, (0.0, HORIZON), [0.0, 0.0, e0, e0], dense_output=True, rtol=1e-8, atol=1e-8, max_step=1 / 12
    )

    def values(t: float) -> dict[str, float]:
        e_stat, e_bp, egfr, egfr_nat = sol.sol(t)
        ldl = nat("ldl_cholesterol_mg_dl", t) * (1.0 - (1.0 - rho) * e_stat)
        sbp = nat("systolic_bp_mm_hg", t)
        if bp_on:
            sbp -= min(drop, max(sbp - SBP_TREATMENT_FLOOR_MM_HG, 0.0)) * e_bp
        floor = bio["egfr_ml_min_1_73m2"]["floor"]
        return {
            "ldl_cholesterol_mg_dl": max(ldl, bio["ldl_cholesterol_mg_dl"]["floor"]),
            "systolic_bp_mm_hg": max(sbp, bio["systolic_bp_mm_hg"]["floor"]),
            "egfr_ml_min_1_73m2": max(egfr, floor),
            "egfr_natural": max(egfr_nat, floor),
            "hba1c_percent": hba1c(t),
            "bmi_kg_m2": max(nat("bmi_kg_m2", t), bio["bmi_kg_m2"]["floor"]),
        }

    # equation evaluations at the yearly knots (same anchoring as the engine), this draw only
    knots = np.arange(int(HORIZON) + 1, dtype=float)
    table = [values(t) for t in t_eval]

    class _Traj:  # the minimal trajectory view the hazard helpers read
        t_years = month_grid(HORIZON)
        values = {k: np.array([[row[k] for row in table]]) for k in table[0] if k != "egfr_natural"}
        egfr_natural = np.array([[row["egfr_natural"] for row in table]])

    log_ratio = {
        k: prevent_log_ratio(inputs, model.anchors_, _Traj, k)[0][0] for k in ("ascvd", "total_cvd", "heart_failure")
    }
    log_kf = kfre_log_hazard(inputs, _Traj)[0][0]
    base = {k: model.anchors_.hazard_per_decade[k][0] for k in log_ratio}
    share = min(1.0, base["ascvd"] / base["total_cvd"])
    r = draws.ratios
    log_gen = inputs.cad_prs_z * np.log(r["cad_prs_hr_per_sd"][d]) if inputs.cad_prs_z is not None else 0.0
    log_smoke = np.log(r["smoking_cessation_cvd_hr"][d]) if scenario.has("smoking_cessation") is not None else 0.0
    v0 = values(0.0)

    def hazards(t: float) -> np.ndarray:
        v = values(t)
        d_ldl = v["ldl_cholesterol_mg_dl"] - v0["ldl_cholesterol_mg_dl"]
        d_sbp = v["systolic_bp_mm_hg"] - v0["systolic_bp_mm_hg"]
        m_ldl = np.exp(-(d_ldl / MG_DL_PER_MMOL_L_LDL) * np.log(r["ldl_major_vascular_rr_per_mmol_l"][d]) + log_gen)
        m_cvd = np.exp(-(d_sbp / 10) * np.log(r["sbp_major_cvd_rr_per_10_mm_hg"][d]) + log_smoke)
        m_hf = np.exp(-(d_sbp / 10) * np.log(r["sbp_heart_failure_rr_per_10_mm_hg"][d]) + log_smoke)
        p = {k: base[k] * np.exp(np.interp(t, knots, log_ratio[k])) for k in base}
        kf = np.exp(np.interp(t, knots, log_kf)) * (rr_sglt2 if scenario.has("sglt2i") is not None else 1.0)
        return np.array(
            [
                p["ascvd"] * m_ldl * m_cvd,
                p["total_cvd"] * (share * m_ldl + 1 - share) * m_cvd,
                p["heart_failure"] * m_hf,
                kf,
            ]
        )

    def rhs_events(t: float, y: np.ndarray) -> np.ndarray:
        h = hazards(t)
        death = background_death_hazard(inputs, np.array([t]))[0]
        surv = y[:4]
        return np.concatenate([-(h + death) * surv, h * surv, [death * surv[1]]])

    y0 = np.concatenate([np.ones(4), np.zeros(5)])
    ev = solve_ivp(rhs_events, (0.0, HORIZON), y0, t_eval=t_eval, rtol=1e-6, atol=1e-9, max_step=1 / 12)
    out = {k: ev.y[4 + i] for i, k in enumerate(OUTCOMES)}
    out["death"] = ev.y[8]
    return out


def measure(draws_n: int = 1000, reference_draws: int = 40, repeats: int = 30) -> dict:
    """Time the vectorised ensemble and the per-draw solve_ivp reference on the bench patient.

    Returns the timings (ms), the speed-up and the largest CIF difference; ``bench.py`` reuses it.
    """
    inputs = bench_patient()
    model = get_model("fhirtwin-mechanistic").fit(inputs)
    scenario = combinations(candidate_interventions(inputs).eligible)[-1]  # everything eligible
    model.simulate(scenario, HORIZON, draws_n, 1)  # warm caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forecast = model.simulate(scenario, HORIZON, draws_n, 1)
        times.append(time.perf_counter() - t0)
    fast_ms = 1e3 * float(np.median(times))

    draws = draw_parameters(inputs, model.posteriors_, draws_n, 1, HORIZON)
    t_eval = month_grid(HORIZON)
    n_ref = min(reference_draws, draws_n)
    t0 = time.perf_counter()
    ref = [reference_one_draw(model, draws, d, scenario, t_eval) for d in range(n_ref)]
    per_draw = (time.perf_counter() - t0) / n_ref
    slow_ms = 1e3 * per_draw * draws_n
    diffs = {
        outcome: float(np.abs(np.array([r[outcome] for r in ref]) - forecast.cif[outcome][:n_ref]).max())
        for outcome in (*OUTCOMES, "death")
    }
    traj = simulate_trajectories(inputs, model.posteriors_, draws, scenario, t_eval)
    assert traj.values["egfr_ml_min_1_73m2"].shape == (draws_n, t_eval.size)
    return {
        "patient": inputs.patient_id, "scenario": scenario.name, "draws": draws_n, "months": int(12 * HORIZON),
        "outcomes": len(forecast.outcomes), "repeats": repeats, "fast_ms": fast_ms, "fast_min_ms": 1e3 * min(times),
        "reference_draws": n_ref, "reference_ms_per_draw": 1e3 * per_draw, "slow_ms": slow_ms,
        "speedup": slow_ms / fast_ms, "cif_max_abs_diff": diffs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--reference-draws", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    m = measure(args.draws, args.reference_draws, args.repeats)
    print(f"patient: {m['patient']}; scenario: {m['scenario']}")
    print(
        f"vectorised ensemble: {m['draws']} draws x {m['months']} months x {m['outcomes']} outcomes: "
        f"median {m['fast_ms']:.2f} ms per patient (min {m['fast_min_ms']:.2f} ms, {m['repeats']} runs)"
    )
    print(
        f"solve_ivp per draw (RK45): {m['reference_ms_per_draw']:.1f} ms per draw, measured on "
        f"{m['reference_draws']} draws -> {m['slow_ms'] / 1e3:.1f} s for {m['draws']} draws"
    )
    print(f"speed-up: {m['speedup']:,.0f}x")
    for outcome, diff in m["cif_max_abs_diff"].items():
        print(f"  {outcome:15s} max |CIF_vectorised - CIF_solve_ivp| over draws and months = {diff:.2e}")
    worst = max(m['cif_max_abs_diff'].values())
    print(f"largest CIF difference: {worst:.2e} (monthly discrete time vs continuous time)")


if __name__ == "__main__":
    main()
