"""Discrimination and calibration of predicted risks against observed binary outcomes at a fixed horizon.

Why hand-written: the metrics are short, their definitions must be stated exactly in the report, and the
project keeps scikit-learn and statsmodels out of its dependencies. Everything here works on plain arrays:
``p`` is a predicted probability of the event by the horizon, ``y`` is 1 when the event was observed by
then. Follow-up in the event validation is complete (no one is lost before the horizon), so a competing
death before the event simply makes ``y = 0``: the predicted risks are cumulative incidences with death
competing, and the observed proportion estimates the same quantity without any censoring weights.

* AUC: the probability that a case (event by the horizon) has a higher predicted risk than a non-case
  (event-free at the horizon, alive or dead of a competing cause), ties counting one half. This is the
  cumulative/dynamic AUC(t) with competing events treated as controls (definition 2 of Blanche P, Dartigues
  JF, Jacqmin-Gadda H, Lifetime Data Anal 2013;19:5-40); with complete follow-up it needs no weights.
* O/E: observed events divided by the sum of predicted risks (1 = calibrated in the large).
* Calibration slope and intercept: logistic recalibration ``logit P(y) = a + b logit(p)`` fitted by
  maximum likelihood (slope ``b``, ideal 1: below 1 means predictions too extreme); the intercept is
  calibration-in-the-large, ``a`` with ``b`` fixed at 1 (ideal 0) (Van Calster B et al., J Clin Epidemiol
  2016;74:167-176).
* ICI: integrated calibration index, the mean absolute difference between predicted risk and a smoothed
  observed risk (Austin PC, Steyerberg EW, Stat Med 2019;38:4051-4065). The smoother here is a local-linear
  regression of ``y`` on ``logit(p)`` with tricube weights over the nearest 75 % of points (the loess
  default span), evaluated at 100 quantiles of ``logit(p)`` and interpolated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import rankdata

EPS = 1e-6
#: Fewer events (or non-events) than this and slope, AUC and ICI are not estimated (reported as NaN).
MIN_EVENTS = 5


def _clean(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pa = np.asarray(p, dtype=float).ravel()
    ya = np.asarray(y, dtype=float).ravel()
    if pa.shape != ya.shape:
        raise ValueError(f"predictions {pa.shape} and outcomes {ya.shape} differ in length")
    if np.any((ya != 0) & (ya != 1)):
        raise ValueError("outcomes must be 0 or 1")
    return np.clip(pa, 0.0, 1.0), ya


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """Probability that a random case outranks a random non-case (ties 1/2); NaN without both."""
    pa, ya = _clean(p, y)
    n1 = int(ya.sum())
    n0 = ya.size - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(pa)  # average ranks for ties
    return float((ranks[ya == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def observed_expected(p: np.ndarray, y: np.ndarray) -> float:
    """Observed events / expected events (sum of predicted risks)."""
    pa, ya = _clean(p, y)
    expected = float(pa.sum())
    return float(ya.sum()) / expected if expected > 0 else float("nan")


def oe_interval(observed: float, expected: float, z: float = 1.959964) -> tuple[float, float]:
    """Approximate 95 % interval of O/E treating O as Poisson: (O/E) exp(+-z / sqrt(O))."""
    if observed <= 0 or expected <= 0:
        return float("nan"), float("nan")
    ratio = observed / expected
    half = z / math.sqrt(observed)
    return ratio * math.exp(-half), ratio * math.exp(half)


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [EPS, 1 - EPS]."""
    q = np.clip(np.asarray(p, dtype=float), EPS, 1.0 - EPS)
    out: np.ndarray = np.log(q) - np.log1p(-q)
    return out


def _logistic(x: np.ndarray, y: np.ndarray, offset: np.ndarray, iterations: int = 50) -> np.ndarray:
    """Maximum-likelihood coefficients of ``logit P(y) = offset + x @ beta`` by Newton-Raphson with step halving."""
    beta = np.zeros(x.shape[1])

    def loglik(b: np.ndarray) -> float:
        eta = offset + x @ b
        return float(np.sum(y * eta - np.logaddexp(0.0, eta)))

    current = loglik(beta)
    for _ in range(iterations):
        eta = offset + x @ beta
        mu = 1.0 / (1.0 + np.exp(-eta))
        w = mu * (1.0 - mu)
        grad = x.T @ (y - mu)
        hess = (x * w[:, None]).T @ x
        try:
            step = np.linalg.solve(hess + 1e-10 * np.eye(x.shape[1]), grad)
        except np.linalg.LinAlgError:
            break
        t, accepted = 1.0, False
        while t > 1e-6 and not accepted:
            candidate = beta + t * step
            value = loglik(candidate)
            accepted = value >= current - 1e-12
            t /= 2.0
        if not accepted:
            break
        beta, previous, current = candidate, current, value
        if abs(current - previous) < 1e-10:
            break
    return beta


def calibration_slope_intercept(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(slope b of ``logit P(y) = a + b logit(p)``, calibration-in-the-large a with b fixed at 1)."""
    pa, ya = _clean(p, y)
    n1 = int(ya.sum())
    if n1 < MIN_EVENTS or ya.size - n1 < MIN_EVENTS:
        return float("nan"), float("nan")
    lp = logit(pa)
    slope = float(_logistic(np.column_stack([np.ones_like(lp), lp]), ya, np.zeros_like(lp))[1])
    intercept = float(_logistic(np.ones((lp.size, 1)), ya, lp)[0])
    return slope, intercept


def smoothed_observed(p: np.ndarray, y: np.ndarray, span: float = 0.75, grid: int = 100) -> np.ndarray:
    """Local-linear tricube smoother of ``y`` on ``logit(p)``, evaluated at every ``p`` (clipped to [0, 1])."""
    pa, ya = _clean(p, y)
    x = logit(pa)
    n = x.size
    k = max(3, min(n, int(math.ceil(span * n))))
    at = np.unique(np.quantile(x, np.linspace(0.0, 1.0, grid)))
    fitted = np.empty(at.size)
    for j, g in enumerate(at):
        d = np.abs(x - g)
        h = float(np.partition(d, k - 1)[k - 1])
        h = h * 1.0001 if h > 0 else 1.0
        w = np.clip(1.0 - (d / h) ** 3, 0.0, None) ** 3
        sw = w.sum()
        mx = float((w * x).sum() / sw)
        my = float((w * ya).sum() / sw)
        sxx = float((w * (x - mx) ** 2).sum())
        slope = float((w * (x - mx) * (ya - my)).sum() / sxx) if sxx > 1e-12 else 0.0
        fitted[j] = my + slope * (g - mx)
    out: np.ndarray = np.clip(np.interp(x, at, fitted), 0.0, 1.0)
    return out


def ici(p: np.ndarray, y: np.ndarray) -> float:
    """Integrated calibration index: mean |p - smoothed observed risk at p|."""
    pa, ya = _clean(p, y)
    n1 = int(ya.sum())
    if n1 < MIN_EVENTS or ya.size - n1 < MIN_EVENTS:
        return float("nan")
    return float(np.mean(np.abs(pa - smoothed_observed(pa, ya))))


@dataclass(frozen=True)
class DecileRow:
    """One decile of predicted risk: size, mean predicted, observed proportion and their ratio."""

    decile: int
    n: int
    mean_predicted: float
    observed: float
    oe: float


def deciles(p: np.ndarray, y: np.ndarray, groups: int = 10) -> list[DecileRow]:
    """Observed vs expected by group of predicted risk (equal-size groups after sorting by ``p``)."""
    pa, ya = _clean(p, y)
    order = np.argsort(pa, kind="stable")
    rows = []
    for d, idx in enumerate(np.array_split(order, groups), start=1):
        if idx.size == 0:
            continue
        e = float(pa[idx].mean())
        o = float(ya[idx].mean())
        rows.append(DecileRow(d, int(idx.size), e, o, o / e if e > 0 else float("nan")))
    return rows


@dataclass(frozen=True)
class Metrics:
    """Discrimination and calibration of one prediction in one (sub)population at one horizon."""

    n: int
    events: int
    observed_risk: float
    mean_predicted: float
    oe: float
    oe_ci95: tuple[float, float]
    auc: float
    slope: float
    intercept: float
    ici: float

    def to_json(self) -> dict[str, Any]:
        """Plain dict (NaN becomes None so the JSON is standard)."""
        data = asdict(self)
        data["oe_ci95"] = list(self.oe_ci95)
        return {k: _json_number(v) for k, v in data.items()}


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, list):
        return [_json_number(x) for x in v]
    return v


def evaluate(p: np.ndarray, y: np.ndarray) -> Metrics:
    """All metrics of one prediction (NaN where too few events or non-events)."""
    pa, ya = _clean(p, y)
    events = int(ya.sum())
    expected = float(pa.sum())
    slope, intercept = calibration_slope_intercept(pa, ya)
    return Metrics(
        n=int(ya.size),
        events=events,
        observed_risk=float(ya.mean()) if ya.size else float("nan"),
        mean_predicted=float(pa.mean()) if pa.size else float("nan"),
        oe=events / expected if expected > 0 else float("nan"),
        oe_ci95=oe_interval(events, expected),
        auc=auc(pa, ya) if min(events, ya.size - events) >= 1 else float("nan"),
        slope=slope,
        intercept=intercept,
        ici=ici(pa, ya),
    )
