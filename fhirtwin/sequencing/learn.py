"""A sequencing policy learned across patients: a learned model of the process, solved exactly, corrected.

Why: the exact solution needs the engine run once per therapy set for the patient (the ensemble), while a
policy that reads only the patient's recorded values, published risks and eligibility answers at once,
for any patient, and can be checked against the exact optimum of patients it never saw.

Method, in two layers, both fitted on the training patients' exact processes:

1. A model of the process (:class:`ProcessModel`). Four scikit-learn histogram gradient-boosting
   regressors predict, from the patient's features, the draw-averaged yearly quantities of the decision
   process: under current care the log weighted events and the log exit probability per year, and for
   every other (year, therapy set, previous statin level, smoking state) their log ratios to current
   care. With the patient's known costs (harms, burden, monitoring: deterministic given the options, no
   engine run) this assembles a predicted process, which is solved exactly by backward induction. The
   exact DP makes the predicted policy consistent: it does not switch back and forth unless that pays in
   the predicted process.
2. A correction (approximate DP, supervised on exact targets). The exact advantage of each allowed
   action over keeping the current set, Q*(y, s, a) - Q*(y, s, keep), in events per 1,000, minus the
   predicted process's own advantage, is regressed on (patient features, year, state, action, the
   predicted advantage). The predicted advantages of the training patients come from models fitted
   without them (cross-fitting), so the correction learns the model's real errors.

The learned policy is greedy on the predicted advantage plus the correction, restricted to actions that
never lower a therapy the plan controls: the exact optima of the benchmark cohort never stop what they
started (0 of 411 optimal paths), and the restriction removes the back-and-forth switching an
unconstrained greedy policy pays monitoring and first-year harms for. It never sees a held-out
patient's process: only its features, its options and the indexing of its state space.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]

from fhirtwin.sequencing.mdp import solve
from fhirtwin.sequencing.process import Options, TherapyProcess
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
STATE_ACTION_FEATURES = (
    "year", "statin_level", "bp_drugs", "sglt2i", "quit", "years_since_quit",
    "to_statin_level", "to_bp_drugs", "to_sglt2i", "quit_attempt", "statin_change", "bp_change", "sglt2i_change",
)
#: Features of one (year, therapy set, previous statin level, smoking state) of the process model.
PROCESS_FEATURES = ("year", "statin_level", "bp_drugs", "sglt2i", "statin_levels_started", "quit", "years_since_quit")
#: Advantages are learned in events per 1,000 (the scale the plan reports).
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


def _process_rows(process: TherapyProcess) -> tuple[np.ndarray, tuple[np.ndarray, ...], np.ndarray, np.ndarray]:
    """Every (year, set, previous statin level, smoking state) of the process arrays, with its features;
    also the mask of the current-care rows and of the rows that can be reached."""
    years, n_sets, n_levels, n_sig = process.stay.shape[1:]
    y, j, lprev, sig = (g.ravel() for g in np.meshgrid(np.arange(years), np.arange(n_sets), np.arange(n_levels),
                                                       np.arange(n_sig), indexing="ij"))
    sets = process.sets
    level = np.array([t.statin_level for t in sets])[j]
    rows = np.column_stack([
        y, level, np.array([t.bp_drugs for t in sets])[j], np.array([t.sglt2i for t in sets], dtype=float)[j],
        np.maximum(level - lprev, 0), (sig > 0), np.where(sig > 0, y - (sig - 1), -1),
    ]).astype(float)
    patient = _features(process)
    features = np.column_stack([np.broadcast_to(patient, (y.size, patient.size)), rows])
    base = (j == 0) & (lprev == 0) & (sig == 0)
    return features, (y, j, lprev, sig), base, sig <= y


@dataclass(frozen=True, eq=False)
class ProcessModel:
    """Regressors of a patient's draw-averaged yearly process quantities, and the mean quit probability."""

    base_events: HistGradientBoostingRegressor
    base_exit: HistGradientBoostingRegressor
    events_ratio: HistGradientBoostingRegressor
    exit_ratio: HistGradientBoostingRegressor
    quit_probability: float

    def predict(self, process: TherapyProcess) -> TherapyProcess:
        """The predicted process of a patient: the learned yearly quantities with the patient's known costs.

        Only the features, options, costs and shape of ``process`` are read, never its engine quantities.
        """
        features, _, base, _ = _process_rows(process)
        events = np.exp(self.base_events.predict(features) + np.where(base, 0.0, self.events_ratio.predict(features)))
        leave = np.exp(self.base_exit.predict(features) + np.where(base, 0.0, self.exit_ratio.predict(features)))
        shape = (1, *process.stay.shape[1:])
        stay = 1.0 - np.clip(leave, 0.0, 1.0)
        return dataclasses.replace(process, stay=stay.reshape(shape), events=np.minimum(events, 1.0 - stay).reshape(
            shape), quit_probability=np.array([self.quit_probability]), draws=1)

    def advantages(self, process: TherapyProcess, cells: Grid) -> np.ndarray:
        """Q(y, s, a) - Q(y, s, keep) of the predicted process at the cells, in events per 1,000."""
        return advantages(self.predict(process), cells)


def fit_process_model(processes: list[TherapyProcess], *, seed: int = 0, max_iter: int = 300) -> ProcessModel:
    """Fit the process model on the training patients' draw-averaged processes."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("xb", "eb", "lb", "xr", "er", "lr")}
    for process in processes:
        stay, events = process.stay.mean(axis=0), process.events.mean(axis=0)
        features, (y, j, lprev, sig), base, reachable = _process_rows(process)
        e0, l0 = events[:, 0, 0, 0], 1.0 - stay[:, 0, 0, 0]
        parts["xb"].append(features[base])
        parts["eb"].append(np.log(e0[y[base]]))
        parts["lb"].append(np.log(l0[y[base]]))
        other = reachable & ~base
        y, j, lprev, sig = y[other], j[other], lprev[other], sig[other]
        parts["xr"].append(features[other])
        parts["er"].append(np.log(events[y, j, lprev, sig] / e0[y]))
        parts["lr"].append(np.log((1.0 - stay[y, j, lprev, sig]) / l0[y]))
    x = {k: np.vstack(parts[k]) for k in ("xb", "xr")}

    def fit(features: str, target: str) -> HistGradientBoostingRegressor:
        return _fit(x[features], np.concatenate(parts[target]), max_iter=max_iter, leaves=31, seed=seed)

    quit = float(np.mean([np.mean(p.quit_probability) for p in processes]))
    return ProcessModel(fit("xb", "eb"), fit("xb", "lb"), fit("xr", "er"), fit("xr", "lr"), quit)


# ------------------------------------------------------------------------------------------------
# layer 2: the correction, on exact advantages


@dataclass(frozen=True)
class Grid:
    """Every (year, state, action) of a process as index arrays, with its state-action features."""

    year: np.ndarray
    state: np.ndarray
    action: np.ndarray
    features: np.ndarray
    lowers: np.ndarray


def grid(process: TherapyProcess, patient: np.ndarray) -> Grid:
    """Allowed (year, state, action) triples of reachable smoking states, with their features, and whether the
    action lowers a therapy the plan controls."""
    years, n_states, n_actions = process.years, process.n_states, process.n_actions
    y, s, a = (g.ravel() for g in np.meshgrid(np.arange(years), np.arange(n_states), np.arange(n_actions),
                                              indexing="ij"))
    sig = s % process.smoking_states
    att = a % process.attempts
    keep = ((att == 0) | (sig == 0)) & (sig <= y)  # "quit in year k" is only reachable after year k
    y, s, a, sig, att = y[keep], s[keep], a[keep], sig[keep], att[keep]
    levels = np.array([[t.statin_level, t.bp_drugs, t.sglt2i] for t in process.sets], dtype=float)
    before, after = levels[s // process.smoking_states], levels[a // process.attempts]
    quit = (sig > 0).astype(float)
    since = np.where(sig > 0, y - (sig - 1), -1.0)
    state_action = np.column_stack([y, before, quit, since, after, att, after - before]).astype(float)
    features = np.column_stack([np.broadcast_to(patient, (y.size, patient.size)), state_action])
    return Grid(y, s, a, features, np.any(after < before, axis=1))


def advantages(process: TherapyProcess, cells: Grid) -> np.ndarray:
    """Exact Q*(y, s, a) - Q*(y, s, keep) of the cells, in events per 1,000."""
    solution = solve(process.mdp())
    q = solution.q[cells.year, cells.state, cells.action]
    keep = solution.q[cells.year, cells.state, process.hold[cells.state]]
    out: np.ndarray = SCALE * (q - keep)
    return out


@dataclass(frozen=True, eq=False)
class LearnedPolicy:
    """The process model and the correction; :meth:`policy` is greedy on their sum, never lowering a therapy."""

    model: ProcessModel
    correction: HistGradientBoostingRegressor

    def advantages(self, process: TherapyProcess) -> tuple[Grid, np.ndarray]:
        """The cells of a patient's state space and their learned advantages (events per 1,000)."""
        cells = grid(process, _features(process))
        predicted = self.model.advantages(process, cells)
        return cells, predicted + self.correction.predict(np.column_stack([cells.features, predicted]))

    def policy(self, process: TherapyProcess) -> np.ndarray:
        """(years, states) action table from the patient's features only (the process gives the indexing)."""
        cells, learned = self.advantages(process)
        learned = np.where(cells.lowers, -np.inf, learned)
        table = np.tile(process.hold, (process.years, 1))
        order = np.lexsort((learned, cells.state, cells.year))  # best action last within each (year, state)
        table[cells.year[order], cells.state[order]] = cells.action[order]
        return table


def fit_policy(processes: list[TherapyProcess], *, seed: int = 0, max_iter: int = 400, folds: int = 3) -> LearnedPolicy:
    """Fit the process model (cross-fitted over ``folds`` for the correction's inputs) and the correction."""
    if not processes:
        raise ValueError("fit_policy needs at least one training patient")
    if len(processes) < 2 * folds:
        raise ValueError(f"fit_policy needs at least {2 * folds} training patients for {folds}-fold cross-fitting")
    features, targets = [], []
    for fold in range(folds):
        model = fit_process_model([p for k, p in enumerate(processes) if k % folds != fold], seed=seed,
                                  max_iter=max_iter)
        for process in processes[fold::folds]:
            cells = grid(process, _features(process))
            predicted = model.advantages(process, cells)
            features.append(np.column_stack([cells.features, predicted]))
            targets.append(advantages(process, cells) - predicted)
    correction = _fit(np.vstack(features), np.concatenate(targets), max_iter=max_iter, leaves=63, seed=seed)
    return LearnedPolicy(fit_process_model(processes, seed=seed, max_iter=max_iter), correction)
