"""Markers beyond PREVENT: each acts as a cited, risk-factor-adjusted hazard ratio on one hazard component.

Why a separate layer: PREVENT (the anchor) already contains age, sex, lipids, blood pressure, diabetes,
smoking, BMI, eGFR and (when measured) UACR and HbA1c, so a marker may add only what those do not
explain. Every effect in ``modifiers.json`` is therefore an estimate adjusted for the conventional risk
factors (or, for coronary calcium, the ratio of two MESA models fitted jointly), applied as a constant
multiplier on the coronary, stroke or heart-failure component of the anchored cause-specific hazard.

The multiplier is MEAN-PRESERVING: m(x) / E_pop[m(X)], the published log-linear effect divided by its mean
over the cited population distribution of the marker (``population_distribution``). PREVENT is calibrated
in its derivation population, which already had that distribution of every marker it does not measure, so
a multiplier relative to an arbitrary reference level would shift the population's mean risk (Lp(a) is
right-skewed, activity saturates at 150 min/week, a log-linear marker's mean multiplier is > 1 by Jensen);
dividing by the mean keeps the anchor right on average and only redistributes risk around it. The mean is
a fixed quadrature over the (clamped) distribution, evaluated at the point estimate and per ensemble draw
(it depends on the drawn hazard ratio). The reference a driver shows is the level whose multiplier is 1.
A patient without any of these markers gets no multiplier at all
(the code path is skipped), so the forecast is the one made before markers existed. Area deprivation is
not a multiplier: with an SDI decile the anchor itself becomes PREVENT's SDI model (``hazards``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from fhirtwin.sim._params import intervention_parameters, modifier_parameters
from fhirtwin.sim.equations import coronary_calcium_ratio
from fhirtwin.sim.inputs import PatientInputs

COMPONENTS = ("coronary", "stroke", "heart_failure")
#: MESA's four race groups; the twin's race codes map to them, anything else uses the white reference.
_MESA_RACE = {"white": "white", "black": "black", "african_american": "black", "hispanic": "hispanic"}
_MESA_AGE = (45.0, 85.0)
_Z95 = 1.959963984540054
_Z75 = 0.6744897501960817  # standard-normal 75th percentile: quartiles of a normal are mean +- 0.6745 SD
#: Gauss-Legendre nodes over the unclamped range of a continuous distribution's normal scale (the
#: integrand there is smooth, so this is exact to ~1e-10); cells of the activity distribution's uniform part.
_NODES = 96
_Z_TAIL = 8.0  # a normal tail beyond 8 SD carries < 1e-15 of the probability


def modifier_table() -> dict[str, Any]:
    """The effect table (``modifiers.json``): modifiers, the SDI anchor, and the markers that do not act."""
    return modifier_parameters()


def parameter_names() -> tuple[str, ...]:
    """Every drawn effect as ``modifier:component``, in table order (the ensemble gives each its own stream)."""
    return tuple(f"{name}:{effect['component']}" for name, spec in modifier_table()["modifiers"].items()
                 for effect in spec.get("effects", ()))


@dataclass(frozen=True)
class PopulationGrid:
    """A marker's population distribution as quadrature nodes: exposure f(clamped x) / per, and weights."""

    exposure: np.ndarray
    weight: np.ndarray

    def log_mean(self, log_ratio: np.ndarray) -> np.ndarray:
        """ln E_pop[ratio ** exposure] for each log hazard ratio (any shape): the centring constant."""
        lr = np.asarray(log_ratio, dtype=float)
        powers = np.exp(lr[..., None] * self.exposure)
        out: np.ndarray = np.log(powers @ self.weight)
        return out


@dataclass(frozen=True)
class Effect:
    """One drawn hazard ratio: ``ratio ** exposure / E_pop[ratio ** X]`` multiplies ``component``."""

    parameter: str
    component: str
    value: float
    ci95: tuple[float, float]
    exposure: float
    population: PopulationGrid = field(compare=False, repr=False)

    def log_multiplier(self, ratio: np.ndarray) -> np.ndarray:
        """log of the mean-preserving multiplier for each drawn ratio (vectorised over draws)."""
        log_ratio = np.log(np.asarray(ratio, dtype=float))
        out: np.ndarray = self.exposure * log_ratio - self.population.log_mean(log_ratio)
        return out

    @property
    def log_point(self) -> float:
        """log multiplier at the point estimate."""
        return float(self.log_multiplier(np.array(self.value)))


@dataclass(frozen=True)
class ActiveModifier:
    """A modifier that acts for this patient: what is shown, its drawn effects and fixed log ratios."""

    name: str
    label: str
    scale: str
    shown: str
    reference: str
    effects: tuple[Effect, ...] = ()
    fixed_log: tuple[tuple[str, float], ...] = ()
    caveats: tuple[str, ...] = field(default=())

    def point_log(self, component: str) -> float:
        """log multiplier of one component at the point estimates (0 when it does not act on it)."""
        drawn = sum(e.log_point for e in self.effects if e.component == component)
        return drawn + sum(v for c, v in self.fixed_log if c == component)

    @property
    def components(self) -> tuple[str, ...]:
        """The components this modifier moves."""
        return tuple(dict.fromkeys([e.component for e in self.effects] + [c for c, _ in self.fixed_log]))


def draw_effect(parameter: str, rng: np.random.Generator, n: int) -> np.ndarray:
    """n draws of one effect: log-normal fitted to its published 95% CI (median = point estimate)."""
    name, component = parameter.split(":")
    spec = next(e for e in modifier_table()["modifiers"][name]["effects"] if e["component"] == component)
    lo, hi = spec["ci95"]
    sigma = (math.log(hi) - math.log(lo)) / (2 * _Z95)
    draws: np.ndarray = np.exp(math.log(spec["value"]) + sigma * rng.standard_normal(n))
    return draws


def _transform(spec: dict[str, Any]) -> Callable[[Any], Any]:
    """f of the log-linear form: natural log or identity (vectorised)."""
    return np.log if spec["transform"] == "log" else np.asarray


def _population_values(spec: dict[str, Any], sex: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Quadrature nodes (marker values) and weights of the marker's cited population distribution.

    Continuous families: the probability below and above the clamp is one point mass at each clamp limit
    (the multiplier is constant there, so this is exact), and the range in between is integrated on the
    normal scale by Gauss-Legendre against the normal density. An upper truncation keeps only the values
    for which the marker acts (hsCRP above its acute-phase limit gives no multiplier at all).
    """
    pop = spec["population_distribution"]
    family = pop["family"]
    lo, hi = (float(v) for v in spec["clamp"])
    if family == "zero_uniform_at_least":
        k = _NODES
        between = (np.arange(k) + 0.5) / k * pop["at_least"]
        rest = 1.0 - pop["p_zero"] - pop["p_at_least"]
        values = np.concatenate([[0.0], between, [pop["at_least"]]])
        weights = np.concatenate([[pop["p_zero"]], np.full(k, rest / k), [pop["p_at_least"]]])
        return values, weights
    if family == "normal":
        mu, sd = float(pop["mean"]), float(pop["sd"])
    elif family == "lognormal":
        params = pop["by_sex"][sex] if "by_sex" in pop else pop
        mu = math.log(params["median"])
        if "sd_log" in params:
            sd = float(params["sd_log"])
        elif "q25" in params:
            sd = math.log(params["q75"] / params["q25"]) / (2 * _Z75)
        else:
            sd = math.log(params["spread_p97_5"] / params["spread_median"]) / _Z95
    else:
        raise ValueError(f"unknown population family {family!r}")

    def z_of(x: float) -> float:
        if family == "lognormal":
            return -_Z_TAIL if x <= 0.0 else min(max((math.log(x) - mu) / sd, -_Z_TAIL), _Z_TAIL)
        return min(max((x - mu) / sd, -_Z_TAIL), _Z_TAIL)

    z_top = z_of(float(spec[pop["truncate_above"]])) if "truncate_above" in pop else _Z_TAIL
    z_lo, z_hi = z_of(lo), min(z_of(hi), z_top)
    t, w = np.polynomial.legendre.leggauss(_NODES)
    z = z_lo + (t + 1.0) * (z_hi - z_lo) / 2.0
    inner = np.exp(mu + sd * z) if family == "lognormal" else mu + sd * z
    values = np.concatenate([[lo], inner, [hi]])
    weights = np.concatenate([[norm.cdf(z_lo)], w * norm.pdf(z) * (z_hi - z_lo) / 2.0,
                              [norm.cdf(z_top) - norm.cdf(z_hi)]])
    return values, weights / weights.sum()


@lru_cache(maxsize=64)
def population_grid(name: str, per: float, sex: str | None = None) -> PopulationGrid:
    """The quadrature of one modifier's clamped exposure f(x) / per over its population (cached)."""
    spec = modifier_table()["modifiers"][name]
    values, weights = _population_values(spec, sex)
    lo, hi = spec["clamp"]
    exposure = _transform(spec)(np.clip(values, lo, hi)) / per
    return PopulationGrid(np.asarray(exposure, dtype=float), weights)


def _sex_key(spec: dict[str, Any], sex: str | None) -> str | None:
    return sex if "by_sex" in spec["population_distribution"] else None


@lru_cache(maxsize=64)
def reference_level(name: str, sex: str | None = None) -> float:
    """The marker level whose multiplier is 1 at the point estimates (a population-typical value).

    With coronary and stroke effects it is the level at which the share-weighted ASCVD multiplier is 1,
    so a patient there gets exactly the anchored ASCVD risk.
    """
    spec = modifier_table()["modifiers"][name]
    lo, hi = (float(v) for v in spec["clamp"])
    f = _transform(spec)
    share = float(intervention_parameters()["coronary_share_of_ascvd"]["value"])
    weight = {"coronary": share, "stroke": 1.0 - share, "heart_failure": 1.0}
    key = _sex_key(spec, sex)
    terms = [(weight[e["component"]], math.log(e["value"]), float(e["per"]),
              population_grid(name, float(e["per"]), key)) for e in spec["effects"]]

    def excess(x: float) -> float:
        return sum(w * math.exp(b * float(f(x)) / per - float(grid.log_mean(np.array(b))))
                   for w, b, per, grid in terms) - 1.0

    return float(brentq(excess, lo, hi, xtol=1e-12, rtol=1e-14))


def _log_linear(name: str, x: float, shown: str, caveats: tuple[str, ...] = (), sex: str | None = None
                ) -> ActiveModifier:
    spec = modifier_table()["modifiers"][name]
    lo, hi = spec["clamp"]
    held = min(max(x, lo), hi)
    f = _transform(spec)
    key = _sex_key(spec, sex)
    effects = tuple(Effect(f"{name}:{e['component']}", e["component"], float(e["value"]),
                           (float(e["ci95"][0]), float(e["ci95"][1])), float(f(held)) / float(e["per"]),
                           population_grid(name, float(e["per"]), key))
                    for e in spec["effects"])
    notes = list(caveats)
    if held != x:
        notes.append(f"{spec['label']} {x:g} {spec['unit']} held at {held:g} for its effect ({spec['clamp_source']})")
    reference = f"{reference_level(name, key):.3g} {spec['unit']}, population-typical"
    return ActiveModifier(name, spec["label"], spec["scale"], shown, reference, effects, (), tuple(notes))


def _lipoprotein_a(inputs: PatientInputs) -> ActiveModifier | None:
    spec = modifier_table()["modifiers"]["lipoprotein_a"]
    if inputs.lpa_nmol_l is not None:
        return _log_linear("lipoprotein_a", inputs.lpa_nmol_l, f"{inputs.lpa_nmol_l:g} nmol/L")
    if inputs.lpa_mg_dl is None:
        return None
    factor = float(spec["mass_unit"]["nmol_l_per_mg_dl"])
    return _log_linear("lipoprotein_a", inputs.lpa_mg_dl * factor, f"{inputs.lpa_mg_dl:g} mg/dL",
                       (spec["mass_unit"]["flag"],))


def _hscrp(inputs: PatientInputs) -> tuple[ActiveModifier | None, tuple[str, ...]]:
    if inputs.hscrp_mg_l is None:
        return None, ()
    spec = modifier_table()["modifiers"]["hscrp"]
    if inputs.hscrp_mg_l > spec["not_used_above"]:
        return None, (f"hsCRP {inputs.hscrp_mg_l:g} mg/L is above {spec['not_used_above']:g} mg/L (acute-phase "
                      "range): not used for cardiovascular risk; repeat when well",)
    return _log_linear("hscrp", inputs.hscrp_mg_l, f"{inputs.hscrp_mg_l:g} mg/L"), ()


def mesa_race(race: str | None) -> tuple[str, str | None]:
    """MESA race group for the twin's race code, and a caveat when it had to fall back to the reference."""
    group = _MESA_RACE.get(race or "")
    if group is not None:
        return group, None
    return "white", (f"coronary calcium: race {race or 'not recorded'} is not one of MESA's four groups; the "
                     "white reference group's coefficients are used")


def cac_log_ratio(inputs: PatientInputs) -> tuple[float, tuple[str, ...]]:
    """ln(MESA-with-CAC / MESA-without-CAC 10-year cumulative hazard) at this patient's risk factors."""
    assert inputs.cac_agatston is not None
    race, race_note = mesa_race(inputs.race)
    notes = [n for n in (race_note,) if n is not None]
    notes.append("coronary calcium: family history of MI is not read and is taken as absent in both MESA models")
    if not _MESA_AGE[0] <= inputs.age_years <= _MESA_AGE[1]:
        notes.append(f"coronary calcium: age {inputs.age_years:.0f} outside MESA's 45-85; evaluated at the range limit")
    ratio = coronary_calcium_ratio(
        sex=inputs.sex, age_years=inputs.age_years, race=race, total_cholesterol_mg_dl=inputs.total_cholesterol_mg_dl,
        hdl_cholesterol_mg_dl=inputs.hdl_cholesterol_mg_dl, systolic_bp_mm_hg=inputs.systolic_bp_mm_hg,
        on_lipid_lowering=int(inputs.on_statin), on_bp_treatment=int(inputs.on_bp_treatment),
        diabetes=int(inputs.diabetes), current_smoker=int(inputs.current_smoker), family_history_mi=0,
        cac_agatston=inputs.cac_agatston, clip=True)
    return math.log(float(ratio)), tuple(notes)


def _coronary_calcium(inputs: PatientInputs) -> ActiveModifier | None:
    if inputs.cac_agatston is None:
        return None
    spec = modifier_table()["modifiers"]["coronary_calcium"]
    log_ratio, notes = cac_log_ratio(inputs)
    return ActiveModifier("coronary_calcium", spec["label"], spec["scale"], f"{inputs.cac_agatston:g} (Agatston)",
                          "not measured (MESA without CAC)", (), ((spec["component"], log_ratio),), notes)


def active_modifiers(inputs: PatientInputs) -> tuple[ActiveModifier, ...]:
    """The modifiers that act for this patient, in table order (empty without any marker)."""
    found: list[ActiveModifier | None] = [_lipoprotein_a(inputs), _hscrp(inputs)[0], _coronary_calcium(inputs)]
    if inputs.exercise_min_per_week is not None:
        found.append(_log_linear("physical_activity", inputs.exercise_min_per_week,
                                 f"{inputs.exercise_min_per_week:g} min/week"))
    if inputs.nt_probnp_pg_ml is not None:
        found.append(_log_linear("nt_probnp", inputs.nt_probnp_pg_ml, f"{inputs.nt_probnp_pg_ml:g} pg/mL",
                                 sex=inputs.sex))
    if inputs.pm25_ug_m3 is not None:
        found.append(_log_linear("pm25", inputs.pm25_ug_m3, f"{inputs.pm25_ug_m3:g} ug/m3"))
    return tuple(m for m in found if m is not None)


def modifier_caveats(inputs: PatientInputs, active: tuple[ActiveModifier, ...]) -> tuple[str, ...]:
    """What a reader must know about the markers used or read but not used (empty without any marker)."""
    table = modifier_table()
    notes: list[str] = [c for m in active for c in m.caveats]
    notes += list(_hscrp(inputs)[1])
    notes += [f"{m.label}: confidence {table['modifiers'][m.name]['confidence']} "
              f"({table['modifiers'][m.name]['confidence_reason']})"
              for m in active if table["modifiers"][m.name]["confidence"] == "C"]
    for variable, spec in table["not_acting"].items():
        if getattr(inputs, variable) is not None:
            notes.append(f"{spec['label']}: {spec['reason']}")
    return tuple(dict.fromkeys(notes))


def component_multipliers(active: tuple[ActiveModifier, ...], draws: dict[str, np.ndarray], n: int
                          ) -> dict[str, np.ndarray]:
    """Hazard multiplier per draw (n,) of every component some active modifier moves (each centred per draw)."""
    log_m: dict[str, np.ndarray] = {}
    for m in active:
        for e in m.effects:
            log_m[e.component] = log_m.get(e.component, np.zeros(n)) + e.log_multiplier(draws[e.parameter][:n])
        for component, value in m.fixed_log:
            log_m[component] = log_m.get(component, np.zeros(n)) + value
    return {c: np.exp(v) for c, v in log_m.items()}


def ascvd_risk_with(risk: float, coronary: float, stroke: float, share: float) -> float:
    """10-year ASCVD risk when the coronary and stroke parts of its cumulative hazard are multiplied.

    ``share`` is the coronary share of first ASCVD events; the cumulative hazard -ln(1 - risk) is the
    scale on which hazard ratios multiply (as in the engine's coronary genomic drivers).
    """
    return float(1.0 - (1.0 - risk) ** (share * coronary + (1.0 - share) * stroke))


def method_entry(active: tuple[ActiveModifier, ...]) -> dict[str, Any]:
    """Which modifiers acted, with their citation and confidence (for the forecast's ``method``)."""
    table = modifier_table()["modifiers"]
    return {"data_file": "modifiers.json",
            "acting": {m.name: {"scale": m.scale, "value": m.shown, "reference": m.reference,
                                "components": list(m.components), "citation": table[m.name]["citation"],
                                "confidence": table[m.name]["confidence"]} for m in active}}
