"""Treatment sequencing: exact DP against brute force, dominance, engine agreement, learned policy, env, CarePlan."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

import numpy as np
import pytest
from sim_fixtures import patient, series

from fhirtwin.fhir.models import check_emittable, validate_resource
from fhirtwin.sequencing import SequencingError, build_process, sequence
from fhirtwin.sequencing.env import SequencingEnv
from fhirtwin.sequencing.learn import fit_policy
from fhirtwin.sequencing.mdp import FiniteMDP, evaluate, solve
from fhirtwin.sequencing.policies import FIXED_POLICIES
from fhirtwin.sim.interventions import BASELINE
from fhirtwin.sim.model import MechanisticTwin
from fhirtwin.writeback.sequence import build_sequence_care_plan

# ------------------------------------------------------------------------------------------------
# independent reference computations (no code under test)


def forward_value(reward, successor, probability, policy, start):
    """Expected total reward of a Markov policy by propagating the state distribution forward."""
    years, states = reward.shape[:2]
    mass = np.zeros(states)
    mass[start] = 1.0
    total = 0.0
    for y in range(years):
        nxt = np.zeros(states)
        for s in range(states):
            if mass[s] == 0:
                continue
            a = policy[y][s]
            total += mass[s] * reward[y, s, a]
            for k in range(successor.shape[-1]):
                nxt[successor[y, s, a, k]] += mass[s] * probability[y, s, a, k]
        mass = nxt
    return total


def brute_force(reward, successor, probability, start):
    """Best value over every deterministic Markov policy (allowed actions only)."""
    years, states, actions = reward.shape
    choices = [[[a for a in range(actions) if np.isfinite(reward[y, s, a])] for s in range(states)]
               for y in range(years)]
    flat = [choices[y][s] for y in range(years) for s in range(states)]
    best = -np.inf
    for combo in itertools.product(*flat):
        policy = np.array(combo).reshape(years, states)
        best = max(best, forward_value(reward, successor, probability, policy, start))
    return best


def random_mdp(rng, years=3, states=3, actions=2, slots=2):
    reward = rng.normal(size=(years, states, actions))
    reward[rng.random(reward.shape) < 0.15] = -np.inf
    reward[..., 0] = np.where(np.isfinite(reward[..., 0]), reward[..., 0], 0.0)  # action 0 always allowed
    successor = rng.integers(0, states, size=(years, states, actions, slots))
    probability = rng.dirichlet(np.ones(slots + 1), size=(years, states, actions))[..., :slots]  # + an exit
    return reward, successor, probability


# ------------------------------------------------------------------------------------------------
# exact DP


@pytest.mark.parametrize("seed", range(4))
def test_exact_dp_equals_brute_force_on_random_processes(seed):
    reward, successor, probability = random_mdp(np.random.default_rng(seed))
    solution = solve(FiniteMDP(reward, successor, probability))
    for start in range(reward.shape[1]):
        assert solution.value[0, start] == pytest.approx(brute_force(reward, successor, probability, start), abs=1e-12)
    # the greedy policy is evaluated to the same value by the independent forward pass
    assert forward_value(reward, successor, probability, solution.policy, 0) == pytest.approx(solution.value[0, 0])


def low_kidney_risk(**overrides):
    t = np.arange(-5.0, 0.5, 1.0)
    base = dict(egfr_ml_min_1_73m2=88.0, uacr_mg_g=10.0, history_egfr_ml_min_1_73m2=series(t, 88.0),
                diabetes=False, hba1c_percent=5.4, history_hba1c_percent=series(t, 5.4), current_smoker=False)
    return patient(**{**base, **overrides})


def test_exact_dp_equals_brute_force_on_a_tiny_engine_process():
    """A 3-year process of a real patient (statins only): every Markov policy enumerated."""
    inputs = low_kidney_risk(systolic_bp_mm_hg=120.0, history_systolic_bp_mm_hg=series(np.arange(-5.0, 0.5), 120.0))
    process = build_process(inputs, draws=20, years=3)
    assert len(process.sets) == 3 and process.attempts == 1  # current care, moderate, high
    mdp = process.mdp()
    best = brute_force(mdp.reward, mdp.successor, mdp.probability, process.start)  # 3^9 policies
    assert solve(mdp).value[0, process.start] == pytest.approx(best, abs=1e-14)


PATIENTS = {
    "smoker with diabetes and CKD": patient(),
    "low risk": low_kidney_risk(age_years=42.0, systolic_bp_mm_hg=124.0, ldl_cholesterol_mg_dl=110.0,
                                total_cholesterol_mg_dl=180.0, hdl_cholesterol_mg_dl=60.0,
                                history_systolic_bp_mm_hg=series(np.arange(-5.0, 0.5), 124.0)),
    "older hypertensive": low_kidney_risk(age_years=70.0, systolic_bp_mm_hg=152.0,
                                          history_systolic_bp_mm_hg=series(np.arange(-5.0, 0.5), 152.0)),
    "on a moderate statin": low_kidney_risk(on_statin=True, statin_intensity="moderate", current_smoker=True),
}


@pytest.fixture(scope="module")
def processes():
    return {name: build_process(inputs, draws=40) for name, inputs in PATIENTS.items()}


def test_optimum_is_at_least_every_fixed_policy(processes):
    for name, process in processes.items():
        mdp = process.mdp()
        optimum = solve(mdp).value[0]
        for label, make in FIXED_POLICIES.items():
            value = evaluate(mdp, make(process))[0]
            assert np.all(optimum >= value - 1e-12), (name, label)
    # and it is strictly better than all-now somewhere: sequencing is not trivial in this set
    gaps = [solve(p.mdp()).value[0, p.start] - evaluate(p.mdp(), FIXED_POLICIES["all eligible now"](p))[0, p.start]
            for p in processes.values()]
    assert max(gaps) > 1e-4


def test_current_care_events_match_the_engine_forecast():
    """Under current care the process's first events equal the engine's CIFs (total CVD + kidney failure)."""
    inputs = low_kidney_risk()
    process = build_process(inputs, draws=60)
    mdp = process.mdp()
    base = FIXED_POLICIES["current care"](process)
    events = -evaluate(mdp, base)[0, process.start]  # current care has no costs: value = -weighted events
    forecast = MechanisticTwin().fit(inputs).simulate(BASELINE, 10.0, 60, 0)
    engine = float(np.mean(forecast.cif["total_cvd"][:, 120] + forecast.cif["kidney_failure"][:, 120]))
    # differences: the process counts only a first event (kidney failure after a CVD event is not counted) and
    # averages one-year transitions over draws; both are small for this patient (measured 0.15 %)
    assert events == pytest.approx(engine, rel=0.01)


def test_draw_values_average_close_to_the_process_value(processes):
    process = processes["smoker with diabetes and CKD"]
    mdp = process.mdp()
    policy = solve(mdp).policy
    per_draw = process.draw_values(policy)
    assert per_draw.shape == (40,)
    assert np.mean(per_draw) == pytest.approx(evaluate(mdp, policy)[0, process.start], rel=0.02)
    assert np.std(per_draw) > 0  # the draws carry the engine's uncertainty


# ------------------------------------------------------------------------------------------------
# learned policy


def synthetic_patient(rng, k):
    """A non-smoking primary-prevention patient with random risk factors (generated here, not by the code)."""
    t = np.arange(-4.0, 0.5, 1.0)
    sbp, ldl, egfr = rng.uniform(118, 170), rng.uniform(80, 200), rng.uniform(35, 100)
    hdl = rng.uniform(35, 70)
    diabetes = bool(rng.random() < 0.3)
    uacr = float(np.exp(rng.normal(3.0, 1.3)))
    return patient(
        patient_id=f"synthetic-{k}", sex=str(rng.choice(["male", "female"])), age_years=float(rng.uniform(40, 78)),
        systolic_bp_mm_hg=sbp, ldl_cholesterol_mg_dl=ldl, hdl_cholesterol_mg_dl=hdl,
        total_cholesterol_mg_dl=ldl + hdl + 30, egfr_ml_min_1_73m2=egfr, diabetes=diabetes, current_smoker=False,
        on_bp_treatment=bool(rng.random() < 0.4), hba1c_percent=7.4 if diabetes else 5.5, uacr_mg_g=uacr,
        history_ldl_cholesterol_mg_dl=series(t, ldl), history_systolic_bp_mm_hg=series(t, sbp),
        history_egfr_ml_min_1_73m2=series(t, egfr), history_hba1c_percent=series(t, 7.4 if diabetes else 5.5))


#: Measured on this small seeded set (48 training and 12 held-out non-smokers, 10 draws, 60 boosting rounds,
#: generator seed 11): pooled ratio 0.9955, mean per-patient ratio 0.9934 over the 12 with a positive optimum,
#: minimum 0.961 (seed 12: 0.9958 and 0.9962). The thresholds keep a small margin below what was measured.
POOLED_RATIO = 0.985
MEAN_RATIO = 0.98
MIN_RATIO = 0.94


def test_learned_policy_reaches_the_optimum_on_held_out_patients():
    rng = np.random.default_rng(11)
    every = [build_process(synthetic_patient(rng, k), draws=10) for k in range(60)]
    train, held = every[:48], every[48:]
    learned = fit_policy(train, seed=0, max_iter=60)
    optimum, got, all_now, guideline = [], [], [], []
    for process in held:
        mdp = process.mdp()
        base = evaluate(mdp, FIXED_POLICIES["current care"](process))[0, process.start]

        def net(table, mdp=mdp, process=process, base=base):
            return evaluate(mdp, table)[0, process.start] - base

        table = learned.policy(process)
        # along its path from now (no quit), the learned policy never stops what it started, as the optima do
        state, path = process.start, []
        for year in range(process.years):
            therapy = process.sets[table[year, state] // process.attempts]
            path.append((therapy.statin_level, therapy.bp_drugs, therapy.sglt2i))
            state = process.state_index(therapy, state % process.smoking_states)
        assert all(np.all(np.array(b) >= np.array(a)) for a, b in itertools.pairwise(path))
        optimum.append(net(solve(mdp).policy))
        got.append(net(table))
        all_now.append(net(FIXED_POLICIES["all eligible now"](process)))
        guideline.append(net(FIXED_POLICIES["guideline at once"](process)))
    optimum, got = np.array(optimum), np.array(got)
    positive = optimum > 1e-5
    assert positive.sum() >= 10
    assert got.sum() / optimum.sum() >= POOLED_RATIO
    assert np.mean(got[positive] / optimum[positive]) >= MEAN_RATIO
    assert np.min(got[positive] / optimum[positive]) >= MIN_RATIO
    assert got.sum() > sum(all_now) and got.sum() > sum(guideline)


def test_process_model_reads_only_features_options_and_costs():
    """The predicted process of a patient does not change when its engine quantities are replaced."""
    import dataclasses

    from fhirtwin.sequencing.learn import fit_process_model

    rng = np.random.default_rng(5)
    every = [build_process(synthetic_patient(rng, k), draws=5) for k in range(12)]
    model = fit_process_model(every[:10], max_iter=20)
    process = every[10]
    scrambled = dataclasses.replace(process, stay=np.full_like(process.stay, 0.5),
                                    events=np.zeros_like(process.events))
    assert np.array_equal(model.predict(process).events, model.predict(scrambled).events)
    assert np.array_equal(model.predict(process).stay, model.predict(scrambled).stay)
    # and it predicts the held-out patient's yearly events under current care within a factor 2
    truth = process.events.mean(axis=0)[:, 0, 0, 0]
    assert np.all(np.abs(np.log(model.predict(process).events[0, :, 0, 0, 0] / truth)) < np.log(2))


# ------------------------------------------------------------------------------------------------
# gymnasium environment


def test_environment_returns_match_the_exact_policy_value(processes):
    from gymnasium.utils.env_checker import check_env

    process = processes["older hypertensive"]
    env = SequencingEnv([process])
    check_env(env, skip_render_check=True)
    solution = solve(process.mdp())
    returns = []
    for episode in range(3000):
        env.reset(seed=episode, options={"patient": 0})
        total, year, done = 0.0, 0, False
        while not done:
            action = int(solution.policy[year, env._state])
            _, reward, done, _, _ = env.step(action)
            total += reward
            year += 1
        returns.append(total)
    value = 1000 * solution.value[0, process.start]
    assert np.mean(returns) == pytest.approx(value, abs=4 * np.std(returns) / np.sqrt(len(returns)))


# ------------------------------------------------------------------------------------------------
# entry point and CarePlan


def test_sequence_rejects_bad_requests():
    with pytest.raises(SequencingError) as err:
        sequence(patient(age_years=85.0))
    assert err.value.code == "scope-age"
    with pytest.raises(SequencingError):
        sequence(patient(), draws=0)
    with pytest.raises(SequencingError):
        sequence(patient(), horizon_years=2.5)  # type: ignore[arg-type]


def test_sequence_plan_and_its_care_plan_are_valid_r4():
    plan = sequence(patient(), draws=30)
    assert plan.net_benefit["p05"] <= plan.net_benefit["median"] <= plan.net_benefit["p95"]
    assert plan.net_benefit["expected"] >= max(c["expected"] for c in plan.comparators.values()) - 1e-12
    assert plan.events_prevented["expected"] >= plan.net_benefit["expected"]  # costs are never negative
    care_plan = build_sequence_care_plan(plan, reference_date=date(2026, 6, 30),
                                         occurrence=datetime(2026, 7, 1, 12, tzinfo=UTC),
                                         device_reference="Device/fhirtwin-model")
    validate_resource(care_plan)
    check_emittable(care_plan)
    timings = [a["detail"]["scheduledTiming"]["repeat"] for a in care_plan["activity"]]
    starts = sorted({t["boundsPeriod"]["start"] for t in timings})
    assert starts[0] == "2026-06-30"
    assert any(a["detail"]["code"]["coding"][0]["code"] == "smoking-cessation" for a in care_plan["activity"])
    assert care_plan["identifier"][0]["system"] == "https://fhirtwin.org/sid/prediction"


@dataclass(frozen=True)
class FakeStep:
    year: int
    verb: str
    kind: str
    label: str
    intensity: str | None = None
    agent: str | None = None
    dose_mg: float | None = None
    condition: str = ""


@dataclass(frozen=True)
class FakePlan:
    steps: tuple
    patient_id: str = "p1"
    model: str = "fhirtwin-mechanistic"
    model_version: str = "0"
    sources: tuple = ("Observation/o/_history/1",)
    horizon_years: int = 10
    draws: int = 10
    net_benefit: dict = field(default_factory=lambda: {"expected": 0.01, "median": 0.01, "p05": 0.0, "p95": 0.02})
    events_prevented: dict = field(default_factory=lambda: {"expected": 0.02, "median": 0.02, "p05": 0.0,
                                                            "p95": 0.03})
    comparators: dict = field(default_factory=dict)
    notes: tuple = ()
    scope: str = "scope-primary-prevention"
    components: tuple = ()


def test_care_plan_timing_of_delayed_starts_and_stops():
    steps = (FakeStep(0, "start", "statin", "Start moderate-intensity statin", "moderate", "atorvastatin", 10.0),
             FakeStep(2, "add", "bp_lowering", "Add one standard-dose antihypertensive"),
             FakeStep(3, "intensify", "statin", "Intensify to high-intensity statin", "high", "atorvastatin", 40.0),
             FakeStep(8, "stop", "bp_lowering", "Stop one antihypertensive added by this plan"))
    care_plan = build_sequence_care_plan(FakePlan(steps), reference_date=date(2024, 2, 29),
                                         occurrence=datetime(2024, 3, 1, tzinfo=UTC), device_reference="Device/d")
    validate_resource(care_plan)
    bounds = [a["detail"]["scheduledTiming"]["repeat"]["boundsPeriod"] for a in care_plan["activity"]]
    # 29 February falls back to 28 February in common years; an intensification ends the earlier statin
    assert bounds == [{"start": "2024-02-29", "end": "2027-02-28"}, {"start": "2026-02-28", "end": "2032-02-29"},
                      {"start": "2027-02-28"}]
    assert any("Planned stops" in n["text"] for n in care_plan["note"])
