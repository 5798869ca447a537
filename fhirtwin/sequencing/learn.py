"""A sequencing policy learned across patients: approximate dynamic programming with a regressor.

Why: the exact solution needs the engine run once per therapy set for the patient (the ensemble), while a
policy that reads only the patient's recorded values, published risks and eligibility answers at once,
for any patient, and can be checked against the exact optimum of patients it never saw.

Method (approximate DP, supervised on exact targets): for every training patient the decision process is
solved exactly; the advantage of each allowed action over keeping the current set for the year,
Q*(y, s, a) - Q*(y, s, keep), in events per 1,000, is regressed with scikit-learn's histogram gradient
boosting on (patient features, year, state, action). The learned policy is greedy on the regressor; it
never sees a held-out patient's process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor  # type: ignore[import-untyped]

from fhirtwin.sequencing.mdp import solve
from fhirtwin.sequencing.process import Options, TherapyProcess
from fhirtwin.sim.inputs import PatientInputs

PATIENT_FEATURES = (
    "age_years", "male", "systolic_bp_mm_hg", "ldl_cholesterol_mg_dl", "hdl_cholesterol_mg_dl",
    "total_cholesterol_mg_dl", "egfr_ml_min_1_73m2", "bmi_kg_m2", "diabetes", "current_smoker", "on_statin",
    "current_statin_level", "on_bp_treatment", "log_uacr_mg_g", "hba1c_percent", "prevent_10y_ascvd",
    "prevent_10y_total_cvd", "prevent_10y_heart_failure", "kfre_5y", "moderate_statin_allowed",
    "high_statin_allowed", "bp_eligible", "sglt2i_eligible",
)
STATE_ACTION_FEATURES = (
    "year", "statin_level", "bp_drugs", "sglt2i", "quit", "years_since_quit",
    "to_statin_level", "to_bp_drugs", "to_sglt2i", "quit_attempt", "statin_change", "bp_change", "sglt2i_change",
)
#: Advantages are learned in events per 1,000 (the scale the plan reports).
SCALE = 1000.0


def patient_features(inputs: PatientInputs, published: dict[str, float], options: Options) -> np.ndarray:
    """The features of a patient: recorded values, published risks and eligibility (NaN when unmeasured)."""
    level = {None: 0, "low": 1, "moderate": 1, "high": 2}
    values = [
        inputs.age_years, float(inputs.sex == "male"), inputs.systolic_bp_mm_hg, inputs.ldl_cholesterol_mg_dl,
        inputs.hdl_cholesterol_mg_dl, inputs.total_cholesterol_mg_dl, inputs.egfr_ml_min_1_73m2, inputs.bmi_kg_m2,
        float(inputs.diabetes), float(inputs.current_smoker), float(inputs.on_statin),
        float(level.get(inputs.statin_intensity if inputs.on_statin else None, 1)), float(inputs.on_bp_treatment),
        math.log(inputs.uacr_mg_g) if inputs.uacr_mg_g else math.nan,
        inputs.hba1c_percent if inputs.hba1c_percent is not None else math.nan,
        published["prevent_10y_ascvd"], published["prevent_10y_total_cvd"], published["prevent_10y_heart_failure"],
        published.get("kfre_5y", math.nan), float("moderate" in options.statins), float("high" in options.statins),
        float(options.bp is not None), float(options.sglt2i is not None),
    ]
    return np.array(values, dtype=float)


@dataclass(frozen=True)
class Grid:
    """Every (year, state, action) of a process as index arrays, with its state-action features."""

    year: np.ndarray
    state: np.ndarray
    action: np.ndarray
    features: np.ndarray


def grid(process: TherapyProcess, patient: np.ndarray) -> Grid:
    """Allowed (year, state, action) triples of reachable smoking states, with their features."""
    years, n_states, n_actions = process.years, process.n_states, process.n_actions
    y, s, a = (g.ravel() for g in np.meshgrid(np.arange(years), np.arange(n_states), np.arange(n_actions),
                                              indexing="ij"))
    sig = s % process.smoking_states
    att = a % process.attempts
    keep = ((att == 0) | (sig == 0)) & (sig <= y)  # "quit in year k" is only reachable after year k
    y, s, a, sig, att = y[keep], s[keep], a[keep], sig[keep], att[keep]
    before = [process.sets[i] for i in s // process.smoking_states]
    after = [process.sets[j] for j in a // process.attempts]

    def arr(values: list[float]) -> np.ndarray:
        return np.asarray(values, dtype=float)

    b_stat, b_bp, b_sg = (arr([getattr(t, f) if f != "statin" else t.statin_level for t in before])
                          for f in ("statin", "bp_drugs", "sglt2i"))
    a_stat, a_bp, a_sg = (arr([getattr(t, f) if f != "statin" else t.statin_level for t in after])
                          for f in ("statin", "bp_drugs", "sglt2i"))
    quit = (sig > 0).astype(float)
    since = np.where(sig > 0, y - (sig - 1), -1.0)
    state_action = np.column_stack([y, b_stat, b_bp, b_sg, quit, since, a_stat, a_bp, a_sg, att,
                                    a_stat - b_stat, a_bp - b_bp, a_sg - b_sg]).astype(float)
    features = np.column_stack([np.broadcast_to(patient, (y.size, patient.size)), state_action])
    return Grid(y, s, a, features)


def advantages(process: TherapyProcess, cells: Grid) -> np.ndarray:
    """Exact Q*(y, s, a) - Q*(y, s, keep) of the cells, in events per 1,000."""
    solution = solve(process.mdp())
    q = solution.q[cells.year, cells.state, cells.action]
    keep = solution.q[cells.year, cells.state, process.hold[cells.state]]
    out: np.ndarray = SCALE * (q - keep)
    return out


@dataclass(frozen=True, eq=False)
class LearnedPolicy:
    """A regressor of action advantages; :meth:`policy` is greedy on it for any patient's state space."""

    regressor: HistGradientBoostingRegressor

    def policy(self, process: TherapyProcess) -> np.ndarray:
        """(years, states) action table from the patient's features only (the process gives the indexing)."""
        cells = grid(process, patient_features(process.inputs, process.published, process.options))
        predicted = self.regressor.predict(cells.features)
        table = np.tile(process.hold, (process.years, 1))
        order = np.lexsort((predicted, cells.state, cells.year))  # best action last within each (year, state)
        table[cells.year[order], cells.state[order]] = cells.action[order]
        return table


def fit_policy(processes: list[TherapyProcess], *, seed: int = 0, max_iter: int = 400) -> LearnedPolicy:
    """Fit the advantage regressor on the training patients' exact solutions."""
    if not processes:
        raise ValueError("fit_policy needs at least one training patient")
    features, targets = [], []
    for process in processes:
        cells = grid(process, patient_features(process.inputs, process.published, process.options))
        features.append(cells.features)
        targets.append(advantages(process, cells))
    regressor = HistGradientBoostingRegressor(max_iter=max_iter, learning_rate=0.1, max_leaf_nodes=63,
                                              min_samples_leaf=20, random_state=seed)
    regressor.fit(np.vstack(features), np.concatenate(targets))
    return LearnedPolicy(regressor)

