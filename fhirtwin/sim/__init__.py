"""Simulation: published equations, mechanistic dynamics, interventions, uncertainty.

Public entry points: :func:`inputs_from_state` (the only bridge from TwinState), the model registry
(:func:`get_model`, :func:`available_models`), :class:`Scenario`/:class:`Intervention`, and
:func:`plan` for ranking interventions. ``sim`` never imports ``fhirtwin.fhir`` or ``fhirtwin.adapters``.
"""

from fhirtwin.sim.inputs import InsufficientData, PatientInputs, inputs_from_state
from fhirtwin.sim.interventions import BASELINE, Exclusion, Intervention, Scenario, candidate_interventions
from fhirtwin.sim.model import (
    EquationTwin,
    Forecast,
    MechanisticTwin,
    TwinModel,
    available_models,
    get_model,
    register_model,
)
from fhirtwin.sim.planner import Option, Plan, plan

__all__ = [
    "BASELINE",
    "EquationTwin",
    "Exclusion",
    "Forecast",
    "InsufficientData",
    "Intervention",
    "MechanisticTwin",
    "Option",
    "PatientInputs",
    "Plan",
    "Scenario",
    "TwinModel",
    "available_models",
    "candidate_interventions",
    "get_model",
    "inputs_from_state",
    "plan",
    "register_model",
]
