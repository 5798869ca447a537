"""The twin's variables across scales at a forecast date, as one numeric row per patient.

Why one home: training (rows built from staged populations) and serving (one patient's TwinState or
PatientInputs) must build the same columns in the same order, and the graph learner must know which scale
each column belongs to. Scales are read from the twin variable registry, never restated; age and sex are
demographics, counted as clinical (as in the causal graph). A value the record does not hold is NaN (both
learners take missing values), never a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fhirtwin.twin import Scale, get_variable

if TYPE_CHECKING:
    from fhirtwin.sim.inputs import PatientInputs

#: Twin variables read from PatientInputs (same names as its fields).
INPUT_VARIABLES = (
    "apol1_risk_alleles", "cad_prs_z", "fh_variant",
    "hba1c_percent",
    "ldl_cholesterol_mg_dl", "hdl_cholesterol_mg_dl", "total_cholesterol_mg_dl",
    "egfr_ml_min_1_73m2", "systolic_bp_mm_hg", "uacr_mg_g",
    "bmi_kg_m2", "diabetes", "on_bp_treatment", "on_statin", "on_sglt2i",
    "current_smoker",
    "exercise_min_per_week", "pm25_ug_m3",
)
DEMOGRAPHICS = ("age_years", "male")
#: Scale order of the graph learner's nodes.
SCALES: tuple[Scale, ...] = tuple(Scale)


@dataclass(frozen=True)
class FeatureLayout:
    """Column names of the twin part of a row and the scale of each."""

    names: tuple[str, ...]
    scales: tuple[Scale, ...]

    def columns_of(self, scale: Scale) -> list[int]:
        """Indices of the columns at one scale."""
        return [i for i, s in enumerate(self.scales) if s == scale]


def layout() -> FeatureLayout:
    """The twin feature columns (demographics first, then registry variables) with their scales."""
    names = (*DEMOGRAPHICS, *INPUT_VARIABLES)
    scales = tuple(Scale.CLINICAL if n in DEMOGRAPHICS else get_variable(n).scale for n in names)
    return FeatureLayout(names, scales)


def _number(value: object) -> float:
    if value is None:
        return float("nan")
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return float(value)
    return float("nan")


def twin_features(inputs: PatientInputs) -> np.ndarray:
    """One row of :func:`layout` columns for a patient at the forecast date, from the inputs the mechanistic
    twin ran on (so a value of a component switched off in the deployment is missing here too)."""
    row = [float(inputs.age_years), float(inputs.sex == "male")]
    row += [_number(getattr(inputs, name)) for name in INPUT_VARIABLES]
    return np.asarray(row, dtype=float)
