"""The in-silico trial specification (format ``fhirtwin-trial/1``), validated at the boundary.

Why strict: a trial spec is a contract written by hand from a publication. A misspelt field or an
unknown intervention kind must be a clear error, never silently ignored (a replication that quietly
dropped the treatment would "validate" anything). Keys starting with ``_`` (``_provenance``) are notes
for readers and are kept, not interpreted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

FORMAT = "fhirtwin-trial/1"
OUTCOMES = ("total_cvd", "ascvd", "heart_failure", "kidney_failure", "kidney_composite")


class TrialSpecError(ValueError):
    """A trial spec that does not follow ``fhirtwin-trial/1``; the message names the offending fields."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normal(_Strict):
    """A normal marginal, truncated to [min, max] when given."""

    mean: float
    sd: float = Field(gt=0)
    min: float | None = None
    max: float | None = None


class LogNormal(_Strict):
    """A log-normal marginal fitted to a published median and interquartile range."""

    median: float = Field(gt=0)
    q1: float = Field(gt=0)
    q3: float = Field(gt=0)
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> LogNormal:
        if not self.q1 < self.median < self.q3:
            raise ValueError("need q1 < median < q3")
        return self


Marginal = Normal | LogNormal
Fraction = Annotated[float, Field(ge=0, le=1)]


class Population(_Strict):
    """The trial's aggregate baseline table."""

    n_virtual: int = Field(ge=10)
    seed: int = 1
    age_years: Marginal
    systolic_bp_mm_hg: Marginal
    total_cholesterol_mg_dl: Marginal
    hdl_cholesterol_mg_dl: Marginal
    ldl_cholesterol_mg_dl: Marginal | None = None
    egfr_ml_min_1_73m2: Marginal
    uacr_mg_g: Marginal | None = None
    hba1c_percent: Marginal | None = None
    bmi_kg_m2: Marginal
    female: Fraction
    black: Fraction = 0.0
    current_smoker: Fraction
    diabetes: Fraction
    established_ascvd: Fraction = 0.0
    heart_failure: Fraction = 0.0
    ckd: Fraction = 0.0
    on_statin: Fraction = 0.0
    on_bp_treatment: Fraction = 0.0


class Placebo(_Strict):
    kind: Literal["placebo"]


class Statin(_Strict):
    kind: Literal["statin"]
    intensity: Literal["moderate", "high"]
    agent: str | None = None
    dose_mg: float | None = Field(default=None, gt=0)


class LdlLowering(_Strict):
    kind: Literal["ldl_lowering"]
    percent: float = Field(gt=0, lt=100)
    agent: str | None = None


class SbpLowering(_Strict):
    kind: Literal["sbp_lowering"]
    mm_hg: float = Field(gt=0, lt=60)


class Sglt2Inhibitor(_Strict):
    kind: Literal["sglt2_inhibitor"]
    agent: str | None = None


class SmokingCessation(_Strict):
    kind: Literal["smoking_cessation"]


ArmItem = Annotated[Placebo | Statin | LdlLowering | SbpLowering | Sglt2Inhibitor | SmokingCessation,
                    Field(discriminator="kind")]


class Arms(_Strict):
    control: list[ArmItem] = Field(min_length=1)
    treatment: list[ArmItem] = Field(min_length=1)


class Published(_Strict):
    control_cumulative_incidence: float = Field(gt=0, lt=1)
    hazard_ratio: float = Field(gt=0)
    hazard_ratio_ci95: tuple[float, float]

    @model_validator(mode="after")
    def _ci_holds_hr(self) -> Published:
        lo, hi = self.hazard_ratio_ci95
        if not 0 < lo <= self.hazard_ratio <= hi:
            raise ValueError("hazard_ratio_ci95 must contain hazard_ratio")
        return self


class TrialSpec(_Strict):
    """One published randomised trial: baseline table, arms, follow-up, outcome and published result."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    format: Literal["fhirtwin-trial/1"]
    name: str = Field(min_length=1)
    citation: str = Field(min_length=1)
    population: Population
    arms: Arms
    follow_up_years: float = Field(gt=0, le=30)
    outcome: Literal["total_cvd", "ascvd", "heart_failure", "kidney_failure", "kidney_composite"]
    outcome_note: str = ""
    published: Published
    provenance: dict[str, Any] | None = Field(default=None, alias="_provenance")


def _strip_notes(value: Any) -> Any:
    """Drop reader notes (keys starting with ``_``) below the top level, where the format allows none."""
    if isinstance(value, dict):
        return {k: _strip_notes(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_strip_notes(v) for v in value]
    return value


def parse_spec(data: dict[str, Any]) -> TrialSpec:
    """A validated TrialSpec, or TrialSpecError listing every problem (field path and reason)."""
    if not isinstance(data, dict):
        raise TrialSpecError("a trial spec is a JSON object")
    body = {k: (v if k == "_provenance" else _strip_notes(v)) for k, v in data.items()}
    try:
        return TrialSpec.model_validate(body)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise TrialSpecError(f"not a {FORMAT} spec: {problems}") from None


def load_spec(path: str | Path) -> TrialSpec:
    """Read and validate one spec file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise TrialSpecError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TrialSpecError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    return parse_spec(data)
