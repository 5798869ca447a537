"""The treatment-sequencing decision process of one patient, built from the engine's anchored hazards.

Why this shape. Every year (decision years 0..9 of a 10-year horizon) the clinician may start, intensify,
add or stop a therapy the plan controls (a statin at moderate or high intensity, one or two added
antihypertensives, an SGLT2 inhibitor where eligible) and, for a smoker, support a quit attempt. The
engine's hazards are what the decision acts on: for each therapy set the engine's ensemble is run once
(``simulate_trajectories`` + ``hazard_paths``, the trial effects exactly as the planner's scenarios get
them, on the same paired draws), and the decision process reads yearly exit probabilities from the
monthly hazards. Nothing is re-estimated here.

* State: (therapy set, smoking state) in decision year y; the smoking state is "smoking" (or never a
  smoker) or "quit in year k", since the engine's cessation benefit depends on the time since quitting.
* Exit: the first major event (total CVD, i.e. a first ASCVD or heart-failure event, or kidney failure),
  or non-cardiovascular death; the patient then leaves the primary-prevention process (what follows is
  secondary prevention, out of the engine's scope). The weighted event is the reward lost, with the
  planner's outcome weights (a CVD event split into ASCVD and HF by the engine's own hazards).
* First-year statin effect: the engine gives an LDL-C change only half its log-effect in its first year
  (``ldl_major_vascular_rr_per_mmol_l_year1``); a statin started or intensified in year y gets, for the
  increment, that first-year ratio in year y, as if the engine's scenario had started then.
* Costs per year, in events-prevented-equivalents: the planner's harms and harm weights (one-off harms at
  each start), plus the burden, monitoring and quit-attempt weights of ``sequencing_weights.json``
  (assumptions, labelled there).
* Uncertainty: the ensemble draws. The decision process solved exactly is the draw-average of the
  one-year transitions (the clinician does not know which draw is true); any policy can also be
  evaluated on every draw's own process, which gives the interval of its net benefit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from fhirtwin.sequencing.mdp import FORBIDDEN, FiniteMDP
from fhirtwin.sim._params import intervention_parameters
from fhirtwin.sim.dynamics import Trajectories, month_grid, simulate_trajectories
from fhirtwin.sim.ensemble import ParameterDraws, draw_parameters
from fhirtwin.sim.guidelines import expected_harms, harm_weight, outcome_weights
from fhirtwin.sim.hazards import DT, hazard_paths, quitter_multiplier
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.interventions import Intervention, Scenario, candidate_interventions
from fhirtwin.sim.model import MechanisticTwin

HORIZON_YEARS = 10
STATIN_ORDER = (None, "moderate", "high")


@cache
def sequencing_weights() -> dict[str, Any]:
    """Burden, monitoring and quit-attempt weights (``sequencing_weights.json``; all assumptions)."""
    with open(Path(__file__).with_name("sequencing_weights.json"), encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def _weight(name: str) -> float:
    return float(sequencing_weights()[name]["value"])


@dataclass(frozen=True)
class TherapySet:
    """What the plan has added on top of current care: statin intensity (None: as now), drugs, SGLT2i."""

    statin: str | None = None
    bp_drugs: int = 0
    sglt2i: bool = False

    @property
    def statin_level(self) -> int:
        """0 = current care, 1 = moderate, 2 = high intensity (for ordering changes)."""
        return STATIN_ORDER.index(self.statin)

    def label(self) -> str:
        """Short human-readable name (``current care`` for the empty set)."""
        parts = []
        if self.statin:
            parts.append(f"{self.statin}-intensity statin")
        if self.bp_drugs:
            parts.append(f"{self.bp_drugs} added antihypertensive{'s' if self.bp_drugs > 1 else ''}")
        if self.sglt2i:
            parts.append("SGLT2 inhibitor")
        return " + ".join(parts) or "current care"


@dataclass(frozen=True)
class Options:
    """What the plan may use for this patient (``candidate_interventions``: eligibility, pharmacogenomics)."""

    statins: dict[str, Intervention]
    bp: Intervention | None
    sglt2i: Intervention | None
    smoker: bool

    @classmethod
    def of(cls, inputs: PatientInputs) -> Options:
        """The eligible interventions the decision process may combine."""
        eligible = candidate_interventions(inputs).eligible
        statins = {i.intensity: i for i in eligible if i.kind == "statin" and i.intensity}
        bp = next((i for i in eligible if i.kind == "bp_lowering"), None)
        sglt2i = next((i for i in eligible if i.kind == "sglt2i"), None)
        smoker = any(i.kind == "smoking_cessation" for i in eligible)
        return cls(statins, bp, sglt2i, smoker)

    def therapy_sets(self) -> tuple[TherapySet, ...]:
        """Every combination, current care first."""
        statins = [s for s in STATIN_ORDER if s is None or s in self.statins]
        drugs = (0, 1, 2) if self.bp is not None else (0,)
        sglt2 = (False, True) if self.sglt2i is not None else (False,)
        return tuple(TherapySet(s, b, g) for s, b, g in itertools.product(statins, drugs, sglt2))

    def interventions(self, therapy: TherapySet) -> tuple[Intervention, ...]:
        """The engine's interventions of a therapy set (two antihypertensives: one, with a doubled drop)."""
        out = []
        if therapy.statin:
            out.append(self.statins[therapy.statin])
        if therapy.bp_drugs and self.bp is not None:
            out.append(self.bp)
        if therapy.sglt2i and self.sglt2i is not None:
            out.append(self.sglt2i)
        return tuple(out)


@dataclass(frozen=True)
class Action:
    """Move to a therapy set this year, and (smokers) whether a supported quit attempt is made."""

    therapy: TherapySet
    quit_attempt: bool = False


@dataclass(frozen=True, eq=False)
class TherapyProcess:
    """One patient's decision process: per-draw yearly quantities and the deterministic costs.

    Arrays indexed (draw, year, therapy set, previous statin level, smoking state): ``stay`` the
    probability of staying in the process through the year, ``events`` the weighted major events in it.
    Smoking state 0 = smoking (or not a smoker), k + 1 = quit in year k. ``quit_probability`` per draw;
    ``cost`` (set before, set after, attempt) in events-prevented-equivalents per year;
    ``sbp``/``ldl`` (set, year) the draw-mean biomarker at the start of each year (guideline titration).
    """

    inputs: PatientInputs
    published: dict[str, float]
    options: Options
    sets: tuple[TherapySet, ...]
    stay: np.ndarray
    events: np.ndarray
    quit_probability: np.ndarray
    cost: np.ndarray
    sbp: np.ndarray
    ldl: np.ndarray
    draws: int
    seed: int

    @property
    def years(self) -> int:
        """Decision years."""
        return int(self.stay.shape[1])

    @property
    def smoking_states(self) -> int:
        """1 for a non-smoker, years + 1 for a smoker."""
        return int(self.stay.shape[4])

    @property
    def attempts(self) -> int:
        """2 (no attempt, attempt) for a smoker, else 1."""
        return 2 if self.options.smoker else 1

    @property
    def n_states(self) -> int:
        """States of the decision process (therapy set x smoking state)."""
        return len(self.sets) * self.smoking_states

    @property
    def n_actions(self) -> int:
        """Actions (target therapy set x attempt)."""
        return len(self.sets) * self.attempts

    def state_index(self, therapy: TherapySet, smoking: int = 0) -> int:
        """Index of (therapy set, smoking state)."""
        return self.sets.index(therapy) * self.smoking_states + smoking

    def state(self, index: int) -> tuple[TherapySet, int]:
        """(therapy set, smoking state) of a state index."""
        return self.sets[index // self.smoking_states], index % self.smoking_states

    def action_index(self, action: Action) -> int:
        """Index of an action."""
        return self.sets.index(action.therapy) * self.attempts + int(action.quit_attempt)

    def action(self, index: int) -> Action:
        """The action of an index."""
        return Action(self.sets[index // self.attempts], bool(index % self.attempts))

    @property
    def start(self) -> int:
        """The state now: current care, smoking state 0."""
        return self.state_index(TherapySet())

    @property
    def hold(self) -> np.ndarray:
        """(S,) the action that keeps each state's therapy set without an attempt (the baseline)."""
        return np.array([(s // self.smoking_states) * self.attempts for s in range(self.n_states)])

    def _parts(self, draws: bool) -> dict[str, np.ndarray]:
        """stay/events, and their (1 - q)- and q-weighted forms, per draw (``draws``) or averaged over draws."""
        q = self.quit_probability.reshape((-1,) + (1,) * (self.stay.ndim - 1))
        parts = {"stay": self.stay, "events": self.events, "stay_keep": (1 - q) * self.stay,
                 "events_keep": (1 - q) * self.events, "stay_quit": q * self.stay, "events_quit": q * self.events}
        return parts if draws else {k: np.mean(v, axis=0) for k, v in parts.items()}

    def _rows(self, parts: dict[str, np.ndarray], year: np.ndarray, s: np.ndarray,
              a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Reward, successors, probabilities and the allowed mask for broadcast (year, state, action) indices.

        An attempt succeeds with the draw's quit probability: the patient then is in "quit this year" for
        the year itself (the engine's cessation benefit starts at the quit), else goes on smoking.
        """
        n_sig = self.smoking_states
        i, sig = s // n_sig, s % n_sig
        j, att = a // self.attempts, a % self.attempts
        lprev = np.array([t.statin_level for t in self.sets])[i]
        quit_state = np.minimum(year + 1, n_sig - 1)
        tried = (att == 1) & (sig == 0)

        def at(name: str, smoking: np.ndarray) -> np.ndarray:
            out: np.ndarray = parts[name][..., year, j, lprev, smoking]
            return out

        p0 = np.where(tried, at("stay_keep", sig), at("stay", sig))
        p1 = np.where(tried, at("stay_quit", quit_state), 0.0)
        lost = np.where(tried, at("events_keep", sig) + at("events_quit", quit_state), at("events", sig))
        allowed = (att == 0) | (sig == 0)
        reward = np.where(allowed, -lost - self.cost[i, j, att], FORBIDDEN)
        successor = np.stack(np.broadcast_arrays(j * n_sig + sig, j * n_sig + quit_state), axis=-1)
        probability = np.stack(np.broadcast_arrays(p0, p1), axis=-1)
        successor = np.broadcast_to(successor, probability.shape)
        return reward, successor, probability, np.broadcast_to(allowed, reward.shape)

    def mdp(self) -> FiniteMDP:
        """The decision process solved exactly: one-year transitions averaged over the draws."""
        year, s, a = np.meshgrid(np.arange(self.years), np.arange(self.n_states), np.arange(self.n_actions),
                                 indexing="ij")
        reward, successor, probability, _ = self._rows(self._parts(draws=False), year, s, a)
        return FiniteMDP(reward, successor, probability)

    def draw_values(self, policy: np.ndarray) -> np.ndarray:
        """Exact value at the start state of a policy (Y, S) on every draw's own process, shape (D,)."""
        policy = np.asarray(policy, dtype=int)
        parts = self._parts(draws=True)
        value = np.zeros((self.draws, self.n_states))
        states = np.arange(self.n_states)
        rows = np.arange(self.draws)[:, None, None]
        for year in range(self.years - 1, -1, -1):
            y = np.full(self.n_states, year)
            reward, successor, probability, allowed = self._rows(parts, y, states, policy[year])
            if not np.all(allowed):
                raise ValueError("the policy takes an action that is not allowed")
            future = np.sum(probability * value[rows, successor], axis=-1)
            value = reward + future
        out: np.ndarray = value[:, self.start]
        return out


def _yearly(h_cvd: np.ndarray, w_cvd: np.ndarray, h_kidney: np.ndarray, w_kidney: float, death: np.ndarray,
            years: int) -> tuple[np.ndarray, np.ndarray]:
    """Per year: probability of staying event-free and alive, and the weighted first events (..., years).

    Monthly hazards (..., months), constant within a month; exits are competing (CVD, kidney, death).
    """
    total = h_cvd + h_kidney + death
    shape = total.shape[:-1] + (years, 12)
    total_y = total[..., : 12 * years].reshape(shape)
    log_s = np.cumsum(total_y * DT, axis=-1)
    s_end = np.exp(-log_s)
    s_start = np.exp(-(log_s - total_y * DT))
    leave = s_start - s_end
    weighted = (h_cvd * w_cvd + h_kidney * w_kidney)[..., : 12 * years].reshape(shape)
    events = np.sum(leave * weighted / total_y, axis=-1)
    return s_end[..., -1], events


def build_process(
    inputs: PatientInputs,
    *,
    draws: int = 100,
    seed: int = 0,
    years: int = HORIZON_YEARS,
    components: Iterable[str] | None = None,
) -> TherapyProcess:
    """Run the engine once per therapy set on ``draws`` paired draws and build the decision process
    (``components``: the engine's optional components, default the deployment's)."""
    model = MechanisticTwin(components=components).fit(inputs)
    inputs = model.inputs_  # what the twin ran on: no value of a component switched off in this deployment
    anchors, posteriors = model.anchors_, model.posteriors_
    options = Options.of(inputs)
    sets = options.therapy_sets()
    t = month_grid(float(years))
    months = t.size - 1
    t_mid = 0.5 * (t[1:] + t[:-1])
    params = draw_parameters(inputs, posteriors, draws, seed, float(years), uacr_quantiles=anchors.kidney.shape[0])
    doubling = float(sequencing_weights()["second_antihypertensive"]["sbp_drop_multiple"])
    weights = outcome_weights()
    death = anchors.death_non_cvd[:months]

    h_full, c_first, kidney, w_cvd, sbp, ldl = {}, {}, {}, {}, [], []
    for therapy in sets:
        p = (params if therapy.bp_drugs < 2
             else dataclasses.replace(params, sbp_drop_mm_hg=doubling * params.sbp_drop_mm_hg))
        scenario = Scenario(therapy.label(), options.interventions(therapy))
        traj = simulate_trajectories(inputs, posteriors, p, scenario, t, dynamic=model.dynamic)
        hz = _hazards(model, traj, p, scenario)
        first_ratios = {**p.ratios,
                        "ldl_major_vascular_rr_per_mmol_l": p.ratios["ldl_major_vascular_rr_per_mmol_l_year1"]}
        hz1 = _hazards(model, traj, dataclasses.replace(p, ratios=first_ratios), scenario)
        h_full[therapy] = hz["total_cvd"]
        c_first[therapy] = np.log(np.maximum(hz1["total_cvd"], 1e-300)) - np.log(np.maximum(hz["total_cvd"], 1e-300))
        kidney[therapy] = hz["kidney_failure"]
        a_sum = np.maximum(hz["ascvd"] + hz["heart_failure"], 1e-300)
        w_cvd[therapy] = (weights.get("ascvd", 1.0) * hz["ascvd"] + weights.get("heart_failure", 1.0)
                          * hz["heart_failure"]) / a_sum
        knots = np.arange(years) * 12
        sbp.append(np.mean(traj.values["systolic_bp_mm_hg"][:, knots], axis=0))
        ldl.append(np.mean(traj.values["ldl_cholesterol_mg_dl"][:, knots], axis=0))

    n_sig = years + 1 if options.smoker else 1
    quit = np.ones((n_sig, draws, months))
    for k in range(years if options.smoker else 0):
        shift = 12 * k
        shifted = dataclasses.replace(anchors, never_smoker_ratio={o: r[shift:] for o, r in
                                                                   anchors.never_smoker_ratio.items()})
        quit[k + 1, :, shift:] = quitter_multiplier(shifted, params.ratios, t_mid[: months - shift])["total_cvd"]
    n_levels = len(STATIN_ORDER)
    stay = np.empty((draws, years, len(sets), n_levels, n_sig))
    events = np.empty_like(stay)
    w_kidney = float(weights.get("kidney_failure", 1.0))
    for index, therapy in enumerate(sets):
        for lprev in range(n_levels):
            h = h_full[therapy]
            if lprev < therapy.statin_level:
                before = dataclasses.replace(therapy, statin=STATIN_ORDER[lprev])
                h = h * np.exp(c_first[therapy] - c_first.get(before, np.zeros_like(h)))
            cvd = h[None, :, :] * quit  # (smoking states, draws, months)
            s_end, ev = _yearly(cvd, w_cvd[therapy][None], kidney[therapy][None], w_kidney, death, years)
            stay[:, :, index, lprev, :] = np.moveaxis(s_end, 0, -1)
            events[:, :, index, lprev, :] = np.moveaxis(ev, 0, -1)
    cost = _costs(inputs, options, sets)
    return TherapyProcess(inputs, dict(anchors.published), options, sets, stay, events, params.quit_probability, cost,
                          np.array(sbp), np.array(ldl), draws, seed)


def _hazards(model: MechanisticTwin, traj: Trajectories, params: ParameterDraws,
             scenario: Scenario) -> dict[str, np.ndarray]:
    """The engine's hazards of one scenario on the given draws, as ``MechanisticTwin.simulate`` computes them."""
    return hazard_paths(model.inputs_, model.anchors_, traj, params, scenario, dynamic=model.dynamic)


def _harm_per_year(intervention: Intervention, inputs: PatientInputs) -> tuple[float, float]:
    """(ongoing harm per year, one-off harm at start) in event-equivalents, from the planner's harms."""
    ten = harm_weight(expected_harms(intervention, inputs, 10.0))
    nine = harm_weight(expected_harms(intervention, inputs, 9.0))
    ongoing = ten - nine
    return ongoing, harm_weight(expected_harms(intervention, inputs, 1.0)) - ongoing


def _costs(inputs: PatientInputs, options: Options, sets: tuple[TherapySet, ...]) -> np.ndarray:
    """(set before, set after, attempt) cost of one year: harms, burden, monitoring, quit attempt."""
    burden = _weight("burden_per_drug_year")
    change = _weight("monitoring_per_change")
    sglt2_yearly = _weight("monitoring_sglt2i_per_year")
    attempt = _weight("quit_attempt")
    doubling = float(sequencing_weights()["second_antihypertensive"]["sbp_drop_multiple"])
    one_drug = float(intervention_parameters()["sbp_lowering_one_drug_mm_hg"]["value"])

    def harms(therapy: TherapySet) -> dict[str, tuple[float, float]]:
        out = {}
        if therapy.statin:
            out["statin"] = _harm_per_year(options.statins[therapy.statin], inputs)
        if therapy.bp_drugs and options.bp is not None:
            drug = dataclasses.replace(options.bp, sbp_drop_mm_hg=one_drug * (doubling if therapy.bp_drugs > 1 else 1))
            out["bp"] = _harm_per_year(drug, inputs)
        if therapy.sglt2i and options.sglt2i is not None:
            out["sglt2i"] = _harm_per_year(options.sglt2i, inputs)
        return out

    table = {therapy: harms(therapy) for therapy in sets}
    cost = np.zeros((len(sets), len(sets), 2))
    for (i, before), (j, after) in itertools.product(enumerate(sets), enumerate(sets)):
        pills = int(after.statin is not None and not inputs.on_statin) + after.bp_drugs + int(after.sglt2i)
        total = burden * pills + sglt2_yearly * int(after.sglt2i)
        total += sum(ongoing for ongoing, _ in table[after].values())
        started = {"statin": after.statin_level > before.statin_level, "bp": after.bp_drugs > before.bp_drugs,
                   "sglt2i": after.sglt2i and not before.sglt2i}
        total += sum(one_off for name, (_, one_off) in table[after].items() if started[name])
        changes = int(after.statin != before.statin) + int(after.bp_drugs != before.bp_drugs) + int(
            after.sglt2i != before.sglt2i)
        total += change * changes
        cost[i, j, 0] = total
        cost[i, j, 1] = total + attempt
    return cost
