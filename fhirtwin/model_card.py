"""The machine-readable model card: ONC HTI-1 source attributes of one model version, as JSON, HTML and a
FHIR ``Library``.

Why a function and not a file: part of the card is facts that already live in code (model names and
versions, the package version, the scope rules, the input features) and part is results that are
generated (``docs/validation/trials.json`` and ``calibration.json``). Restating either by hand would let
the card drift from what the engine does, so :func:`model_card` reads them each time. The fixed
statements, restated from ``fhirtwin/model-card.md``, are in ``model_card_attributes.json`` with the
attribute list of 45 CFR 170.315(b)(11)(iv)(B) and where each value is documented.

Validation results are read from the source checkout (``docs/validation/`` next to the package's
``pyproject.toml``); an installed wheel has none, and the attributes then say "not generated in this
installation" rather than anything from memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fhirtwin import __version__
from fhirtwin.sim import scope
from fhirtwin.sim.inputs import PatientInputs
from fhirtwin.sim.model import MechanisticTwin, TwinModel, registered_models
from fhirtwin.validation.calibration import OE_RANGE, SLOPE_RANGE
from fhirtwin.validation.report import CONTROL_TOLERANCE
from fhirtwin.vocabulary import CONCEPTS
from fhirtwin.writeback.library import library_id, library_resource, model_card_url

FORMAT = "fhirtwin-model-card/1"
NOT_GENERATED = "not generated in this installation"
#: Largest calibration.json of an unknown format embedded whole (bytes); a larger one is referenced by digest.
EMBED_LIMIT = 200_000
#: The event-level calibration report of ``fhirtwin validate cohort`` (fhirtwin.validation.calibration).
CALIBRATION_FORMAT = "fhirtwin-calibration/1"


def static_attributes() -> dict[str, Any]:
    """``model_card_attributes.json`` as shipped in the package."""
    data: dict[str, Any] = json.loads((resources.files("fhirtwin") / "model_card_attributes.json").read_text("utf-8"))
    return data


def source_validation_dir() -> Path | None:
    """``docs/validation`` of the source checkout this package runs from, or None (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        return None
    folder = root / "docs" / "validation"
    return folder if folder.is_dir() else None


def source_trials_dir() -> Path | None:
    """``validation/trials`` (the trial specs) of the source checkout, or None."""
    root = Path(__file__).resolve().parent.parent
    folder = root / "validation" / "trials"
    return folder if (root / "pyproject.toml").is_file() and folder.is_dir() else None


def _model_class(model: str | None) -> type[TwinModel]:
    classes = {cls.name: cls for cls in registered_models()}
    name = model or MechanisticTwin.name
    if name not in classes:
        raise KeyError(f"unknown model {name!r}; available: {sorted(classes)}")
    return classes[name]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None


class _Context:
    """What the fillers read: the model, its version and the generated results (or None)."""

    def __init__(self, model: type[TwinModel], validation_dir: Path | None, trials_dir: Path | None,
                 development: list[str]) -> None:
        self.model = model
        self.version = model.version
        self.development = set(development)
        self.trials_path = validation_dir / "trials.json" if validation_dir else None
        self.calibration_path = validation_dir / "calibration.json" if validation_dir else None
        trials = _read_json(self.trials_path) if self.trials_path and self.trials_path.is_file() else None
        self.trials: list[dict[str, Any]] | None = (
            [t for t in trials if isinstance(t, dict)] if isinstance(trials, list) else None)
        self.calibration_bytes = (self.calibration_path.read_bytes()
                                  if self.calibration_path and self.calibration_path.is_file() else None)
        self.calibration: Any = None
        if self.calibration_bytes is not None:
            try:
                self.calibration = json.loads(self.calibration_bytes)
            except ValueError:
                self.calibration = None
        self.trials_dir = trials_dir
        #: The attribute's entry in model_card_attributes.json (set per attribute).
        self.static: dict[str, Any] = {}


# ------------------------------------------------------------------------------------------ fillers


def _release(ctx: _Context) -> tuple[Any, str]:
    return {
        "name": f"fhirtwin {ctx.model.name}",
        "model": ctx.model.name,
        "model_version": ctx.version,
        "software_version": __version__,
        "model_description": CONCEPTS.get(ctx.model.name, ""),
        "other_models_in_this_release": [f"{c.name} {c.version}" for c in registered_models()
                                         if c is not ctx.model],
        "canonical_url": model_card_url(ctx.model.name, ctx.version),
    }, "filled"


def _population(ctx: _Context) -> tuple[Any, str]:
    return {
        "description": (f"Adults aged {scope.PREVENT_MIN_AGE}-{scope.PREVENT_MAX_AGE} years without established "
                        "cardiovascular disease (primary prevention), with or without chronic kidney disease, "
                        f"with eGFR >= {scope.EGFR_KIDNEY_FAILURE:g} mL/min/1.73 m2 and not on kidney replacement "
                        "therapy or pregnant: the populations in which PREVENT and KFRE were derived."),
        "in_scope_code": scope.IN_SCOPE,
        "in_scope_display": CONCEPTS[scope.IN_SCOPE],
        "age_years": [scope.PREVENT_MIN_AGE, scope.PREVENT_MAX_AGE],
        "kidney_failure_egfr_below": scope.EGFR_KIDNEY_FAILURE,
    }, "filled"


def _out_of_scope(ctx: _Context) -> tuple[Any, str]:
    """Every scope exclusion in the order ``decide_scope`` applies it (first match wins)."""
    order = [code for code, _ in scope.EXCLUSIONS]
    order.insert(order.index("scope-heart-failure"), scope.KIDNEY_FAILURE)
    order.append(scope.AGE_OUT_OF_RANGE)
    return {
        "no_forecast_for": [{"code": code, "display": CONCEPTS[code]} for code in order],
        "what_happens": ("No primary-prevention forecast is made: the RiskAssessment/CarePlan carry the coded "
                         "decision (scope-decision extension), $simulate answers 422 not-supported, the CDS card "
                         "says why and shows no number."),
        "tasks_not_supported": ["children", "acute care", "automated treatment decisions",
                                "secondary prevention (no secondary-prevention model in this version)"],
    }, "filled"


def _input_features(ctx: _Context) -> tuple[Any, str]:
    fields = [f.name for f in dataclasses.fields(PatientInputs)]
    return {"patient_inputs": fields,
            "required": [f.name for f in dataclasses.fields(PatientInputs)
                         if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING],
            "use_of_demographic_and_social_variables": ctx.static["demographic_use"]}, "filled"


def _fairness_approach(ctx: _Context) -> tuple[Any, str]:
    value = list(ctx.static["value"])
    if ctx.calibration_bytes is None:
        value.append(f"Subgroup calibration report (docs/validation/calibration.json): {NOT_GENERATED}.")
    return value, "filled"


def _trial_populations(ctx: _Context) -> tuple[Any, str]:
    if ctx.trials_dir is None:
        return f"Trial specifications (validation/trials): {NOT_GENERATED}.", "incomplete"
    rows = []
    for path in sorted(ctx.trials_dir.glob("*.json")):
        spec = _read_json(path)
        if not isinstance(spec, dict) or not isinstance(spec.get("population"), dict):
            continue
        pop = spec["population"]
        age = pop.get("age_years") if isinstance(pop.get("age_years"), dict) else {}
        rows.append({"trial": spec.get("name", path.stem),
                     "set": "development" if spec.get("name") in ctx.development else "held-out",
                     "age_mean_years": age.get("mean"), "female_fraction": pop.get("female"),
                     "black_fraction": pop.get("black"), "current_smoker_fraction": pop.get("current_smoker"),
                     "citation": spec.get("citation")})
    note = ("Published baseline tables; ethnicity, language, sexual orientation, gender identity and social "
            "determinants are not in the trial specifications.")
    return {"trials": rows, "note": note}, "filled" if rows else "incomplete"


def _validity_same_source(ctx: _Context) -> tuple[Any, str]:
    value: dict[str, Any] = {"published_checks": list(ctx.static["value"])}
    value["calibration_report"] = _calibration_summary(ctx)
    return value, "filled"


def _known_calibration(ctx: _Context) -> dict[str, Any] | None:
    data = ctx.calibration
    return data if isinstance(data, dict) and data.get("format") == CALIBRATION_FORMAT else None


def _calibration_summary(ctx: _Context) -> Any:
    """Validity on the event-level virtual cohort: the overall rows and the biomarker coverage per subset."""
    if ctx.calibration_bytes is None or ctx.calibration_path is None:
        return f"docs/validation/calibration.json: {NOT_GENERATED}"
    head = {"file": "docs/validation/calibration.json", "sha256": hashlib.sha256(ctx.calibration_bytes).hexdigest()}
    known = _known_calibration(ctx)
    if known is not None:
        keys = ("format", "generator", "n_virtual", "seed", "draws", "horizons_years", "outcomes", "discrimination",
                "overall", "biomarker_coverage")
        return head | {k: known[k] for k in keys if k in known}
    if ctx.calibration is None:
        return head | {"error": "not valid JSON"}
    if len(ctx.calibration_bytes) > EMBED_LIMIT:
        return head | {"note": f"unknown format, larger than {EMBED_LIMIT} bytes: not embedded"}
    return head | {"results": ctx.calibration}


def _subgroup_parts(data: Any, path: str = "") -> dict[str, Any]:
    """Every part of a report whose key names subgroups or fairness (the report's own structure is kept)."""
    found: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if any(word in str(key).lower() for word in ("subgroup", "fairness")):
                found[where] = value
            else:
                found.update(_subgroup_parts(value, where))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found.update(_subgroup_parts(value, f"{path}[{i}]"))
    return found


def _fairness_same_source(ctx: _Context) -> tuple[Any, str]:
    """Subgroup calibration (sex, race as recorded, age band, CKD stage, diabetes) and its flags."""
    if ctx.calibration_bytes is None:
        return f"Subgroup calibration (docs/validation/calibration.json): {NOT_GENERATED}.", "not-generated"
    flags = {"observed_expected_outside": list(OE_RANGE), "calibration_slope_outside": list(SLOPE_RANGE)}
    known = _known_calibration(ctx)
    if known is not None:
        flagged = known.get("flagged") or []
        return {"source": "docs/validation/calibration.json", "flag_rule": known.get("flag_rule", flags),
                "flagged_count": len(flagged), "flagged": flagged, "subgroups": known.get("subgroups") or [],
                "component_governance": component_governance()}, "filled"
    parts = _subgroup_parts(ctx.calibration)
    if not parts:
        return "docs/validation/calibration.json has no subgroup or fairness results.", "incomplete"
    return {"flags": flags, "results": parts, "component_governance": component_governance()}, "filled"


def component_governance() -> dict[str, Any]:
    """Each optional component's subgroup-calibration verdict and default (``fhirtwin validate governance``)."""
    from fhirtwin.sim.components import enabled_components, verdicts

    data = verdicts()
    if not data:
        return {"note": f"fhirtwin/sim/components.json: {NOT_GENERATED}; every optional component is off"}
    shown = ("default_on", "reason", "patients_affected", "flags_without", "flags_with")
    return {"source": "fhirtwin/sim/components.json", "rule": data["rule"]["text"], "cohort": data["cohort"],
            "components": {name: {k: v[k] for k in shown} | {"worsened": [w["text"] for w in v["worsened"]]}
                           for name, v in data["components"].items()},
            "on_in_this_deployment": sorted(enabled_components())}


def _trial_row(row: dict[str, Any], development: set[str]) -> dict[str, Any]:
    raw = row.get("published")
    published: dict[str, Any] = raw if isinstance(raw, dict) else {}
    ratio = row.get("control_ratio_to_published")
    hr_in = bool(row.get("hr_within_published_ci95"))
    both = hr_in and isinstance(ratio, int | float) and abs(float(ratio) - 1) <= CONTROL_TOLERANCE
    return {"trial": row.get("name"), "set": "development" if row.get("name") in development else "held-out",
            "outcome": row.get("outcome"), "follow_up_years": row.get("follow_up_years"),
            "n_virtual": row.get("n_virtual"), "draws": row.get("draws"),
            "control_incidence_published": published.get("control_cumulative_incidence"),
            "control_incidence_simulated": row.get("control_cumulative_incidence"),
            "control_ratio_to_published": ratio,
            "hazard_ratio_published": published.get("hazard_ratio"),
            "hazard_ratio_published_ci95": published.get("hazard_ratio_ci95"),
            "hazard_ratio_simulated": row.get("hazard_ratio"),
            "hazard_ratio_simulated_interval90": row.get("hazard_ratio_interval90"),
            "hr_within_published_ci95": hr_in, "meets_both_checks": both}


def _validity_external(ctx: _Context) -> tuple[Any, str]:
    if ctx.trials is None:
        return f"In-silico trial replications (docs/validation/trials.json): {NOT_GENERATED}.", "not-generated"
    rows = [_trial_row(r, ctx.development) for r in ctx.trials]

    def share(subset: list[dict[str, Any]]) -> dict[str, Any]:
        met = sum(r["meets_both_checks"] for r in subset)
        return {"trials": len(subset), "meet_both_checks": met,
                "hr_within_published_ci95": sum(r["hr_within_published_ci95"] for r in subset),
                "share_meeting_both": round(met / len(subset), 3) if subset else None}

    return {"source": "docs/validation/trials.json",
            "checks": (f"simulated HR inside the published 95 % CI and control incidence within "
                       f"+-{100 * CONTROL_TOLERANCE:.0f} % of published; goal: at least 80 % of trials"),
            "all": share(rows), "held_out": share([r for r in rows if r["set"] == "held-out"]),
            "development": share([r for r in rows if r["set"] == "development"]), "trials": rows}, "filled"


def _fairness_external(ctx: _Context) -> tuple[Any, str]:
    if ctx.trials is None and ctx.calibration_bytes is None:
        return f"Subgroup results of external validation: {NOT_GENERATED}.", "not-generated"
    parts = _subgroup_parts(ctx.trials) if ctx.trials is not None else {}
    if parts:
        return {"source": "docs/validation/trials.json", "results": parts}, "filled"
    return ("The trial replications report no subgroup results (published trials give subgroup hazard ratios "
            "only for some subgroups, and these are not in the specifications); subgroup calibration on the "
            "event-level cohort is under fairness_same_source."), "incomplete"


FILLERS: dict[str, Callable[[_Context], tuple[Any, str]]] = {
    "release": _release,
    "population": _population,
    "out_of_scope": _out_of_scope,
    "input_features": _input_features,
    "fairness_approach": _fairness_approach,
    "trial_populations": _trial_populations,
    "validity_same_source": _validity_same_source,
    "fairness_same_source": _fairness_same_source,
    "validity_external": _validity_external,
    "fairness_external": _fairness_external,
}


# ------------------------------------------------------------------------------------------ the card


def model_card(model: str | None = None, *, validation_dir: Path | None = None,
               trials_dir: Path | None = None) -> dict[str, Any]:
    """The HTI-1 source attributes of ``model`` (default: the mechanistic twin) at its registered version.

    Each attribute is a key of ``attributes`` with the rule's wording (``attribute``), its paragraph, the
    ``value``, a ``status`` (filled / incomplete / not-generated / deployer) and ``documented_in``.
    ``validation_dir`` and ``trials_dir`` default to the source checkout's folders (None in a wheel).
    """
    cls = _model_class(model)
    static = static_attributes()
    ctx = _Context(cls, validation_dir if validation_dir is not None else source_validation_dir(),
                   trials_dir if trials_dir is not None else source_trials_dir(), static["development_trials"])
    attributes: dict[str, Any] = {}
    for item in static["attributes"]:
        entry = {"attribute": item["attribute"], "group": item["group"], "paragraph": item["paragraph"]}
        if "fill" in item:
            ctx.static = item
            entry["value"], entry["status"] = FILLERS[item["fill"]](ctx)
        else:
            entry["value"], entry["status"] = item["value"], item["status"]
        entry["documented_in"] = list(item["documented_in"])
        attributes[item["key"]] = entry
    version = ctx.version
    return {
        "format": FORMAT,
        "model": {"name": cls.name, "version": version, "software_version": __version__},
        "url": model_card_url(cls.name, version),
        "regulation": static["regulation"],
        "generated_from": {
            "trials": "docs/validation/trials.json" if ctx.trials is not None else NOT_GENERATED,
            "calibration": ("docs/validation/calibration.json" if ctx.calibration_bytes is not None
                            else NOT_GENERATED),
            "narrative": "fhirtwin/model-card.md",
        },
        "attributes": attributes,
        "causal_graph": _causal_graph(),
        "component_governance": component_governance(),
    }


def _causal_graph() -> dict[str, Any]:
    """Identity and size of the declared causal graph the engine is checked against (fhirtwin/causal)."""
    from fhirtwin.causal.graph import graph_reference, load_graph

    graph = load_graph()
    return {"uri": graph_reference(), "version": graph.version, "sha256": graph.sha256,
            "file": "fhirtwin/causal/graph.json", "nodes": len(graph.nodes), "edges": len(graph.edges),
            "encoded_edges": sum(e.status == "encoded" for e in graph.edges)}


def _html_value(value: Any) -> str:
    if isinstance(value, dict):
        return "<dl>" + "".join(f"<dt>{html.escape(str(k))}</dt><dd>{_html_value(v)}</dd>"
                                for k, v in value.items()) + "</dl>"
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value) and len(value) > 1:
            keys = list(dict.fromkeys(k for v in value for k in v))
            head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
            rows = "".join("<tr>" + "".join(f"<td>{_html_value(v.get(k))}</td>" for k in keys) + "</tr>"
                           for v in value)
            return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        return "<ul>" + "".join(f"<li>{_html_value(v)}</li>" for v in value) + "</ul>"
    if value is None:
        return "<em>n/a</em>"
    if isinstance(value, float):
        return html.escape(f"{value:.4g}")
    return html.escape(str(value))


def render_html(card: dict[str, Any]) -> str:
    """The card as one self-contained HTML page (no scripts, no external resources)."""
    model = card["model"]
    title = f"Model card: {model['name']} {model['version']} (fhirtwin {model['software_version']})"
    rows = []
    for key, entry in card["attributes"].items():
        rows.append(
            f'<tr id="{html.escape(key)}"><td>{html.escape(entry["group"])}</td>'
            f'<td><strong>{html.escape(entry["attribute"])}</strong><br><small>{html.escape(entry["paragraph"])}'
            f'</small></td><td>{_html_value(entry["value"])}</td><td>{html.escape(entry["status"])}</td>'
            f'<td>{_html_value(entry["documented_in"])}</td></tr>')
    regulation = card["regulation"]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:80em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;text-align:left}dt{font-weight:bold}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        "<p>Outputs are proposals for clinician review. Source attributes of a predictive decision support "
        f"intervention: {html.escape(regulation['citation'])}. Canonical URL: "
        f"<code>{html.escape(card['url'])}</code>. Machine-readable: the same URL with "
        "<code>Accept: application/json</code>, or the FHIR Library of that URL.</p>"
        "<table><thead><tr><th>Group</th><th>Attribute</th><th>Value</th><th>Status</th><th>Documented in</th>"
        f"</tr></thead><tbody>{''.join(rows)}</tbody></table></body></html>\n")


def usage_text(card: dict[str, Any]) -> str:
    """The cautioned out-of-scope use in one paragraph (``Library.usage``)."""
    value = card["attributes"]["cautioned_out_of_scope_use"]["value"]
    displays = "; ".join(str(item["display"]).removeprefix("Out of scope: ") for item in value["no_forecast_for"])
    return (f"No forecast (out of scope): {displays}. {value['what_happens']} Not for: "
            + ", ".join(value["tasks_not_supported"]) + ".")


def model_card_library(model: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """The card of ``model`` as a FHIR R4 Library (JSON and HTML attached, base64)."""
    card = model_card(model, **kwargs)
    return library_resource(card, render_html(card), citations=static_attributes()["citations"],
                            usage=usage_text(card))


def model_card_libraries(**kwargs: Any) -> list[dict[str, Any]]:
    """One Library per registered model version (what ``fhirtwin register`` uploads)."""
    return [model_card_library(cls.name, **kwargs) for cls in registered_models()]


__all__ = ["FORMAT", "NOT_GENERATED", "library_id", "model_card", "model_card_libraries", "model_card_library",
           "model_card_url", "render_html"]
