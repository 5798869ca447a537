"""The parametric g-formula for time-varying treatment strategies over person-period data.

Why: when a time-varying covariate (LDL-C) both drives treatment (a statin is started because LDL-C is high)
and is changed by earlier treatment (the statin lowers later LDL-C), a regression that adjusts for the
covariate blocks part of the treatment's effect and conditions on a collider; the g-formula (Robins, Math
Model 1986;7:1393) does not. It models, period by period, the covariates given the past, the treatment
given the past (for the natural course only) and the event given the past, then simulates a population
forward under each strategy (Taubman SL et al., Int J Epidemiol 2009;38:1599; McGrath S et al., Patterns
2020;1:100008). The risk under a strategy is the mean simulated cumulative incidence; its interval comes
from a nonparametric bootstrap over persons.

Model forms (fixed, documented in docs/causal.md): every covariate is Gaussian-linear in the period, the
baseline covariates, the lagged covariates, the lagged treatment and the covariates modelled before it;
the treatment (absorbing: once started it stays on) and the event are pooled logistic regressions, the
event on the period, baseline, current and lagged covariates, current and lagged treatment. Censoring is
assumed independent given this history; competing deaths are not modelled (a person is followed until the
event or the end of their data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

State = Mapping[str, np.ndarray]
#: A strategy: (period, the simulated state now, treatment in the previous period) -> treatment now (0/1).
Strategy = Callable[[int, State, np.ndarray], np.ndarray]


class GFormulaError(ValueError):
    """The person-period table or the request cannot be used (the message names what is wrong)."""


@dataclass(frozen=True)
class Spec:
    """Column names of a person-period table: one row per person and period, periods 0, 1, ... in order."""

    id: str = "id"
    period: str = "period"
    treatment: str = "treated"
    outcome: str = "event"
    covariates: tuple[str, ...] = ("ldl",)
    baseline: tuple[str, ...] = ()
    treated_before: str | None = None  # treatment in the period before period 0 (else 0)

    def lag(self, name: str) -> str:
        """Name of the lagged column."""
        return f"{name}_lag1"

    def covariate_features(self, j: int) -> tuple[str, ...]:
        """Regressors of the j-th covariate."""
        return (self.period, *self.baseline, *(self.lag(c) for c in self.covariates), self.lag(self.treatment),
                *self.covariates[:j])

    def treatment_features(self) -> tuple[str, ...]:
        """Regressors of starting treatment (among the untreated)."""
        return (self.period, *self.baseline, *self.covariates, *(self.lag(c) for c in self.covariates))

    def outcome_features(self) -> tuple[str, ...]:
        """Regressors of the event."""
        return (self.period, *self.baseline, *self.covariates, *(self.lag(c) for c in self.covariates),
                self.treatment, self.lag(self.treatment))


# ------------------------------------------------------------------------------------------------
# regression models (numpy: ordinary least squares and IRLS logistic regression)
# ------------------------------------------------------------------------------------------------


def _design(columns: Mapping[str, np.ndarray], features: Sequence[str]) -> np.ndarray:
    n = len(next(iter(columns.values())))
    return np.column_stack([np.ones(n), *(np.asarray(columns[f], dtype=float) for f in features)])


@dataclass(frozen=True, eq=False)
class Linear:
    """Gaussian linear model: mean = X beta, residual sd."""

    features: tuple[str, ...]
    beta: np.ndarray
    sd: float

    @classmethod
    def fit(cls, columns: Mapping[str, np.ndarray], features: Sequence[str], y: np.ndarray) -> Linear:
        """Least squares; the sd uses the residual degrees of freedom."""
        x = _design(columns, features)
        if x.shape[0] <= x.shape[1]:
            raise GFormulaError(f"too few rows ({x.shape[0]}) to fit a model with {x.shape[1]} terms")
        beta, *_ = np.linalg.lstsq(x, y, rcond=None)
        resid = y - x @ beta
        return cls(tuple(features), beta, float(np.sqrt(resid @ resid / (x.shape[0] - x.shape[1]))))

    def mean(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Predicted mean."""
        out: np.ndarray = _design(columns, self.features) @ self.beta
        return out


@dataclass(frozen=True, eq=False)
class Logistic:
    """Logistic regression fitted by iteratively reweighted least squares (a tiny ridge keeps it defined
    under separation; 1e-8 relative to the information is negligible otherwise)."""

    features: tuple[str, ...]
    beta: np.ndarray
    cov: np.ndarray

    @classmethod
    def fit(cls, columns: Mapping[str, np.ndarray], features: Sequence[str], y: np.ndarray,
            max_iter: int = 50) -> Logistic:
        """Newton-Raphson on the log-likelihood."""
        x = _design(columns, features)
        if x.shape[0] <= x.shape[1]:
            raise GFormulaError(f"too few rows ({x.shape[0]}) to fit a model with {x.shape[1]} terms")
        if y.min() == y.max():
            raise GFormulaError("a logistic model needs both outcomes among its rows")
        scale = x.std(axis=0)
        scale[0] = 1.0
        scale[scale == 0] = 1.0
        xs = x / scale
        beta = np.zeros(x.shape[1])
        beta[0] = np.log(y.mean() / (1 - y.mean()))
        ridge = 1e-8 * np.eye(x.shape[1])
        info = ridge
        for _ in range(max_iter):
            p = 1.0 / (1.0 + np.exp(-(xs @ beta)))
            info = (xs * (p * (1 - p))[:, None]).T @ xs + ridge
            step = np.linalg.solve(info, xs.T @ (y - p))
            beta = beta + step
            if np.max(np.abs(step)) < 1e-10:
                break
        cov = np.linalg.inv(info) / np.outer(scale, scale)
        return cls(tuple(features), beta / scale, cov)

    def prob(self, columns: Mapping[str, np.ndarray]) -> np.ndarray:
        """Predicted probability."""
        out: np.ndarray = 1.0 / (1.0 + np.exp(-(_design(columns, self.features) @ self.beta)))
        return out

    def coefficient(self, name: str) -> tuple[float, float]:
        """(estimate, standard error) of one regressor's coefficient."""
        i = 1 + self.features.index(name)
        return float(self.beta[i]), float(np.sqrt(self.cov[i, i]))


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


def prepare(table: pd.DataFrame, spec: Spec) -> pd.DataFrame:
    """Checked, sorted table with the lagged columns (a covariate's lag in period 0 is its own value)."""
    needed = [spec.id, spec.period, spec.treatment, spec.outcome, *spec.covariates, *spec.baseline]
    if spec.treated_before:
        needed.append(spec.treated_before)
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise GFormulaError(f"person-period table lacks columns {missing}")
    df = table.sort_values([spec.id, spec.period]).reset_index(drop=True)
    if df[needed].isna().any().any():
        raise GFormulaError("person-period table has missing values in " + ", ".join(
            c for c in needed if df[c].isna().any()))
    first = df.groupby(spec.id)[spec.period].transform("min")
    if (first != 0).any() or (df.groupby(spec.id)[spec.period].diff().fillna(1) != 1).any():
        raise GFormulaError("every person's periods must run 0, 1, 2, ... without gaps")
    after_event = df.groupby(spec.id)[spec.outcome].transform(lambda s: s.cumsum().shift(fill_value=0))
    if (after_event > 0).any():
        raise GFormulaError("rows after a person's event: a person-period table ends at the event")
    grouped = df.groupby(spec.id)
    for c in spec.covariates:
        df[spec.lag(c)] = grouped[c].shift(1).fillna(df[c])
    before = df[spec.treated_before] if spec.treated_before else 0.0
    df[spec.lag(spec.treatment)] = grouped[spec.treatment].shift(1).fillna(before if spec.treated_before else 0.0)
    return df


def _columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c: df[c].to_numpy(dtype=float) for c in df.columns if pd.api.types.is_numeric_dtype(df[c])}


@dataclass(frozen=True, eq=False)
class Models:
    """The fitted covariate, treatment and outcome models."""

    covariates: tuple[Linear, ...]
    treatment: Logistic
    outcome: Logistic


def fit_models(df: pd.DataFrame, spec: Spec) -> Models:
    """Fit every model on a prepared table (covariates from period 1 on; treatment among the untreated)."""
    later = df[df[spec.period] > 0]
    cols = _columns(later)
    covs = tuple(Linear.fit(cols, spec.covariate_features(j), cols[c]) for j, c in enumerate(spec.covariates))
    untreated = df[df[spec.lag(spec.treatment)] == 0]
    treat = Logistic.fit(_columns(untreated), spec.treatment_features(), untreated[spec.treatment].to_numpy(float))
    all_cols = _columns(df)
    outcome = Logistic.fit(all_cols, spec.outcome_features(), all_cols[spec.outcome])
    return Models(covs, treat, outcome)


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------


def never() -> Strategy:
    """Never treat."""
    return lambda k, state, previous: np.zeros_like(previous)


def always() -> Strategy:
    """Treat from period 0 on."""
    return lambda k, state, previous: np.ones_like(previous)


def start_when(score: str | Callable[[State], np.ndarray], threshold: float) -> Strategy:
    """Start (and stay on) treatment in the first period in which the score exceeds the threshold.

    ``score`` is a covariate or baseline column, or a function of the state (e.g. a 10-year risk)."""
    def strategy(k: int, state: State, previous: np.ndarray) -> np.ndarray:
        value = state[score] if isinstance(score, str) else score(state)
        return np.maximum(previous, (np.asarray(value) > threshold).astype(float))
    return strategy


NATURAL_COURSE = "natural course"


# ------------------------------------------------------------------------------------------------
# simulation and the estimator
# ------------------------------------------------------------------------------------------------


def simulate(models: Models, spec: Spec, start: Mapping[str, np.ndarray], strategy: Strategy | str,
             periods: int, rng: np.random.Generator) -> np.ndarray:
    """Cumulative incidence (periods + 1,) of a population starting from ``start`` (period-0 rows)."""
    state = {name: np.asarray(v, dtype=float).copy() for name, v in start.items()}
    n = len(state[spec.covariates[0]])
    previous = state[spec.treated_before].copy() if spec.treated_before else np.zeros(n)
    for c in spec.covariates:  # as in the table: a covariate's lag in period 0 is its own value
        state[spec.lag(c)] = state[c].copy()
    survival = np.ones(n)
    risk = np.zeros(periods + 1)
    for k in range(periods):
        state[spec.period] = np.full(n, float(k))
        state[spec.lag(spec.treatment)] = previous
        if k > 0:
            for j, c in enumerate(spec.covariates):
                model = models.covariates[j]
                state[c] = model.mean(state) + model.sd * rng.standard_normal(n)
        if isinstance(strategy, str):  # the natural course: the fitted treatment model
            start_now = rng.random(n) < models.treatment.prob(state)
            treated = np.where(previous > 0, 1.0, start_now.astype(float))
        else:
            treated = np.asarray(strategy(k, state, previous), dtype=float)
        state[spec.treatment] = treated
        hazard = models.outcome.prob(state)
        risk[k + 1] = risk[k] + float(np.mean(survival * hazard))
        survival = survival * (1.0 - hazard)
        for c in spec.covariates:
            state[spec.lag(c)] = state[c]
        previous = treated
    return risk


@dataclass(frozen=True, eq=False)
class GFormulaResult:
    """Risk at the end of follow-up under each strategy, with bootstrap 95% intervals, and risk curves."""

    periods: int
    risk: dict[str, float]
    interval: dict[str, tuple[float, float]]
    difference: dict[str, float]
    difference_interval: dict[str, tuple[float, float]]
    reference: str
    curves: dict[str, np.ndarray]
    bootstrap: int
    replicates: dict[str, np.ndarray] = field(default_factory=dict)

    def rows(self) -> list[dict[str, float | str]]:
        """One row per strategy for a report."""
        return [{"strategy": s, "risk": self.risk[s], "lo": self.interval[s][0], "hi": self.interval[s][1],
                 "difference": self.difference[s], "difference_lo": self.difference_interval[s][0],
                 "difference_hi": self.difference_interval[s][1]} for s in self.risk]


def _start_rows(df: pd.DataFrame, spec: Spec) -> dict[str, np.ndarray]:
    first = df[df[spec.period] == 0]
    keep = [*spec.covariates, *spec.baseline, *([spec.treated_before] if spec.treated_before else [])]
    return {c: first[c].to_numpy(dtype=float) for c in keep}


def _resample(start: Mapping[str, np.ndarray], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    size = len(next(iter(start.values())))
    idx = rng.integers(0, size, n)
    return {c: v[idx] for c, v in start.items()}


def gformula(
    table: pd.DataFrame,
    spec: Spec,
    strategies: Mapping[str, Strategy | str],
    *,
    periods: int | None = None,
    reference: str | None = None,
    monte_carlo: int = 10_000,
    bootstrap: int = 100,
    seed: int = 0,
) -> GFormulaResult:
    """Risk by the end of ``periods`` under each strategy (NATURAL_COURSE for the fitted treatment model).

    Every strategy is simulated on the same Monte Carlo population and random numbers (paired), in the
    full data and in each bootstrap replicate (persons resampled with replacement, every model refitted);
    intervals are bootstrap percentiles. ``reference``: the strategy differences are taken against.
    """
    if not strategies:
        raise GFormulaError("no strategy to estimate")
    df = prepare(table, spec)
    periods = int(df[spec.period].max()) + 1 if periods is None else periods
    reference = reference or next(iter(strategies))
    if reference not in strategies:
        raise GFormulaError(f"reference strategy {reference!r} is not among the strategies")
    seeds = np.random.SeedSequence(seed).spawn(bootstrap + 1)

    def estimate(data: pd.DataFrame, seq: np.random.SeedSequence) -> dict[str, np.ndarray]:
        models = fit_models(data, spec)
        rng = np.random.default_rng(seq)
        start = _resample(_start_rows(data, spec), monte_carlo, rng)
        state_seed = int(rng.integers(2**63))
        return {name: simulate(models, spec, start, s, periods, np.random.default_rng(state_seed))
                for name, s in strategies.items()}

    curves = estimate(df, seeds[0])
    ids = df[spec.id].unique()
    groups = {pid: rows for pid, rows in df.groupby(spec.id).indices.items()}
    reps: dict[str, list[float]] = {name: [] for name in strategies}
    for b in range(bootstrap):
        rng = np.random.default_rng(seeds[b + 1])
        chosen = [groups[pid] for pid in rng.choice(ids, size=ids.size, replace=True)]
        sample = df.iloc[np.concatenate(chosen)].reset_index(drop=True)
        sample[spec.id] = np.repeat(np.arange(len(chosen)), [len(rows) for rows in chosen])
        try:
            out = estimate(sample, seeds[b + 1].spawn(1)[0])
        except GFormulaError:
            continue  # a replicate without both outcomes somewhere: skipped (and counted)
        for name in strategies:
            reps[name].append(float(out[name][periods]))
    arrays = {name: np.asarray(v) for name, v in reps.items()}
    risk = {name: float(c[periods]) for name, c in curves.items()}

    def pct(values: np.ndarray) -> tuple[float, float]:
        if values.size < 2:
            return (float("nan"), float("nan"))
        lo, hi = np.percentile(values, [2.5, 97.5])
        return float(lo), float(hi)

    return GFormulaResult(
        periods=periods,
        risk=risk,
        interval={name: pct(v) for name, v in arrays.items()},
        difference={name: risk[name] - risk[reference] for name in strategies},
        difference_interval={name: pct(arrays[name] - arrays[reference]) for name in strategies},
        reference=reference,
        curves=curves,
        bootstrap=int(arrays[reference].size),
        replicates=arrays,
    )


def naive_adjusted_odds_ratio(table: pd.DataFrame, spec: Spec) -> tuple[float, float, float]:
    """The usual time-varying analysis the g-formula replaces: pooled logistic regression of the event on
    current treatment adjusted for the current covariates, baseline and period. Returns the treatment's
    odds ratio with its 95% Wald interval (biased under treatment-confounder feedback)."""
    df = prepare(table, spec)
    cols = _columns(df)
    model = Logistic.fit(cols, (spec.period, *spec.baseline, *spec.covariates, spec.treatment), cols[spec.outcome])
    beta, se = model.coefficient(spec.treatment)
    return float(np.exp(beta)), float(np.exp(beta - 1.96 * se)), float(np.exp(beta + 1.96 * se))
