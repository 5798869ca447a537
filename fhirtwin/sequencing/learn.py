"""A sequencing policy learned across patients: a learned model of the decision process, solved exactly.

Why: the exact solution needs the engine run once per therapy set for the patient (the ensemble), while a
policy that reads only the patient's recorded values, published risks and eligibility answers at once,
for any patient, and can be checked against the exact optimum of patients it never saw.

Method (model-based): scikit-learn histogram gradient-boosting regressors, fitted on the training
patients' exact processes, predict from a patient's features the draw-averaged yearly quantities of the
decision process (:class:`ProcessModel`): under current care the log weighted events and the log exit
probability per year, and for every other (year, therapy set, previous statin level, smoking state) their
log ratios to current care. Each is learned as a correction to what published equations imply
(:func:`_published_rates`, :func:`_statin_log_rr`): the yearly rate from PREVENT and KFRE, a CVD
therapy's effect diluted by the kidney share of that rate, and CTT's ratio for the statin's mid-band LDL-C
lowering; so the model extrapolates in proportion to patients at the edge of the training set (eGFR < 30,
very high LDL-C). With the patient's known costs (harms, burden, monitoring, quit attempts: deterministic
given the options, no engine run) this assembles a predicted process, which is solved exactly by backward
induction, within the policies that never lower a therapy they started (:func:`never_lowering`; the exact
optima almost never do). The policy is therefore consistent: it does not switch back and forth
(regressing Q* advantages directly and acting greedily did, paying monitoring and first-year harms each
time; see docs/sequencing.md). It never sees a held-out patient's process: only its
features, its options, its costs and the indexing of its state space.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]

from fhirtwin.sequencing.mdp import FORBIDDEN, FiniteMDP, solve
from fhirtwin.sequencing.process import STATIN_ORDER, Options, TherapyProcess
from fhirtwin.sim._params import intervention_parameters
from fhirtwin.sim.hazards import MG_DL_PER_MMOL_L_LDL
from fhirtwin.sim.inputs import PatientInputs

HISTORIES = ("ldl_cholesterol_mg_dl", "systolic_bp_mm_hg", "egfr_ml_min_1_73m2", "hba1c_percent", "bmi_kg_m2")
PATIENT_FEATURES = (
    "age_years", "male", "systolic_bp_mm_hg", "ldl_cholesterol_mg_dl", "hdl_cholesterol_mg_dl",
    "total_cholesterol_mg_dl", "egfr_ml_min_1_73m2", "bmi_kg_m2", "diabetes", "current_smoker", "on_statin",
    "current_statin_level", "on_bp_treatment", "log_uacr_mg_g", "hba1c_percent", "prevent_10y_ascvd",
    "prevent_10y_total_cvd", "prevent_10y_heart_failure", "kfre_5y", "moderate_statin_allowed",
    "high_statin_allowed", "bp_eligible", "sglt2i_eligible",
    *(f"{name}_{kind}" for name in HISTORIES for kind in ("slope_5y", "mean_5y")),
    "pm25_ug_m3", "exercise_min_per_week", "cad_prs_z", "fh_variant", "apol1_risk_alleles", "on_sglt2i", "race",
    "weight_kg", "statin_start_years", "bp_treatment_start_years", "hypertension", "ckd", "slco1b1_function",
    "high_statin_dose_mg", "moderate_statin_dose_mg", "high_statin_agent", "kidney_share", "log_kfre_5y",
    "log_prevent_10y_total_cvd",
)
#: Features of one (year, therapy set, previous statin level, smoking state) of the process model.
PROCESS_FEATURES = ("year", "statin_level", "bp_drugs", "sglt2i", "statin_levels_started", "quit", "years_since_quit",
                    "statin_published_log_rr")
#: Rewards are reported in events per 1,000 (the scale the plan reports; the environment uses it).
SCALE = 1000.0
_RACE = {None: 0.0, "white": 1.0, "african_american": 2.0}
_SLCO1B1 = {"normal_function": 0.0, "decreased_function": 1.0, "poor_function": 2.0}
_AGENT = {"atorvastatin": 0.0, "rosuvastatin": 1.0}


def _optional(value: float | bool | None) -> float:
    return math.nan if value is None else float(value)


def _history(series: np.ndarray, years: float = 5.0) -> tuple[float, float]:
    """(slope per year, mean) of a recorded (time, value) history over its last ``years`` (NaN if too short)."""
    series = np.asarray(series, dtype=float)
    if series.ndim != 2 or series.shape[0] < 2:
        return math.nan, math.nan
    t, v = series[:, 0], series[:, 1]
    recent = t >= t.max() - years
    if recent.sum() < 2:
        recent = np.ones_like(t, dtype=bool)
    if np.ptp(t[recent]) <= 0:
        return math.nan, float(np.mean(v[recent]))
    return float(np.polyfit(t[recent], v[recent], 1)[0]), float(np.mean(v[recent]))


def patient_features(inputs: PatientInputs, published: dict[str, float], options: Options) -> np.ndarray:
    """The features of a patient: recorded values and histories, published risks, eligibility and the chosen
    statin (NaN when unmeasured); named by ``PATIENT_FEATURES``."""
    level = {None: 0, "low": 1, "moderate": 1, "high": 2}
    high, moderate = options.statins.get("high"), options.statins.get("moderate")
    kfre, cvd = published.get("kfre_5y", math.nan), published["prevent_10y_total_cvd"]
    values = [
        inputs.age_years, float(inputs.sex == "male"), inputs.systolic_bp_mm_hg, inputs.ldl_cholesterol_mg_dl,
        inputs.hdl_cholesterol_mg_dl, inputs.total_cholesterol_mg_dl, inputs.egfr_ml_min_1_73m2, inputs.bmi_kg_m2,
        float(inputs.diabetes), float(inputs.current_smoker), float(inputs.on_statin),
        float(level.get(inputs.statin_intensity if inputs.on_statin else None, 1)), float(inputs.on_bp_treatment),
        math.log(inputs.uacr_mg_g) if inputs.uacr_mg_g else math.nan,
        inputs.hba1c_percent if inputs.hba1c_percent is not None else math.nan,
        published["prevent_10y_ascvd"], cvd, published["prevent_10y_heart_failure"],
        kfre, float("moderate" in options.statins), float("high" in options.statins),
        float(options.bp is not None), float(options.sglt2i is not None),
    ]
    for name in HISTORIES:
        values.extend(_history(getattr(inputs, f"history_{name}")))
    values += [
        _optional(inputs.pm25_ug_m3), _optional(inputs.exercise_min_per_week), _optional(inputs.cad_prs_z),
        _optional(inputs.fh_variant), _optional(inputs.apol1_risk_alleles), float(inputs.on_sglt2i),
        _RACE.get(inputs.race, 3.0), _optional(inputs.weight_kg), _optional(inputs.statin_start_years),
        _optional(inputs.bp_treatment_start_years), float(inputs.hypertension), float(inputs.ckd),
        math.nan if inputs.slco1b1_phenotype is None else _SLCO1B1.get(inputs.slco1b1_phenotype, 3.0),
        _optional(high.dose_mg) if high else math.nan, _optional(moderate.dose_mg) if moderate else math.nan,
        _AGENT.get(high.agent or "", 2.0) if high else math.nan,
        kfre / (kfre + cvd / 2), math.log(kfre) if kfre > 0 else math.nan, math.log(cvd) if cvd > 0 else math.nan,
    ]
    return np.array(values, dtype=float)


def _features(process: TherapyProcess) -> np.ndarray:
    return patient_features(process.inputs, process.published, process.options)


def _fit(features: np.ndarray, target: np.ndarray, *, max_iter: int, leaves: int,
         seed: int) -> HistGradientBoostingRegressor:
    """Histogram gradient boosting; a feature missing for every training row is fitted as a constant, which
    is never split on (scikit-learn cannot bin an all-missing column)."""
    features = np.where(np.all(np.isnan(features), axis=0), 0.0, features)
    regressor = HistGradientBoostingRegressor(max_iter=max_iter, learning_rate=0.1, max_leaf_nodes=leaves,
                                              min_samples_leaf=20, random_state=seed)
    return regressor.fit(features, target)


# ------------------------------------------------------------------------------------------------
# layer 1: a model of the process


def _published_rates(process: TherapyProcess) -> tuple[float, float]:
    """(log yearly rate of a first major event, share of it that is cardiovascular) implied by the published
    risks: PREVENT total CVD over 10 years and KFRE kidney failure over 5 (where measured).

    The regressors learn corrections to these, so they extrapolate in proportion to patients at the edge of
    the training set (e.g. eGFR < 30, where kidney failure dominates and a CVD therapy's effect on the
    first major event is diluted by the kidney share)."""
    cvd = -math.log1p(-min(process.published["prevent_10y_total_cvd"], 0.999)) / 10.0
    kfre = process.published.get("kfre_5y", 0.0)
    kidney = 0.0 if not math.isfinite(kfre) else -math.log1p(-min(kfre, 0.999)) / 5.0
    return math.log(cvd + kidney + 1e-6), max(cvd / (cvd + kidney), 0.02) if cvd + kidney > 0 else 1.0


def _statin_log_rr(process: TherapyProcess, level: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Published log rate ratio of total CVD for a statin level over current care (``first``: levels started
    this year, which get the first-year ratio): CTT's ratio per mmol/L of the guideline's mid-band LDL-C
    lowering from the recorded LDL-C, on the ASCVD share of PREVENT's total CVD. Zero for level 0."""
    params = intervention_parameters()
    band = params["ldl_lowering_fraction"]
    ratios = params["ratios"]
    inputs = process.inputs
    now = float(np.mean(band[inputs.statin_intensity])) if inputs.on_statin and inputs.statin_intensity in band else 0.0
    fraction = np.array([now, *(float(np.mean(band[i])) for i in STATIN_ORDER[1:])])
    untreated = inputs.ldl_cholesterol_mg_dl / (1.0 - now) / MG_DL_PER_MMOL_L_LDL
    full = math.log(ratios["ldl_major_vascular_rr_per_mmol_l"]["value"])
    year1 = math.log(ratios["ldl_major_vascular_rr_per_mmol_l_year1"]["value"])
    ascvd = min(process.published["prevent_10y_ascvd"] / process.published["prevent_10y_total_cvd"], 1.0)
    drop = untreated * np.maximum(fraction[level] - now, 0.0)
    started = untreated * np.maximum(fraction[level] - fraction[level - first], 0.0)
    out: np.ndarray = ascvd * (full * drop - (full - year1) * started)
    return out


@dataclass(frozen=True)
class _Rows:
    """Every (year, set, previous statin level, smoking state) of the process arrays, with its features."""

    index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
    features: np.ndarray
    base: np.ndarray  # current care
    reachable: np.ndarray  # "quit in year k" only from year k
    sglt2i: np.ndarray  # the set has an SGLT2 inhibitor
    without_sglt2i: np.ndarray  # index of the same set without it
    statin: np.ndarray  # published log rate ratio of the set's statin (:func:`_statin_log_rr`)


def _process_rows(process: TherapyProcess) -> _Rows:
    years, n_sets, n_levels, n_sig = process.stay.shape[1:]
    y, j, lprev, sig = (g.ravel() for g in np.meshgrid(np.arange(years), np.arange(n_sets), np.arange(n_levels),
                                                       np.arange(n_sig), indexing="ij"))
    sets = process.sets
    level = np.array([t.statin_level for t in sets])[j]
    sglt2i = np.array([t.sglt2i for t in sets])
    first = np.maximum(level - lprev, 0)
    statin = _statin_log_rr(process, level, first)
    rows = np.column_stack([
        y, level, np.array([t.bp_drugs for t in sets])[j], sglt2i[j].astype(float), first, (sig > 0),
        np.where(sig > 0, y - (sig - 1), -1), statin,
    ]).astype(float)
    patient = _features(process)
    features = np.column_stack([np.broadcast_to(patient, (y.size, patient.size)), rows])
    plain = np.array([sets.index(dataclasses.replace(t, sglt2i=False)) for t in sets])
    return _Rows((y, j, lprev, sig), features, (j == 0) & (lprev == 0) & (sig == 0), sig <= y, sglt2i[j], plain[j],
                 statin)


@dataclass(frozen=True, eq=False)
class ProcessModel:
    """Regressors of a patient's draw-averaged yearly process quantities, and the mean quit probability.

    Under current care: log weighted events and log exit probability per year, minus the published log rate.
    Other sets without an SGLT2 inhibitor (and the smoking states): log ratio to current care divided by the
    published CVD share, minus the statin's published log rate ratio. An SGLT2 inhibitor: log ratio to the
    same set without it.
    """

    base: tuple[HistGradientBoostingRegressor, HistGradientBoostingRegressor]
    cvd: tuple[HistGradientBoostingRegressor, HistGradientBoostingRegressor]
    sglt2i: tuple[HistGradientBoostingRegressor, HistGradientBoostingRegressor] | None
    quit_probability: float

    def predict(self, process: TherapyProcess) -> TherapyProcess:
        """The predicted process of a patient: the learned yearly quantities with the patient's known costs.

        Only the features, options, costs and shape of ``process`` are read, never its engine quantities.
        """
        rows = _process_rows(process)
        shape = process.stay.shape[1:]
        log_rate, share = _published_rates(process)
        out = []
        for k in range(2):  # events, exit
            log_ratio = share * (self.cvd[k].predict(rows.features) + rows.statin)
            log_ratio[rows.base] = 0.0
            if self.sglt2i is not None and rows.sglt2i.any():
                y, _, lprev, sig = rows.index
                plain = np.ravel_multi_index((y, rows.without_sglt2i, lprev, sig), shape)
                log_ratio = np.where(rows.sglt2i, log_ratio[plain] + self.sglt2i[k].predict(rows.features), log_ratio)
            out.append(np.exp(log_rate + self.base[k].predict(rows.features) + log_ratio).reshape((1, *shape)))
        stay = 1.0 - np.clip(out[1], 0.0, 1.0)
        return dataclasses.replace(process, stay=stay, events=np.minimum(out[0], 1.0 - stay),
                                   quit_probability=np.array([self.quit_probability]), draws=1)


def fit_process_model(processes: list[TherapyProcess], *, seed: int = 0, max_iter: int = 300) -> ProcessModel:
    """Fit the process model on the training patients' draw-averaged processes."""
    x: dict[str, list[np.ndarray]] = {"base": [], "cvd": [], "sglt2i": []}
    t: dict[str, list[np.ndarray]] = {f"{k}{n}": [] for k in x for n in range(2)}
    for process in processes:
        quantities = (process.events.mean(axis=0), 1.0 - process.stay.mean(axis=0))  # events, exit
        rows = _process_rows(process)
        y, j, lprev, sig = rows.index
        log_rate, share = _published_rates(process)
        groups = {"base": rows.base, "cvd": rows.reachable & ~rows.base & ~rows.sglt2i,
                  "sglt2i": rows.reachable & rows.sglt2i}
        for name, mask in groups.items():
            x[name].append(rows.features[mask])
        for n, q in enumerate(quantities):
            log_q = np.log(q)
            here = log_q[y, j, lprev, sig]
            t[f"base{n}"].append(here[groups["base"]] - log_rate)
            m = groups["cvd"]
            t[f"cvd{n}"].append((here[m] - log_q[y[m], 0, 0, 0]) / share - rows.statin[m])
            m = groups["sglt2i"]
            t[f"sglt2i{n}"].append(here[m] - log_q[y[m], rows.without_sglt2i[m], lprev[m], sig[m]])

    def fit(name: str, n: int) -> HistGradientBoostingRegressor:
        return _fit(np.vstack(x[name]), np.concatenate(t[f"{name}{n}"]), max_iter=max_iter, leaves=31, seed=seed)

    quit = float(np.mean([np.mean(p.quit_probability) for p in processes]))
    sglt2i = (fit("sglt2i", 0), fit("sglt2i", 1)) if sum(a.shape[0] for a in x["sglt2i"]) else None
    return ProcessModel((fit("base", 0), fit("base", 1)), (fit("cvd", 0), fit("cvd", 1)), sglt2i, quit)


def never_lowering(process: TherapyProcess, mdp: FiniteMDP) -> FiniteMDP:
    """The process restricted to actions that never lower a therapy the plan controls (no stopping or stepping
    down what was started): the class the learned policy is solved in."""
    levels = np.array([[t.statin_level, t.bp_drugs, t.sglt2i] for t in process.sets])
    before = levels[np.arange(process.n_states) // process.smoking_states]
    after = levels[np.arange(process.n_actions) // process.attempts]
    lowers = np.any(after[None, :, :] < before[:, None, :], axis=-1)
    return FiniteMDP(np.where(lowers[None], FORBIDDEN, mdp.reward), mdp.successor, mdp.probability)


@dataclass(frozen=True, eq=False)
class LearnedPolicy:
    """The learned process model; :meth:`policy` solves a patient's predicted process exactly, never lowering a
    therapy it started (the exact optima of the benchmark cohorts stop something on 1 of 829 optimal paths)."""

    model: ProcessModel

    def policy(self, process: TherapyProcess) -> np.ndarray:
        """(years, states) action table from the patient's features, options and known costs only (the process
        gives the indexing and the costs, never its engine quantities)."""
        table: np.ndarray = solve(never_lowering(process, self.model.predict(process).mdp())).policy
        return table


def fit_policy(processes: list[TherapyProcess], *, seed: int = 0, max_iter: int = 300) -> LearnedPolicy:
    """Fit the process model on the training patients' draw-averaged processes."""
    if not processes:
        raise ValueError("fit_policy needs at least one training patient")
    return LearnedPolicy(fit_process_model(processes, seed=seed, max_iter=max_iter))
