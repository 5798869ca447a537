"""Synthetic PatientInputs shared by the simulation tests (no FHIR needed)."""

from __future__ import annotations

import numpy as np

from fhirtwin.sim.inputs import PatientInputs


def series(times, values) -> np.ndarray:
    """(n, 2) history array."""
    t = np.asarray(times, dtype=float)
    return np.column_stack([t, np.broadcast_to(np.asarray(values, dtype=float), t.shape)])


def patient(**overrides) -> PatientInputs:
    """A 60-year-old man with moderate risk, CKD G3a, UACR and HbA1c known, five years of flat history."""
    t = np.arange(-5.0, 0.5, 1.0)
    base = dict(
        patient_id="synthetic-1",
        sex="male",
        age_years=60.0,
        total_cholesterol_mg_dl=220.0,
        hdl_cholesterol_mg_dl=45.0,
        ldl_cholesterol_mg_dl=140.0,
        systolic_bp_mm_hg=145.0,
        egfr_ml_min_1_73m2=50.0,
        bmi_kg_m2=30.0,
        diabetes=True,
        current_smoker=True,
        on_bp_treatment=True,
        on_statin=False,
        hba1c_percent=7.5,
        uacr_mg_g=100.0,
        history_ldl_cholesterol_mg_dl=series(t, 140.0),
        history_systolic_bp_mm_hg=series(t, 145.0),
        history_egfr_ml_min_1_73m2=series(t, 50.0 - 2.0 * t),
        history_hba1c_percent=series(t, 7.5),
        history_bmi_kg_m2=series(t, 30.0),
        sources=("Observation/a/_history/1", "Patient/p/_history/2"),
    )
    base.update(overrides)
    return PatientInputs(**base)
