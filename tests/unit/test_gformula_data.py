"""A generator of longitudinal data with treatment-confounder feedback, written independently of the estimator.

Structure (one period = one year): an unmeasured per-period factor U_k raises both LDL-C and the event; LDL-C
drives statin start; a statin lowers later LDL-C; LDL-C raises the event. The statin acts on the event only
through LDL-C. Adjusting for current LDL-C therefore blocks the statin's effect and conditions on a collider
(statin -> LDL-C <- U -> event): a treated person with the same LDL-C has a higher U.

    L_0 = MU + 25 z + U_0
    L_k = RHO L_{k-1} + (1 - RHO) MU - LOWERING A_{k-1} + U_k + e_k        (k >= 1)
    A_k = 1 if A_{k-1} else Bernoulli(expit(START_0 + START_L (L_k - MU)))  (observational regime)
    Y_k ~ Bernoulli(expit(Y_0 + Y_L (L_k - MU) + Y_U U_k + Y_AGE (age_0 + k - 57)))

The true risk under a strategy is computed by running these equations with the strategy's treatment rule on
many simulated people and averaging the exact discrete-time cumulative incidence.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

MU, RHO, LOWERING, SD_U, SD_E = 140.0, 0.8, 8.0, 12.0, 8.0
START_0, START_L = -3.5, 0.05
Y_0, Y_L, Y_U, Y_AGE = -4.6, 0.012, 0.04, 0.04
PERIODS = 10

Rule = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (LDL-C now, treated before) -> treated now


def _expit(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def _paths(n: int, rng: np.random.Generator, rule: Rule | None):
    """Yield per period (age0, L_k, A_k, event probability p_k); ``rule`` None = the observational regime."""
    age0 = rng.uniform(45.0, 70.0, n)
    u = rng.normal(0.0, SD_U, n)
    ldl = MU + 25.0 * rng.standard_normal(n) + u
    treated = np.zeros(n)
    for k in range(PERIODS):
        if k > 0:
            u = rng.normal(0.0, SD_U, n)
            ldl = RHO * ldl + (1 - RHO) * MU - LOWERING * treated + u + rng.normal(0.0, SD_E, n)
        if rule is None:
            starts = rng.random(n) < _expit(START_0 + START_L * (ldl - MU))
            treated = np.where(treated > 0, 1.0, starts.astype(float))
        else:
            treated = rule(ldl, treated).astype(float)
        p = _expit(Y_0 + Y_L * (ldl - MU) + Y_U * u + Y_AGE * (age0 + k - 57.0))
        yield k, age0, ldl.copy(), treated.copy(), p


def observational(n: int, seed: int) -> pd.DataFrame:
    """Person-period table (id, period, age0, ldl, statin, event) ending at each person's event."""
    rng = np.random.default_rng(seed)
    alive = np.ones(n, dtype=bool)
    rows = []
    for k, age0, ldl, statin, p in _paths(n, rng, None):
        event = rng.random(n) < p
        idx = np.flatnonzero(alive)
        rows.append(pd.DataFrame({"id": idx, "period": k, "age0": age0[idx], "ldl": ldl[idx],
                                  "statin": statin[idx], "event": event[idx].astype(float)}))
        alive &= ~event
    return pd.concat(rows, ignore_index=True).sort_values(["id", "period"]).reset_index(drop=True)


def true_risk(rule: Rule, n: int = 400_000, seed: int = 1) -> float:
    """Cumulative incidence by the end of follow-up under a treatment rule (exact survival product)."""
    rng = np.random.default_rng(seed)
    survival = np.ones(n)
    risk = 0.0
    for _k, _age0, _ldl, _a, p in _paths(n, rng, rule):
        risk += float(np.mean(survival * p))
        survival *= 1.0 - p
    return risk


NEVER: Rule = lambda ldl, before: np.zeros_like(ldl)  # noqa: E731
ALWAYS: Rule = lambda ldl, before: np.ones_like(ldl)  # noqa: E731


def start_above(threshold: float) -> Rule:
    """Start when LDL-C exceeds the threshold, then stay on."""
    return lambda ldl, before: np.maximum(before, (ldl > threshold).astype(float))


def test_the_generator_has_treatment_confounder_feedback() -> None:
    df = observational(4000, seed=3)
    df["ldl_next"] = df.groupby("id")["ldl"].shift(-1)
    df["statin_next"] = df.groupby("id")["statin"].shift(-1)
    untreated = df[(df.statin == 0) & df.statin_next.notna()]
    high = untreated.ldl > MU + 20
    assert untreated[high].statin_next.mean() > 2 * untreated[~high].statin_next.mean()  # LDL-C -> statin start
    on = df[df.ldl_next.notna()]
    change = (on.ldl_next - (RHO * on.ldl + (1 - RHO) * MU))
    assert change[on.statin == 1].mean() < change[on.statin == 0].mean() - 6.0  # statin lowers later LDL-C
    assert true_risk(ALWAYS, 100_000) < true_risk(NEVER, 100_000) - 0.01  # a real protective effect
