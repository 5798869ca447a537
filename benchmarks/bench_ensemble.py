"""Benchmark: vectorised ensemble vs integrating each draw separately with scipy's solve_ivp.

Run: ``python benchmarks/bench_ensemble.py [--draws 1000] [--reference-draws 40] [--repeats 30]``

Budget (design): 1,000 draws x 10 years (120 months) x all outcomes <= 20 ms per patient on one core,
and >= 100x faster than the per-draw solve_ivp reference.

The reference integrates the same engine-v2 system for one draw at a time with RK45, in continuous time:

* biomarkers ``x(t) = x0 * exp(E(t) + D(t))`` with the expected log change ``E`` integrated as an ODE
  (dE/dt = expected slope at the attained age / x0), the integrated Ornstein-Uhlenbeck deviation ``D``
  rebuilt at yearly knots from the draw's innovations with its own exact transition (Van Loan's matrix
  exponential, not ``dynamics.iou_knots``) and interpolated linearly between knots, the eGFR/HbA1c
  coupling as an ODE state, and each treatment onset as de/dt = (1 - e) / tau;
* per outcome and competing death, dS/dt = -(h + d) S and dF/dt = h S, with the anchored monthly hazards
  (``Anchors``) multiplied by the draw's deviation and trial effects evaluated at every RK45 stage: LDL-C
  (CTT), SBP (Ettehad, by outcome), the ratio of PREVENT's cumulative hazard at expected path + deviation
  to that on the expected path (its log-odds is additive over eGFR, BMI and HbA1c, so it is rebuilt as
  L0 + sum_v (L_v(x_v) - L0) from the curves tabulated at fit, which equals the equation evaluated with all
  of them moved at once) and KFRE's eGFR term; for smoking cessation a quitter branch is integrated beside
  the continuing smoker and the two are mixed with the draw's quit probability.

It never calls ``hazard_paths``, ``cumulative_incidence`` or ``simulate_trajectories``. It is timed on
``--reference-draws`` draws and the per-draw time is scaled to the full ensemble (it is linear in draws).
Both use the same parameter draws, so their CIFs and trajectories are compared too (continuous time vs
monthly discrete time: differences around 1e-3 are expected).

Not a test: never collected by pytest, and nothing here asserts on wall time.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from bisect import bisect_right

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy.integrate import solve_ivp  # noqa: E402
from scipy.linalg import expm  # noqa: E402

from fhirtwin.sim import PatientInputs, get_model  # noqa: E402
from fhirtwin.sim._params import dynamics_parameters, intervention_parameters  # noqa: E402
from fhirtwin.sim.course import (  # noqa: E402
    EXPECTED_FLOOR_FRACTION,
    current_value,
    deviation_parameters,
    expected_slope,
)
from fhirtwin.sim.dynamics import (  # noqa: E402
    SBP_TREATMENT_FLOOR_MM_HG,
    TRAJECTORY_VARIABLES,
    month_grid,
    simulate_trajectories,
)
from fhirtwin.sim.ensemble import ParameterDraws, draw_parameters  # noqa: E402
from fhirtwin.sim.equations import prevent_risk  # noqa: E402
from fhirtwin.sim.hazards import (  # noqa: E402
    CVD_OUTCOMES,
    MG_DL_PER_MMOL_L_LDL,
    PREVENT_AGE_RANGE,
    coronary_share,
    kfre_log_cum_hazard,
    prevent_kwargs,
)
from fhirtwin.sim.interventions import candidate_interventions, combinations  # noqa: E402

HORIZON = 10.0
OUTCOMES = ("ascvd", "total_cvd", "heart_failure", "kidney_failure")
EGFR = "egfr_ml_min_1_73m2"
HBA1C = "hba1c_percent"
RTOL, ATOL = 1e-6, 1e-9  # RK45 tolerances of the reference (max step one month: one hazard jump per step)


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


def iou_transition(alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """One-year transition of (slope deviation W, integrated deviation D) of an integrated OU process.

    dW = -alpha W dt + sigma dB, dD = W dt. Van Loan (IEEE TAC 1978;23:395): the matrix exponential of
    [[-A, G G'], [0, A']] gives the transition matrix Phi and the innovation covariance Q; returns
    (Phi, lower Cholesky factor of Q), so X(k+1) = Phi X(k) + L z(k) with z ~ N(0, I).
    """
    a = np.array([[-alpha, 0.0], [1.0, 0.0]])
    gg = np.array([[sigma**2, 0.0], [0.0, 0.0]])
    block = expm(np.block([[-a, gg], [np.zeros((2, 2)), a.T]]))
    phi = block[2:, 2:].T
    q = phi @ block[:2, 2:]
    return phi, np.linalg.cholesky(0.5 * (q + q.T))


def deviation_knots(w0: float, z: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """D at yearly knots 0..years for one draw (D(0) = 0, W(0) = w0), innovations z (years, 2)."""
    phi, chol = iou_transition(alpha, sigma)
    x = np.array([w0, 0.0])
    out = [0.0]
    for k in range(z.shape[0]):
        x = phi @ x + chol @ z[k]
        out.append(float(x[1]))
    return np.asarray(out)


def _lerp(x: float, grid: list[float], table: np.ndarray) -> np.ndarray:
    """Columns of ``table`` (rows, len(grid)) interpolated linearly at x, constant beyond the ends (np.interp)."""
    n = len(grid)
    k = min(max(bisect_right(grid, x) - 1, 0), n - 2)
    w = min(max((x - grid[k]) / (grid[k + 1] - grid[k]), 0.0), 1.0)
    out: np.ndarray = table[:, k] + w * (table[:, k + 1] - table[:, k])
    return out


def _on_union_grid(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[float], np.ndarray]:
    """Piecewise-linear curves rewritten on the union of their knots (exact), stacked as rows."""
    grid = np.unique(np.concatenate([g for g, _ in curves]))
    return grid.tolist(), np.array([np.interp(grid, g, y) for g, y in curves])


def reference_one_draw(model, draws: ParameterDraws, d: int, scenario, t_eval: np.ndarray) -> dict[str, np.ndarray]:
    """Integrate draw ``d`` of the engine-v2 system with RK45: biomarker, onset and incidence ODEs together.

    Returns the CIFs (``OUTCOMES`` and ``death``) at ``t_eval`` and, under ``trajectories``, the biomarker
    values there.
    """
    inputs, anchors, posteriors = model.inputs_, model.anchors_, model.posteriors_
    params = dynamics_parameters()
    tau = params["treatment_onset_time_constant_years"]
    gamma = float(params["egfr_slope_per_hba1c_percent"]["value"])
    r = {name: float(v[d]) for name, v in draws.ratios.items()}
    months = t_eval.size - 1
    years = draws.years

    # --- biomarkers: measured x0, the draw's level, expected slopes (per x0) and deviation knots
    variables = [v for v in TRAJECTORY_VARIABLES if v in draws.level_slope and current_value(inputs, v) is not None]
    index = {v: i for i, v in enumerate(variables)}
    nv = len(variables)
    x0 = np.array([float(current_value(inputs, v) or 0.0) for v in variables])
    level = np.array([float(draws.level_slope[v][d, 0]) for v in variables])
    slope_curves = []
    knots = np.empty((nv, years + 1))
    for i, v in enumerate(variables):
        # expected_slope is piecewise linear in age between its table's ages: tabulating it there is exact
        ages = np.asarray(params["biomarkers"][v]["expected_slope_per_year"]["by_age"], dtype=float)[:, 0]
        slope_curves.append((ages, np.asarray(expected_slope(inputs, v, ages), dtype=float) / x0[i]))
        sd, alpha = deviation_parameters(inputs, v)
        w0 = (float(draws.level_slope[v][d, 1]) - float(expected_slope(inputs, v, inputs.age_years))) / x0[i]
        knots[i] = deviation_knots(w0, draws.innovations[v][d], alpha, math.sqrt(2 * alpha) * sd / x0[i])
    slope_grid, slope_table = _on_union_grid(slope_curves)
    i_ldl, i_sbp = index["ldl_cholesterol_mg_dl"], index["systolic_bp_mm_hg"]
    i_egfr, i_hba1c = index[EGFR], index.get(HBA1C)

    # --- treatments: the scenario's new drugs and any regimen started after the last measurement
    r_cur = 0.0
    if inputs.on_statin:
        r_cur = float(draws.ldl_lowering.get(inputs.statin_intensity or "moderate", draws.ldl_lowering["moderate"])[d])
    pend_ldl = posteriors["ldl_cholesterol_mg_dl"].pending_regimen_start
    pend_sbp = posteriors["systolic_bp_mm_hg"].pending_regimen_start
    statin = scenario.has("statin")
    rho = 1.0
    if statin is not None:
        r_new = float(draws.ldl_lowering[statin.intensity][d])
        rho = (1.0 - max(r_new, r_cur)) / (1.0 - r_cur)
    other_lipid = [float(draws.ldl_lowering[k][d]) for k in ("ezetimibe", "pcsk9_inhibitor") if scenario.has(k)]
    bp_new = scenario.has("bp_lowering") is not None
    drop = float(draws.sbp_drop_mm_hg[d])
    sglt2 = scenario.has("sglt2i") is not None
    cessation = scenario.has("smoking_cessation") is not None and inputs.current_smoker
    # onset states: (time constant, start time or None when absent)
    onsets = ((tau["statin"], 0.0), (tau["bp_lowering"], 0.0),
              (tau["statin"], pend_ldl), (tau["bp_lowering"], pend_sbp))

    # --- hazard ingredients: anchors per month; deviation and trial effects evaluated at t
    share = coronary_share()
    log_coronary = math.log(r["cad_prs_hr_per_sd"]) * inputs.cad_prs_z if inputs.cad_prs_z is not None else 0.0
    if inputs.fh_variant:
        log_coronary += math.log(r["fh_variant_cad_or_at_same_ldl"])
    coronary = math.exp(log_coronary)
    log_ldl_rr = (math.log(r["ldl_major_vascular_rr_per_mmol_l_year1"]),  # first year, then later years
                  math.log(r["ldl_major_vascular_rr_per_mmol_l"]))
    log_sbp = np.log([r[f"sbp_{k}_rr_per_10_mm_hg"] for k in ("coronary", "stroke", "heart_failure")])
    hf_trial = r["sglt2i_heart_failure_rr"] if sglt2 else 1.0
    kidney_trial = r["sglt2i_kidney_progression_rr"] if sglt2 else 1.0
    h_cvd = np.array([anchors.cvd[o][:months] for o in CVD_OUTCOMES])
    ascvd_share = h_cvd[0] / np.maximum(h_cvd[0] + h_cvd[2], 1e-12)
    h_kidney = anchors.kidney[min(int(draws.uacr_quantile[d]), anchors.kidney.shape[0] - 1), :months]
    death_non_cvd, death_all = anchors.death_non_cvd[:months], anchors.death_all[:months]
    # KFRE's eGFR coefficient (its log cumulative hazard is linear in eGFR): a central difference is exact
    uacr_any = inputs.uacr_mg_g if inputs.uacr_mg_g is not None else 30.0
    e0 = inputs.egfr_ml_min_1_73m2
    kfre_beta = float(kfre_log_cum_hazard(inputs, 5, e0 + 0.5, uacr_any)
                      - kfre_log_cum_hazard(inputs, 5, e0 - 0.5, uacr_any))
    # PREVENT's 10-year log-odds L0 at the measured baseline and its curves along each moving input (the others
    # at baseline). The log-odds is additive over eGFR, BMI and HbA1c: L(x) = L0 + sum_v (L_v(x_v) - L0). A
    # row of L0 stands for an outcome the input does not move.
    age = float(np.clip(inputs.age_years, *PREVENT_AGE_RANGE))
    kw = prevent_kwargs(inputs, anchors.prevent_model)
    risk0 = np.array([float(prevent_risk(outcome=o, horizon_years=10, age_years=age, clip=True, **kw))
                      for o in CVD_OUTCOMES])
    logit0 = np.log(risk0) - np.log1p(-risk0)
    moving = []
    for v in dict.fromkeys(v for o in CVD_OUTCOMES for v in anchors.logit[o]):
        rows = [anchors.logit[o].get(v, (np.array([0.0, 1.0]), np.full(2, logit0[k])))
                for k, o in enumerate(CVD_OUTCOMES)]
        grid, table = _on_union_grid(rows)
        moving.append((index[v], grid, table - logit0[:, None]))
    quit_spec = intervention_parameters()["smoking_cessation_time_course"]
    early, full = float(quit_spec["early_years"]), float(quit_spec["years_to_never_smoker"])
    log_quit_hr = math.log(r["smoking_cessation_cvd_hr"])
    log_never = np.log(np.array([anchors.never_smoker_ratio[o][:months] for o in CVD_OUTCOMES]))
    q = float(draws.quit_probability[d])

    # --- state: E per biomarker, eGFR coupling (log units), 4 onsets, then per branch (continuing smoker,
    # sustained quitter) S and F of the 3 CVD outcomes and non-CVD death before a first CVD event, then
    # kidney failure's S and F
    i_c, i_on, i_ev = nv, nv + 1, nv + 5
    branches = 2 if cessation else 1
    block = 7
    i_kid = i_ev + branches * block

    def expected_log(y: np.ndarray) -> np.ndarray:
        """E(t) from the integrated relative slope: the expected course is linear in the value."""
        out: np.ndarray = np.log(np.maximum(1.0 + y[:nv], EXPECTED_FLOOR_FRACTION))
        return out

    def biomarkers(t: float, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """(values under the scenario, the draw's expected path, natural eGFR) at time t."""
        k = min(int(t), years - 1)
        e = expected_log(y)
        log_nat = e + knots[:, k] + (knots[:, k + 1] - knots[:, k]) * (t - k)
        log_nat[i_egfr] += y[i_c]
        values = level * np.exp(log_nat)
        expected = level * np.exp(e)
        on_new_ldl, on_new_bp, on_pend_ldl, on_pend_bp = y[i_on : i_on + 4]
        ldl = values[i_ldl]
        if pend_ldl is not None:
            ldl *= 1.0 - r_cur * on_pend_ldl
        ldl *= 1.0 - (1.0 - rho) * on_new_ldl
        for lowering in other_lipid:
            ldl *= 1.0 - lowering * on_new_ldl
        values[i_ldl] = ldl
        sbp = values[i_sbp]
        if pend_sbp is not None:
            sbp -= min(drop, max(sbp - SBP_TREATMENT_FLOOR_MM_HG, 0.0)) * on_pend_bp
        if bp_new:
            sbp -= min(drop, max(sbp - SBP_TREATMENT_FLOOR_MM_HG, 0.0)) * on_new_bp
        values[i_sbp] = sbp
        natural_egfr = float(values[i_egfr])
        if sglt2:  # displayed course: the whole log change scaled by the trial RR (as the engine displays it)
            values[i_egfr] = level[i_egfr] * math.exp(log_nat[i_egfr] * kidney_trial)
        return values, expected, natural_egfr

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        dy = np.zeros_like(y)
        dy[:nv] = _lerp(inputs.age_years + t, slope_grid, slope_table)
        values, expected, natural_egfr = biomarkers(t, y)
        if i_hba1c is not None:
            dy[i_c] = gamma * (values[i_hba1c] - expected[i_hba1c]) / level[i_egfr]
        for j, (time_constant, start) in enumerate(onsets):
            if start is not None and t >= start:
                dy[i_on + j] = (1.0 - y[i_on + j]) / time_constant

        # hazards: anchored monthly value x deviation and trial effects at t
        deviation = values - expected
        month = min(int(t * 12.0), months - 1)
        m_ldl = math.exp(-deviation[i_ldl] / MG_DL_PER_MMOL_L_LDL * log_ldl_rr[0 if t < 1.0 else 1])
        coronary_rr, stroke_rr, hf_rr = np.exp(-deviation[i_sbp] / 10.0 * log_sbp)
        m_ascvd = m_ldl * (share * coronary * coronary_rr + (1.0 - share) * stroke_rr)
        m_hf = hf_rr * hf_trial
        a = ascvd_share[month]
        at_path = logit0.copy()
        at_dev = logit0.copy()
        for i, grid, table in moving:
            path = x0[i] * max(1.0 + y[i], EXPECTED_FLOOR_FRACTION)  # the measured value on the expected course
            # eGFR enters PREVENT on its natural course: the SGLT2 inhibitor's trial effects already include it
            moved = natural_egfr - expected[i] if i == i_egfr else deviation[i]
            at_path += _lerp(path, grid, table)
            at_dev += _lerp(path + moved, grid, table)
        prevent_ratio = np.logaddexp(0.0, at_dev) / np.logaddexp(0.0, at_path)
        h = h_cvd[:, month] * np.array([m_ascvd, a * m_ascvd + (1.0 - a) * m_hf, m_hf]) * prevent_ratio

        d_non = death_non_cvd[month]
        for b in range(branches):
            hb = h
            if b == 1:  # sustained quitter: Duncan's HR, waning to the never-smoker ratio, never below it
                late = min(max((t - early) / (full - early), 0.0), 1.0)
                floor = log_never[:, month]
                hb = h * np.exp(np.maximum(log_quit_hr + (floor - log_quit_hr) * late, floor))
            base = i_ev + b * block
            s = y[base : base + 3]
            dy[base : base + 3] = -(hb + d_non) * s
            dy[base + 3 : base + 6] = hb * s
            dy[base + 6] = d_non * s[1]
        hk = h_kidney[month] * math.exp(kfre_beta * (natural_egfr - expected[i_egfr])) * kidney_trial
        dy[i_kid] = -(hk + death_all[month]) * y[i_kid]
        dy[i_kid + 1] = hk * y[i_kid]
        return dy

    y0 = np.zeros(i_kid + 2)
    for j, (time_constant, start) in enumerate(onsets):
        if start is not None and start < 0.0:
            y0[i_on + j] = 1.0 - math.exp(start / time_constant)
    for b in range(branches):
        y0[i_ev + b * block : i_ev + b * block + 3] = 1.0
    y0[i_kid] = 1.0
    sol = solve_ivp(rhs, (0.0, float(t_eval[-1])), y0, method="RK45", t_eval=t_eval, rtol=RTOL, atol=ATOL,
                    max_step=1.0 / 12.0)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed on draw {d}: {sol.message}")
    y = sol.y

    def mixed(offset: int) -> np.ndarray:
        continuing: np.ndarray = y[i_ev + offset]
        return q * y[i_ev + block + offset] + (1.0 - q) * continuing if cessation else continuing

    out = {o: mixed(3 + k) for k, o in enumerate(CVD_OUTCOMES)}
    out["kidney_failure"] = y[i_kid + 1]
    out["death"] = mixed(6)
    values = np.array([biomarkers(float(t), y[:, k])[0] for k, t in enumerate(t_eval)])
    out["trajectories"] = {v: values[:, i] for i, v in enumerate(variables)}
    return out


def measure(draws_n: int = 1000, reference_draws: int = 40, repeats: int = 30) -> dict:
    """Time the vectorised ensemble and the per-draw solve_ivp reference on the bench patient.

    Returns the timings (ms: wall clock, and the process's CPU time, which a loaded machine inflates less),
    the speed-up (wall clock), the largest CIF difference per outcome and the largest relative trajectory
    difference per biomarker; ``bench.py`` reuses it.
    """
    inputs = bench_patient()
    model = get_model("fhirtwin-mechanistic").fit(inputs)
    scenario = combinations(candidate_interventions(inputs).eligible)[-1]  # everything eligible
    seed = 1
    model.simulate(scenario, HORIZON, draws_n, seed)  # warm caches
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        forecast = model.simulate(scenario, HORIZON, draws_n, seed)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    fast_ms = 1e3 * float(np.median(times))

    # the same draws the forecast used (same seed, same number of UACR quantiles)
    draws = draw_parameters(inputs, model.posteriors_, draws_n, seed, HORIZON,
                            uacr_quantiles=model.anchors_.kidney.shape[0])
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
    traj_diffs = {
        v: float(np.abs(np.array([r["trajectories"][v] for r in ref]) / traj.values[v][:n_ref] - 1.0).max())
        for v in ref[0]["trajectories"]
    }
    return {
        "patient": inputs.patient_id, "scenario": scenario.name, "draws": draws_n, "months": int(12 * HORIZON),
        "outcomes": len(forecast.outcomes), "repeats": repeats, "fast_ms": fast_ms, "fast_min_ms": 1e3 * min(times),
        "fast_cpu_ms": 1e3 * float(np.median(cpu_times)),
        "reference_draws": n_ref, "reference_ms_per_draw": 1e3 * per_draw, "slow_ms": slow_ms,
        "speedup": slow_ms / fast_ms, "cif_max_abs_diff": diffs, "trajectory_max_rel_diff": traj_diffs,
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
        f"median {m['fast_ms']:.2f} ms per patient (min {m['fast_min_ms']:.2f} ms, {m['repeats']} runs; "
        f"median CPU time {m['fast_cpu_ms']:.2f} ms)"
    )
    print(
        f"solve_ivp per draw (RK45): {m['reference_ms_per_draw']:.1f} ms per draw, measured on "
        f"{m['reference_draws']} draws -> {m['slow_ms'] / 1e3:.1f} s for {m['draws']} draws"
    )
    print(f"speed-up: {m['speedup']:,.0f}x")
    for variable, diff in m["trajectory_max_rel_diff"].items():
        print(f"  {variable:24s} max |x_vectorised / x_solve_ivp - 1| = {diff:.2e}")
    for outcome, diff in m["cif_max_abs_diff"].items():
        print(f"  {outcome:15s} max |CIF_vectorised - CIF_solve_ivp| over draws and months = {diff:.2e}")
    worst = max(m["cif_max_abs_diff"].values())
    print(f"largest CIF difference: {worst:.2e} (monthly discrete vs continuous time alone accounts for ~1e-3 or less)")


if __name__ == "__main__":
    main()
