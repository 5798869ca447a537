"""Validation of forecast trajectories against held-out measurements: interval coverage and calibration.

Why: a 90% interval is only useful if about 90% of future measurements fall inside it. Given a forecast
made at a cut-off date and the measurements taken after it, this compares the predictive distribution
(latent trajectory plus the measurement noise of ``dynamics_parameters.json``) with what was observed.
Pure numpy: ``fhirtwin validate cohort`` (fhirtwin/validation/calibration.py) builds the inputs from FHIR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fhirtwin.sim.calibration import LinearPosterior, noise_sd
from fhirtwin.sim.model import Forecast


@dataclass
class VariableScore:
    """Held-out points of one variable: observed values, predictive median and 90% bounds."""

    observed: list[float] = field(default_factory=list)
    median: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)

    def add(self, other: VariableScore) -> None:
        """Pool another patient's points."""
        for name in ("observed", "median", "low", "high"):
            getattr(self, name).extend(getattr(other, name))

    @property
    def n(self) -> int:
        """Number of held-out points."""
        return len(self.observed)

    def coverage(self) -> float:
        """Fraction of observations inside their predictive interval."""
        obs, lo, hi = (np.asarray(x) for x in (self.observed, self.low, self.high))
        return float(np.mean((obs >= lo) & (obs <= hi))) if self.n else float("nan")

    def calibration(self) -> tuple[float, float]:
        """Slope and intercept of observed regressed on predicted median (ideal: 1 and 0)."""
        if self.n < 3:
            return float("nan"), float("nan")
        slope, intercept = np.polyfit(np.asarray(self.median), np.asarray(self.observed), 1)
        return float(slope), float(intercept)


def score_forecast(
    forecast: Forecast,
    heldout: dict[str, np.ndarray],
    seed: int = 0,
    level: float = 0.90,
    posteriors: dict[str, LinearPosterior] | None = None,
) -> dict[str, VariableScore]:
    """Score held-out points ((n, 2): years after the forecast start, value) against the forecast.

    The predictive distribution of a measurement is the latent trajectory plus measurement noise: the
    patient's own noise (Student-t, from ``posteriors``) when given, else the population sd.
    """
    rng = np.random.default_rng(seed)
    q = [50 * (1 - level), 50.0, 50 * (1 + level)]
    out: dict[str, VariableScore] = {}
    for variable, rows in heldout.items():
        if variable not in forecast.trajectories or len(rows) == 0:
            continue
        traj = forecast.trajectories[variable]
        score = VariableScore()
        for t, value in rows:
            month = int(round(12 * t))
            if not 0 < month < traj.shape[1]:
                continue
            latent = traj[:, month]
            post = (posteriors or {}).get(variable)
            if post is not None:
                predictive = latent + post.predictive_noise(latent, rng)
            else:
                predictive = latent + noise_sd(variable, latent) * rng.standard_normal(latent.size)
            lo, med, hi = np.percentile(predictive, q)
            score.observed.append(float(value))
            score.median.append(float(med))
            score.low.append(float(lo))
            score.high.append(float(hi))
        out[variable] = score
    return out
