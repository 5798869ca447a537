"""Optional engine components: which are on, by governance default and by deployment choice.

Why: every mechanism added beyond the anchoring equations (a marker's hazard ratio, PREVENT's SDI anchor)
must pass the subgroup-calibration gate of :mod:`fhirtwin.validation.governance` before it is on by
default, and a deployment must be able to switch any of them off (or a gated one on) without code. The
components are the modifiers and anchors of ``modifiers.json`` (one home: their input variables are named
there); the verdicts are in ``components.json``, written by ``fhirtwin validate governance``. A component
that is off is not used: its inputs are dropped before the model sees them, so the forecast is the one made
without that datum, and the record says the value was recorded but not used.

Deployment override: ``FHIRTWIN_COMPONENTS="pm25=off,coronary_calcium=on"`` (names as listed by
:func:`component_names`); an unknown name or state is an error, not ignored.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

from fhirtwin.sim._params import modifier_parameters
from fhirtwin.sim.inputs import PatientInputs

ENV_VARIABLE = "FHIRTWIN_COMPONENTS"
VERDICTS_FILE = "components.json"


class ComponentSettingError(ValueError):
    """A component override names an unknown component or a state other than on/off."""


def component_inputs() -> dict[str, tuple[str, ...]]:
    """Each component and the PatientInputs fields it reads (from ``modifiers.json``)."""
    table = modifier_parameters()
    out: dict[str, tuple[str, ...]] = {}
    for name, spec in table["modifiers"].items():
        fields = [spec["variable"]]
        if "mass_unit" in spec:
            fields.append(spec["mass_unit"]["variable"])
        out[name] = tuple(fields)
    for name, spec in table["anchors"].items():
        out[name] = (spec["variable"],)
    return out


def component_names() -> tuple[str, ...]:
    """Every optional component, in table order."""
    return tuple(component_inputs())


@cache
def verdicts() -> dict[str, Any]:
    """The shipped governance verdicts (``components.json``); empty when none was generated."""
    path = resources.files("fhirtwin.sim").joinpath(VERDICTS_FILE)
    if not path.is_file():
        return {}
    data: dict[str, Any] = json.loads(path.read_text("utf-8"))
    return data


def default_on(name: str) -> bool:
    """The governance verdict's default; without a verdict, on only for a published anchor equation (PREVENT's
    SDI model), never for a mechanism fhirtwin adds."""
    verdict = verdicts().get("components", {}).get(name)
    if verdict is not None:
        return bool(verdict["default_on"])
    return name in modifier_parameters()["anchors"]


def checked(names: Iterable[str]) -> frozenset[str]:
    """``names`` as a set, refusing any that is not a component (a typo would silently switch one off)."""
    out = frozenset(names)
    unknown = sorted(out - set(component_names()))
    if unknown:
        raise ComponentSettingError(f"unknown component(s) {unknown}; known: {sorted(component_names())}")
    return out


def parse_overrides(text: str) -> dict[str, bool]:
    """``"a=on,b=off"`` -> {"a": True, "b": False}; typed error for anything else."""
    known = set(component_names())
    out: dict[str, bool] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, state = part.partition("=")
        name, state = name.strip(), state.strip().lower()
        if name not in known:
            raise ComponentSettingError(f"{ENV_VARIABLE}: unknown component {name!r}; known: {sorted(known)}")
        if state not in ("on", "off"):
            raise ComponentSettingError(f"{ENV_VARIABLE}: {name} must be 'on' or 'off', not {state!r}")
        out[name] = state == "on"
    return out


def enabled_components(environ: Mapping[str, str] | None = None) -> frozenset[str]:
    """The components on in this deployment: the governance defaults, then the environment's overrides."""
    env = os.environ if environ is None else environ
    on = {name for name in component_names() if default_on(name)}
    for name, state in parse_overrides(env.get(ENV_VARIABLE, "")).items():
        (on.add if state else on.discard)(name)
    return frozenset(on)


def without_disabled(inputs: PatientInputs, enabled: frozenset[str]
                     ) -> tuple[PatientInputs, tuple[tuple[str, str], ...]]:
    """The inputs with every disabled component's fields dropped (and the resource versions only they came
    from, so Provenance does not name them as inputs), and the (component, field) pairs that were dropped."""
    dropped: dict[str, Any] = {}
    pairs: list[tuple[str, str]] = []
    for name, fields in component_inputs().items():
        if name in enabled:
            continue
        for field in fields:
            if getattr(inputs, field) is not None:
                dropped[field] = None
                pairs.append((name, field))
    if not dropped:
        return inputs, ()
    used = tuple(v for v in inputs.variables_used if v not in dropped)
    kept = {ref for v, refs in inputs.sources_by_variable if v not in dropped for ref in refs}
    only_dropped = {ref for v, refs in inputs.sources_by_variable if v in dropped for ref in refs} - kept
    sources = tuple(ref for ref in inputs.sources if ref not in only_dropped)
    by_variable = tuple((v, refs) for v, refs in inputs.sources_by_variable if v not in dropped)
    return (dataclasses.replace(inputs, variables_used=used, sources=sources, sources_by_variable=by_variable,
                                **dropped), tuple(pairs))


def switched_off_note(component: str, field: str) -> str:
    """The caveat of a recorded value a switched-off component did not use."""
    return (f"{field} recorded but not used: component {component!r} is off in this deployment (see the model "
            "card's component governance)")


def variables_in_use(inputs: PatientInputs, acting: Iterable[str]) -> tuple[str, ...]:
    """What the model took a value from: every variable it read except the markers, of which only those of the
    ``acting`` components (the first recorded field of each: Lp(a) in nmol/L before mg/dL)."""
    from fhirtwin.sim.inputs import MARKER_VARIABLES

    fields = component_inputs()
    in_use = {next((f for f in fields[name] if getattr(inputs, f) is not None), "") for name in acting}
    return tuple(v for v in inputs.variables_used if v not in MARKER_VARIABLES or v in in_use)
