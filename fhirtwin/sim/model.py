"""One contract for every predictive model, a registry, and the Forecast they return.

Why: the writeback layer, the planner and the conformance test must treat every model alike (the
equations-only comparator, the mechanistic twin, learned models later). A model is calibrated to one
patient with ``fit`` (returns self; everything learned ends in ``_``), then ``simulate`` runs one
scenario into a :class:`Forecast` that is reproducible from its seed and carries its own provenance
(inputs' source references, method identity, caveats).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self

import numpy as np

from fhirtwin.sim._params import intervention_parameters
from fhirtwin.sim.calibration import LinearPosterior, calibrate
from fhirtwin.sim.components import (
    checked,
    enabled_components,
    switched_off_note,
    variables_in_use,
    without_disabled,
)
from fhirtwin.sim.contributions import ScaleContribution, scale_contributions
from fhirtwin.sim.dynamics import TRAJECTORY_VARIABLES, month_grid, simulate_trajectories
from fhirtwin.sim.ensemble import draw_parameters, summarise
from fhirtwin.sim.equations import prevent_risk
from fhirtwin.sim.guidelines import RiskCategory, risk_category
from fhirtwin.sim.hazards import (
    OUTCOMES,
    Anchors,
    after_quit_attempt,
    compute_anchors,
    coronary_share,
    cumulative_incidence,
    hazard_paths,
    prevent_kwargs,
)
from fhirtwin.sim.inputs import PatientInputs, inputs_from_state
from fhirtwin.sim.interventions import BASELINE, Scenario
from fhirtwin.sim.modifiers import ascvd_risk_with, modifier_caveats

if TYPE_CHECKING:
    from fhirtwin.twin import TwinState

MAX_HORIZON_YEARS = 30.0
COMPETING_GROUPS: tuple[tuple[str, ...], ...] = (("total_cvd", "death"),)


class NotFittedError(RuntimeError):
    """simulate() was called before fit()."""


@dataclass(frozen=True)
class Driver:
    """A main contributor to the baseline risk: the 10-year risk now and with the factor at a reference.

    ``scale`` is the biological scale of the factor (molecular ... environmental, as in the twin's
    variable registry), so a front door can show what each scale contributed. A marker beyond PREVENT
    may lower the risk (coronary calcium 0): its contribution is then negative.
    """

    factor: str
    outcome: str
    value: str
    reference: str
    risk: float
    risk_at_reference: float
    scale: str = "clinical"

    @property
    def contribution(self) -> float:
        """Absolute risk attributable to the factor (risk - risk at reference)."""
        return self.risk - self.risk_at_reference

    def to_json(self) -> dict[str, Any]:
        """Plain dict."""
        return {**self.__dict__, "contribution": self.contribution}


@dataclass(frozen=True, eq=False)
class Forecast:
    """One model's simulation of one patient under one scenario.

    ``cif[outcome]`` and ``trajectories[variable]`` are per-draw arrays (draws, months+1) at
    ``times_months``; :meth:`summary` and :meth:`at_horizon` give the median and 90% interval.
    ``death`` is non-cardiovascular death before a first CVD event; ``competing_groups`` lists sets of
    outcomes that are mutually exclusive first events (their CIFs sum to at most 1); ``scales`` says, per
    scale, whether the record had data there and whether it moved the risk (``sim.contributions``).
    """

    model: str
    model_version: str
    method: dict[str, Any]
    patient_id: str
    scenario: Scenario
    horizon_years: float
    draws: int
    seed: int
    times_months: np.ndarray
    cif: dict[str, np.ndarray]
    trajectories: dict[str, np.ndarray]
    sources: tuple[str, ...]
    drivers: tuple[Driver, ...] = ()
    caveats: tuple[str, ...] = ()
    competing_groups: tuple[tuple[str, ...], ...] = COMPETING_GROUPS
    scales: tuple[ScaleContribution, ...] = ()

    @property
    def outcomes(self) -> tuple[str, ...]:
        """Outcomes in this forecast."""
        return tuple(self.cif)

    def summary(self, outcome: str) -> dict[str, np.ndarray]:
        """Median and 5th/95th percentiles of the CIF over time."""
        return summarise(self.cif[outcome])

    def trajectory_summary(self, variable: str) -> dict[str, np.ndarray]:
        """Median and 90% band of a biomarker trajectory over time."""
        return summarise(self.trajectories[variable])

    def at_horizon(self, outcome: str, years: float | None = None) -> dict[str, float]:
        """Median and 90% interval of the CIF at ``years`` (default: the horizon)."""
        month = int(round(12 * (self.horizon_years if years is None else years)))
        if not 0 <= month <= self.times_months[-1]:
            raise ValueError(f"{years} years is outside the forecast horizon")
        s = summarise(self.cif[outcome][:, month])
        return {k: float(v) for k, v in s.items()}

    def risk_category(self, outcome: str, horizon_years: float, probability: float) -> RiskCategory | None:
        """The guideline risk category of a probability of this outcome at this horizon (None if none is defined)."""
        return risk_category(outcome, horizon_years, probability)

    def to_json(self) -> dict[str, Any]:
        """Summary (not per-draw arrays) as plain JSON, for writeback and the web pages."""
        yearly = self.times_months[::12]
        return {
            "model": self.model,
            "model_version": self.model_version,
            "method": self.method,
            "patient_id": self.patient_id,
            "scenario": self.scenario.to_json(),
            "horizon_years": self.horizon_years,
            "draws": self.draws,
            "seed": self.seed,
            "times_months": yearly.tolist(),
            "outcomes": {
                o: {
                    "at_horizon": self.at_horizon(o),
                    **{k: v[::12].tolist() for k, v in self.summary(o).items()},
                }
                for o in self.outcomes
            },
            "trajectories": {
                v: {k: a[::12].tolist() for k, a in self.trajectory_summary(v).items()} for v in self.trajectories
            },
            "sources": list(self.sources),
            "drivers": [d.to_json() for d in self.drivers],
            "scales": [s.to_json() for s in self.scales],
            "caveats": list(self.caveats),
        }


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[TwinModel]] = {}


def register_model(cls: type[TwinModel]) -> type[TwinModel]:
    """Class decorator: make a model available by its ``name`` (and to the conformance test)."""
    name = getattr(cls, "name", None)
    if not name:
        raise ValueError("a registered model needs a class attribute 'name'")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"model name {name!r} is already registered")
    _REGISTRY[name] = cls
    return cls


def available_models() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def registered_models() -> list[type[TwinModel]]:
    """The registered model classes, by name (each needs a Device when results are written)."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def get_model(name: str, **kwargs: Any) -> TwinModel:
    """A fresh, unfitted instance of a registered model."""
    try:
        return _REGISTRY[name](**kwargs)
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {available_models()}") from None


class TwinModel(ABC):
    """Contract: ``fit(state_or_inputs) -> self``; ``simulate(scenario, horizon_years, draws, seed)``."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = ""

    @abstractmethod
    def fit(self, data: TwinState | PatientInputs, as_of: date | datetime | None = None) -> Self:
        """Calibrate to one patient (TwinState or PatientInputs); learned attributes end in ``_``."""

    @abstractmethod
    def simulate(
        self, scenario: Scenario | None = None, horizon_years: float = 10.0, draws: int = 1000, seed: int = 0
    ) -> Forecast:
        """Simulate one scenario; the same seed gives the same Forecast."""

    def learned_attributes(self) -> dict[str, Any]:
        """Attributes set by fit (names ending in ``_``)."""
        return {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}


# ------------------------------------------------------------------------------------------------
# the mechanistic twin and its equations-only comparator
# ------------------------------------------------------------------------------------------------


def _as_inputs(data: TwinState | PatientInputs, as_of: date | datetime | None) -> PatientInputs:
    if isinstance(data, PatientInputs):
        return data
    return inputs_from_state(data, as_of)


_DRIVER_REFERENCES = (
    ("systolic_bp_mm_hg", "SBP", 120.0, "120 mmHg"),
    ("egfr_ml_min_1_73m2", "eGFR", 90.0, "90 mL/min/1.73m2"),
    ("bmi_kg_m2", "BMI", 25.0, "25 kg/m2"),
)
#: Scale of each PREVENT driver, as its variable's scale in the twin's registry (twin/variables.json).
_DRIVER_SCALES = {"SBP": "organ", "eGFR": "organ", "BMI": "clinical", "non-HDL cholesterol": "tissue",
                  "current smoking": "behavioral", "diabetes": "clinical"}


def compute_drivers(inputs: PatientInputs, anchors: Anchors) -> tuple[Driver, ...]:
    """Counterfactual contributions: PREVENT 10-year risk now vs with one factor at a reference value.

    Genomic drivers use the same coronary-component hazard ratio as the forecast (point estimates).
    """
    kw = prevent_kwargs(inputs, anchors.prevent_model)
    age = float(np.clip(inputs.age_years, 30, 79))
    out: list[Driver] = []
    for outcome in ("total_cvd", "heart_failure"):
        # (label, value shown, reference shown, the change): evaluated in one vectorised equation call
        asked: list[tuple[str, str, str, dict[str, Any]]] = []
        for key, label, ref, ref_text in _DRIVER_REFERENCES:
            value = getattr(inputs, key)
            worse = value > ref if key != "egfr_ml_min_1_73m2" else value < ref
            if worse and not (key == "bmi_kg_m2" and outcome != "heart_failure"):
                asked.append((label, f"{value:.0f}", ref_text, {key: ref}))
        non_hdl_ref = inputs.hdl_cholesterol_mg_dl + 3.5 / 0.02586
        if outcome == "total_cvd" and inputs.total_cholesterol_mg_dl > non_hdl_ref:
            asked.append(("non-HDL cholesterol", f"{inputs.total_cholesterol_mg_dl - inputs.hdl_cholesterol_mg_dl:.0f} "
                          "mg/dL", "135 mg/dL (3.5 mmol/L, PREVENT centre)", {"total_cholesterol_mg_dl": non_hdl_ref}))
        for flag, label in (("current_smoker", "current smoking"), ("diabetes", "diabetes")):
            if getattr(inputs, flag):
                asked.append((label, "yes", "no", {flag: 0}))
        changes: list[dict[str, Any]] = [{}] + [change for *_, change in asked]
        columns = {name: np.array([change.get(name, kw[name]) for change in changes])
                   for name in {name for change in changes for name in change}}
        risks = np.atleast_1d(prevent_risk(outcome=outcome, horizon_years=10, age_years=age, clip=True,
                                           **{**kw, **columns}))
        now = float(risks[0])
        out += [Driver(label, outcome, shown, ref_text, now, float(risk), _DRIVER_SCALES[label])
                for (label, shown, ref_text, _), risk in zip(asked, risks[1:], strict=True)]
    ascvd = anchors.published["prevent_10y_ascvd"]
    point = {name: np.array([float(spec["value"])]) for name, spec in intervention_parameters()["ratios"].items()}
    share = coronary_share()

    def with_coronary(multiplier: float) -> float:
        return float(1 - (1 - ascvd) ** (share * multiplier + 1 - share))

    if inputs.fh_variant:
        hr = float(point["fh_variant_cad_or_at_same_ldl"][0])
        out.append(Driver("FH variant", "ascvd", "carrier", "non-carrier", with_coronary(hr), ascvd, "molecular"))
    if inputs.cad_prs_z is not None and inputs.cad_prs_z > 0:
        hr = float(point["cad_prs_hr_per_sd"][0]) ** inputs.cad_prs_z
        out.append(Driver("CAD polygenic score", "ascvd", f"z = {inputs.cad_prs_z:+.2f}", "z = 0",
                          with_coronary(hr), ascvd, "molecular"))
    out = [d for d in out if d.contribution > 0.001]
    markers = [d for d in _marker_drivers(inputs, anchors, kw, age) if abs(d.contribution) > 0.001]
    return tuple(sorted(out + markers, key=lambda d: -d.contribution))


def _marker_drivers(inputs: PatientInputs, anchors: Anchors, kw: dict[str, Any], age: float) -> list[Driver]:
    """One driver per acting marker beyond PREVENT (risk with it vs at its reference), and area deprivation."""
    ascvd = anchors.published["prevent_10y_ascvd"]
    share = coronary_share()
    out = []
    for m in anchors.modifiers:
        if {"coronary", "stroke"} & set(m.components):
            risk = ascvd_risk_with(ascvd, float(np.exp(m.point_log("coronary"))),
                                   float(np.exp(m.point_log("stroke"))), share)
            out.append(Driver(m.label, "ascvd", m.shown, m.reference, risk, ascvd, m.scale))
        if "heart_failure" in m.components:
            hf = anchors.published["prevent_10y_heart_failure"]
            out.append(Driver(m.label, "heart_failure", m.shown, m.reference,
                              float(1 - (1 - hf) ** np.exp(m.point_log("heart_failure"))), hf, m.scale))
    if "sdi_decile" in kw:  # PREVENT's own SDI term: the same model at the least-deprived deciles (1-3)
        now, ref = np.atleast_1d(prevent_risk(outcome="total_cvd", horizon_years=10, age_years=age, clip=True,
                                              **{**kw, "sdi_decile": np.array([kw["sdi_decile"], 1])}))
        out.append(Driver("area deprivation (SDI)", "total_cvd", f"decile {kw['sdi_decile']}", "deciles 1-3",
                          float(now), float(ref), "environmental"))
    return out


@register_model
class MechanisticTwin(TwinModel):
    """Equation-anchored hazards moved by the patient's deviation from the expected biomarker course."""

    name = "fhirtwin-mechanistic"
    version = "0.3.0"
    dynamic: ClassVar[bool] = True

    def __init__(self, components: Iterable[str] | None = None) -> None:
        """``components``: the optional components to use (default: this deployment's, ``sim.components``)."""
        self.components = enabled_components() if components is None else checked(components)

    def fit(self, data: TwinState | PatientInputs, as_of: date | datetime | None = None) -> Self:
        """Read inputs (without the components that are off), calibrate levels and slopes, solve the anchors."""
        inputs, self.switched_off_ = without_disabled(_as_inputs(data, as_of), self.components)
        self.inputs_: PatientInputs = inputs
        self.posteriors_: dict[str, LinearPosterior] = calibrate(inputs)
        self.anchors_: Anchors = compute_anchors(inputs)
        self.drivers_: tuple[Driver, ...] = compute_drivers(inputs, self.anchors_)
        return self

    def acting_components(self) -> tuple[str, ...]:
        """The optional components that act for this patient (markers with an effect, the SDI anchor)."""
        names = [m.name for m in self.anchors_.modifiers]
        return (*names, "sdi_decile") if self.inputs_.sdi_decile is not None else tuple(names)

    def _check_fitted(self) -> None:
        if not hasattr(self, "anchors_"):
            raise NotFittedError(f"{type(self).__name__}.simulate() called before fit()")

    def simulate(
        self, scenario: Scenario | None = None, horizon_years: float = 10.0, draws: int = 1000, seed: int = 0
    ) -> Forecast:
        """Run the ensemble for one scenario (paired with any other scenario run with the same seed)."""
        self._check_fitted()
        if not 1.0 / 12.0 <= horizon_years <= MAX_HORIZON_YEARS:
            raise ValueError(f"horizon_years must be between 1 month and {MAX_HORIZON_YEARS:g} years")
        scenario = BASELINE if scenario is None else scenario
        inputs, anchors = self.inputs_, self.anchors_
        t = month_grid(horizon_years)
        params = draw_parameters(inputs, self.posteriors_, draws, seed, horizon_years,
                                 uacr_quantiles=anchors.kidney.shape[0])
        traj = simulate_trajectories(inputs, self.posteriors_, params, scenario, t, dynamic=self.dynamic)
        hz = hazard_paths(inputs, anchors, traj, params, scenario, dynamic=self.dynamic)
        cif = cumulative_incidence(hz, anchors)
        if scenario.has("smoking_cessation") is not None and inputs.current_smoker:
            cif = after_quit_attempt(hz, cif, anchors, params, 0.5 * (t[1:] + t[:-1]))
        extrapolated = [flag for flag in anchors.extrapolated if _applies(flag, horizon_years)]
        caveats = list(anchors.caveats) + [switched_off_note(c, f) for c, f in self.switched_off_]
        caveats.extend(f"extrapolated: {flag}" for flag in extrapolated)
        caveats.extend(f"default used: {d}" for d in inputs.defaults_used)
        if "hba1c_percent" not in traj.values:
            caveats.append("no HbA1c measured: HbA1c is not simulated and does not modify eGFR decline")
        if inputs.fh_variant is None and inputs.cad_prs_z is None and inputs.apol1_risk_alleles is None:
            caveats.append("no genomic results: FH, CAD polygenic score and APOL1 modifiers not applied")
        if inputs.cad_prs_z is not None:
            caveats.append("CAD polygenic score: risk-factor-adjusted hazard ratio from a European-ancestry cohort; "
                           "its effect is smaller in other ancestries")
        caveats.extend(modifier_caveats(inputs, anchors.modifiers))
        method = {
            **anchors.method,
            "engine": f"{self.name} {self.version}",
            "dynamics": ("population-expected course plus an integrated Ornstein-Uhlenbeck deviation fitted to "
                         "the patient's history" if self.dynamic else "population-expected course only"),
            "extrapolated": extrapolated,
            "published": anchors.published,
            "effects": "interventions.json",
            "parameters": "dynamics_parameters.json",
            "components_on": sorted(self.components),
        }
        return Forecast(
            model=self.name,
            model_version=self.version,
            method=method,
            patient_id=inputs.patient_id,
            scenario=scenario,
            horizon_years=float(horizon_years),
            draws=draws,
            seed=seed,
            times_months=np.arange(t.size),
            cif={o: cif[o] for o in OUTCOMES},
            trajectories={v: traj.values[v] for v in TRAJECTORY_VARIABLES if v in traj.values},
            sources=inputs.sources,
            drivers=self.drivers_,
            caveats=tuple(caveats),
            scales=scale_contributions(
                self.drivers_, dict(inputs.scales_read), variables_in_use(inputs, self.acting_components()),
                switched_off=[f for _, f in self.switched_off_]),
        )


def _applies(flag: str, horizon_years: float) -> bool:
    """Whether an extrapolation flag concerns this horizon (beyond-horizon flags only past that horizon)."""
    if "beyond 10 years" in flag or "above 79" in flag:
        return horizon_years > 10
    if "beyond 5 years" in flag:
        return horizon_years > 5
    return True


@register_model
class EquationTwin(MechanisticTwin):
    """Comparator: the anchoring equations with trial effects of interventions, but no natural history.

    Biomarkers stay at their calibrated current level except for intervention effects; hazards stay
    at the equation's value. Useful to see how much the dynamics change a forecast.
    """

    name = "fhirtwin-equations"
    version = "0.3.0"
    dynamic = False
