"""``fhirtwin-hybrid``: the mechanistic twin plus a learned, governed residual on its biomarker trajectories.

Why on top of the mechanistic twin and not a new model: it stays the anchor (published equations, cited
dynamics); the residual only adds what longitudinal data show the mechanism misses, per biomarker and shrunk
toward 0 where it did not generalise. With no residual configured, or with ``FHIRTWIN_HYBRID=off``, every
number of the forecast is the mechanistic twin's (only the model name and ``method`` say hybrid-off). It is a
subclass of :class:`MechanisticTwin`, so it drops in wherever the engine uses the mechanistic twin.

The residual is computed once per patient at ``fit`` (from a fixed-seed mechanistic forecast at the
artifact's horizons, so it does not depend on the caller's seed or draws) and added to every draw of the
trajectory: linearly from 0 at the forecast date to the first horizon, between horizons, and held at the
last trained horizon beyond it. Cumulative incidences stay the mechanistic model's (hazards are not moved by
the residual), and the caveats say so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from fhirtwin.hybrid.artifact import ResidualArtifact, configured_artifact, switched_off
from fhirtwin.hybrid.features import twin_features
from fhirtwin.sim.interventions import Scenario
from fhirtwin.sim.model import Forecast, MechanisticTwin, register_model

if TYPE_CHECKING:
    from fhirtwin.sim.inputs import PatientInputs
    from fhirtwin.twin import TwinState

#: Draws and seed of the forecast the residual's inputs are read from (fixed: the residual is per patient).
DESIGN_DRAWS, DESIGN_SEED = 200, 0


@register_model
class HybridTwin(MechanisticTwin):
    """Mechanistic twin + learned residual (see the module doc); off unless an artifact is configured.

    A subclass, so it is a drop-in wherever the mechanistic twin is used (``inputs_``, the planner)."""

    name = "fhirtwin-hybrid"
    version = "0.1.0"
    dynamic: ClassVar[bool] = True

    def __init__(self, artifact: ResidualArtifact | str | os.PathLike[str] | None = None,
                 enabled: bool | None = None, components: Iterable[str] | None = None) -> None:
        """``artifact``: a trained residual or its folder (default: ``FHIRTWIN_HYBRID_ARTIFACT``). ``enabled``:
        False forces off; None follows the deployment (``FHIRTWIN_HYBRID=off`` switches it off).
        ``components``: passed to the mechanistic twin."""
        super().__init__(components)
        if enabled is False or (enabled is None and switched_off()):
            self.artifact: ResidualArtifact | None = None
            self.off_reason = "switched off (FHIRTWIN_HYBRID=off or enabled=False)"
        else:
            self.artifact = (ResidualArtifact.load(artifact) if isinstance(artifact, str | os.PathLike)
                             else artifact if artifact is not None else configured_artifact())
            self.off_reason = "" if self.artifact is not None else "no trained residual configured"

    @property
    def active(self) -> bool:
        """Whether the residual is applied."""
        return self.artifact is not None

    def fit(self, data: TwinState | PatientInputs, as_of: date | datetime | None = None) -> Self:
        """Fit the mechanistic twin, then the patient's residual at the artifact's horizons (if on)."""

        super().fit(data, as_of)
        self.residual_: dict[str, np.ndarray] = {}
        self.interval_: dict[str, dict[float, tuple[float, float]]] = {}
        if self.artifact is None:
            return self
        inputs = self.inputs_
        twin = twin_features(inputs)
        horizons = np.asarray(self.artifact.horizons, dtype=float)
        forecast = super().simulate(horizon_years=float(horizons.max()), draws=DESIGN_DRAWS, seed=DESIGN_SEED)
        for variable, residual in self.artifact.biomarkers.items():
            current = getattr(inputs, variable, None)
            if variable not in forecast.trajectories or current is None:
                continue
            point = np.median(forecast.trajectories[variable][:, np.rint(12 * horizons).astype(int)], axis=0)
            design = np.column_stack([np.repeat(twin[None, :], horizons.size, axis=0), point,
                                      point - float(current), horizons])
            r = residual.residual(design)
            self.residual_[variable] = r
            self.interval_[variable] = {float(h): (float(p + x - residual.interval[float(h)]),
                                                   float(p + x + residual.interval[float(h)]))
                                        for h, p, x in zip(horizons, point, r, strict=True)
                                        if float(h) in residual.interval}
        return self

    def simulate(
        self, scenario: Scenario | None = None, horizon_years: float = 10.0, draws: int = 1000, seed: int = 0
    ) -> Forecast:
        """The mechanistic forecast with the residual added to the trajectories (unchanged when off)."""
        forecast = super().simulate(scenario, horizon_years, draws, seed)
        if self.artifact is None:
            return replace(forecast, method={**forecast.method,
                                             "learned_residual": {"state": "off", "reason": self.off_reason}})
        years = forecast.times_months / 12.0
        knots = np.concatenate([[0.0], self.artifact.horizons])
        trajectories = dict(forecast.trajectories)
        for variable, r in self.residual_.items():
            if variable in trajectories:
                path = np.interp(years, knots, np.concatenate([[0.0], r]))
                trajectories[variable] = np.maximum(trajectories[variable] + path[None, :], 1e-6)
        last = max(self.artifact.horizons)
        trained_with = self.artifact.training_data.get("mechanistic_components")
        mismatch = ([f"the residual was trained with mechanistic components {trained_with}, this forecast uses "
                     f"{sorted(self.components)}"] if trained_with is not None
                    and sorted(trained_with) != sorted(self.components) else [])
        caveats = [*forecast.caveats, *mismatch,
                   f"learned residual {self.artifact.version} ({self.artifact.learner}) added to biomarker "
                   f"trajectories: trained on {self.artifact.training_data.get('n_patients')} patients "
                   f"({self.artifact.training_data.get('source')}); held constant beyond {last:g} years; "
                   "cumulative incidences are the mechanistic model's"]
        method: dict[str, Any] = {**forecast.method, "learned_residual": {
            "state": "on", "artifact_version": self.artifact.version, "learner": self.artifact.learner,
            "residual_at_years": {v: dict(zip((f"{h:g}" for h in self.artifact.horizons), r.tolist(), strict=True))
                                  for v, r in self.residual_.items()},
            "shrinkage": {v: b.shrinkage for v, b in self.artifact.biomarkers.items()},
            "interval90": {v: {f"{h:g}": list(band) for h, band in bands.items()}
                           for v, bands in self.interval_.items()}}}
        return replace(forecast, method=method, trajectories=trajectories, caveats=tuple(caveats))


def configured_model(components: Iterable[str] | None = None) -> MechanisticTwin:
    """The model a deployment should run: the hybrid when a residual is configured and not switched off,
    else the mechanistic twin itself (``components`` go to the mechanistic twin either way)."""
    hybrid = HybridTwin(components=components)
    return hybrid if hybrid.active else MechanisticTwin(components)
