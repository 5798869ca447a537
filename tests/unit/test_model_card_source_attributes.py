"""The HTI-1 model card: every source attribute present, facts read from the code and the generated
validation results (never restated), the FHIR Library, its registration, the references to it from what
fhirtwin writes, and ``/model-card``."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from writeback_fixtures import NOW, cohort_run

from fhirtwin.engine import Engine
from fhirtwin.fhir.models import validate_resource
from fhirtwin.model_card import NOT_GENERATED, model_card, model_card_libraries, model_card_library, render_html
from fhirtwin.service.app import ServiceSettings, create_app, preferred_media_type
from fhirtwin.sim import scope
from fhirtwin.sim.model import registered_models
from fhirtwin.vocabulary import EXT_MODEL_CARD
from fhirtwin.writeback.device import device_resource
from fhirtwin.writeback.jws import generate_key
from fhirtwin.writeback.library import library_id, model_card_url
from fhirtwin.writeback.transaction import build_patient_write

PROFILES = Path(__file__).resolve().parents[2] / "fhirtwin" / "profiles"
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

#: 45 CFR 170.315(b)(11)(iv)(B): the groups, and the attribute keys of each, in the rule's order.
HTI1_GROUPS = {
    "(1)": ["intervention_name_and_release", "developer", "funding_source", "output_value", "output_type"],
    "(2)": ["intended_use", "intended_patient_population", "intended_users", "intended_decision_role"],
    "(3)": ["cautioned_out_of_scope_use", "known_risks_and_limitations"],
    "(4)": ["training_data_inclusion_exclusion", "input_features", "demographic_representativeness",
            "training_data_relevance"],
    "(5)": ["fairness_approach"],
    "(6)": ["external_validation_source", "external_validation_party", "external_data_representativeness",
            "external_validation_process"],
    "(7)": ["validity_same_source", "fairness_same_source", "validity_external", "fairness_external",
            "outcome_evaluations"],
    "(8)": ["update_and_revalidation_schedule", "local_validity", "local_fairness"],
}


def _trial(name: str, hr: float, ci: tuple[float, float], ratio: float) -> dict:
    return {"name": name, "outcome": "ascvd", "follow_up_years": 5.0, "n_virtual": 50, "draws": 10,
            "control_cumulative_incidence": 0.05 * ratio, "treatment_cumulative_incidence": 0.04,
            "hazard_ratio": hr, "hazard_ratio_interval90": [hr - 0.1, hr + 0.1],
            "published": {"control_cumulative_incidence": 0.05, "hazard_ratio": 0.8, "hazard_ratio_ci95": list(ci)},
            "control_ratio_to_published": ratio, "hr_within_published_ci95": ci[0] <= hr <= ci[1]}


@pytest.fixture
def generated(tmp_path: Path) -> Path:
    """A docs/validation folder with trial results and a calibration report with subgroups."""
    trials = [_trial("SPRINT", 0.75, (0.6, 0.9), 1.1),      # development, both checks
              _trial("HOPE-3", 0.95, (0.64, 0.91), 1.0),     # held-out, HR outside the CI
              _trial("ACCORD-BP", 0.85, (0.7, 1.0), 1.31),   # held-out, control incidence off by 31 %
              _trial("IMPROVE-IT", 0.9, (0.8, 1.0), 0.75)]   # held-out, control incidence -25 %: meets both
    (tmp_path / "trials.json").write_text(json.dumps(trials))
    (tmp_path / "calibration.json").write_text(json.dumps({
        "ascvd_10y": {"overall": {"oe": 1.02}, "subgroups": {"sex=female": {"oe": 0.7, "flagged": True}}}}))
    return tmp_path


def test_every_hti1_attribute_is_a_key_with_value_status_and_where_documented(tmp_path: Path) -> None:
    card = model_card(validation_dir=tmp_path, trials_dir=tmp_path)
    assert list(card["attributes"]) == [key for keys in HTI1_GROUPS.values() for key in keys]
    for group, keys in HTI1_GROUPS.items():
        for key in keys:
            entry = card["attributes"][key]
            assert entry["group"].startswith(group) and f"(B){group}" in entry["paragraph"]
            assert entry["attribute"] and entry["value"] not in (None, "", [], {}) and entry["documented_in"]
            assert entry["status"] in ("filled", "incomplete", "not-generated", "deployer")
    assert "170.315(b)(11)(iv)(B)" in card["regulation"]["citation"]
    assert card["format"] == "fhirtwin-model-card/1"


def test_release_and_scope_are_read_from_the_code_not_restated(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in registered_models():
        card = model_card(cls.name)
        release = card["attributes"]["intervention_name_and_release"]["value"]
        assert (release["model"], release["model_version"]) == (cls.name, cls.version)
        assert card["url"] == model_card_url(cls.name, cls.version)
    out = model_card()["attributes"]["cautioned_out_of_scope_use"]["value"]["no_forecast_for"]
    codes = [item["code"] for item in out]
    assert set(codes) == {c for c, _ in scope.EXCLUSIONS} | {scope.KIDNEY_FAILURE, scope.AGE_OUT_OF_RANGE}
    assert codes.index(scope.KIDNEY_FAILURE) == codes.index("scope-heart-failure") - 1  # decide_scope's order
    monkeypatch.setattr(scope, "PREVENT_MAX_AGE", 74)
    population = model_card()["attributes"]["intended_patient_population"]["value"]
    assert population["age_years"] == [scope.PREVENT_MIN_AGE, 74] and "-74 years" in population["description"]
    with pytest.raises(KeyError):
        model_card("no-such-model")


def test_race_is_declared_as_not_used_and_the_inputs_are_the_engines() -> None:
    value = model_card()["attributes"]["input_features"]["value"]
    use = value["use_of_demographic_and_social_variables"]
    assert set(use) == set(model_card()["regulation"]["variables_a5_a13"])
    assert use["race"].startswith("Not used") and use["sex"].startswith("Used")
    assert {"age_years", "sex", "current_smoker", "egfr_ml_min_1_73m2"} <= set(value["patient_inputs"])


def test_without_generated_results_the_card_says_so(tmp_path: Path) -> None:
    card = model_card(validation_dir=tmp_path / "absent", trials_dir=tmp_path)
    attrs = card["attributes"]
    for key in ("validity_external", "fairness_same_source", "fairness_external"):
        assert attrs[key]["status"] == "not-generated" and NOT_GENERATED in attrs[key]["value"]
    assert NOT_GENERATED in attrs["validity_same_source"]["value"]["calibration_report"]
    assert card["generated_from"] == {"trials": NOT_GENERATED, "calibration": NOT_GENERATED,
                                      "narrative": "fhirtwin/model-card.md"}


def test_validity_and_fairness_are_filled_from_the_generated_reports(generated: Path) -> None:
    card = model_card(validation_dir=generated)
    external = card["attributes"]["validity_external"]
    assert external["status"] == "filled"
    rows = {r["trial"]: r for r in external["value"]["trials"]}
    assert rows["SPRINT"]["set"] == "development" and rows["HOPE-3"]["set"] == "held-out"
    assert [rows[t]["meets_both_checks"] for t in ("SPRINT", "HOPE-3", "ACCORD-BP", "IMPROVE-IT")] == \
        [True, False, False, True]
    assert external["value"]["held_out"] == {"trials": 3, "meet_both_checks": 1, "hr_within_published_ci95": 2,
                                             "share_meeting_both": 0.333}
    assert external["value"]["all"]["meet_both_checks"] == 2
    fairness = card["attributes"]["fairness_same_source"]
    assert fairness["status"] == "filled"
    assert fairness["value"]["results"] == {"ascvd_10y.subgroups": {"sex=female": {"oe": 0.7, "flagged": True}}}
    report = card["attributes"]["validity_same_source"]["value"]["calibration_report"]
    assert report["results"]["ascvd_10y"]["overall"]["oe"] == 1.02
    assert report["sha256"] == hashlib.sha256((generated / "calibration.json").read_bytes()).hexdigest()


def test_the_event_level_calibration_report_fills_validity_and_subgroup_fairness(tmp_path: Path) -> None:
    row = {"outcome": "ascvd", "horizon_years": 10, "dimension": "sex", "level": "female",
           "engine": {"oe": 1.4, "slope": 1.0}, "truth": {"oe": 1.0}, "flag": "O/E 1.40"}
    report = {"format": "fhirtwin-calibration/1", "generator": "fhirtwin.validation.events", "n_virtual": 300,
              "flag_rule": {"oe_range": [0.8, 1.25], "slope_range": [0.8, 1.2], "few_events": 20},
              "overall": [{**row, "dimension": "all", "level": "all", "flag": None}],
              "subgroups": [row, {**row, "level": "male", "flag": None}], "flagged": [row],
              "deciles": {"big": list(range(1000))}, "biomarker_coverage": {"rows": [{"subset": "stable"}]}}
    (tmp_path / "calibration.json").write_text(json.dumps(report))
    attrs = model_card(validation_dir=tmp_path)["attributes"]
    fairness = attrs["fairness_same_source"]["value"]
    assert attrs["fairness_same_source"]["status"] == "filled"
    assert fairness["flagged"] == [row] and fairness["flagged_count"] == 1 and len(fairness["subgroups"]) == 2
    validity = attrs["validity_same_source"]["value"]["calibration_report"]
    assert validity["overall"] == report["overall"] and validity["biomarker_coverage"] == report["biomarker_coverage"]
    assert "deciles" not in validity  # the decile tables stay in the report
    assert attrs["validity_external"]["status"] == "not-generated"  # no trials.json next to it


def test_trial_populations_come_from_the_specs_in_the_checkout() -> None:
    value = model_card()["attributes"]["external_data_representativeness"]["value"]
    trials = {row["trial"]: row for row in value["trials"]}
    assert {"SPRINT", "HOPE-3"} <= set(trials)
    assert 0 < trials["SPRINT"]["female_fraction"] < 1 and trials["SPRINT"]["set"] == "development"


def test_library_is_an_r4_asset_collection_with_the_card_attached(generated: Path) -> None:
    library = model_card_library(validation_dir=generated)
    validate_resource(library)  # structurally valid (fhir.resources, R4 JSON checked with R4B models)
    assert library["type"]["coding"] == [{"system": "http://terminology.hl7.org/CodeSystem/library-type",
                                          "code": "asset-collection", "display": "Asset Collection"}]
    assert FHIR_ID.match(library["id"]) and library["url"].endswith("/Library/" + library["id"])
    assert library["url"] == model_card_url("fhirtwin-mechanistic", library["version"])
    assert re.match(r"^[A-Z]([A-Za-z0-9_]){0,254}$", library["name"])
    by_type = {c["contentType"]: c for c in library["content"]}
    assert set(by_type) == {"application/json", "text/html"}
    for attachment in by_type.values():
        data = base64.b64decode(attachment["data"])
        assert attachment["size"] == len(data)
        assert base64.b64decode(attachment["hash"]) == hashlib.sha1(data).digest()  # noqa: S324
    card = json.loads(base64.b64decode(by_type["application/json"]["data"]))
    assert card == model_card(validation_dir=generated)
    assert base64.b64decode(by_type["text/html"]["data"]).decode() == render_html(card)
    assert library == model_card_library(validation_dir=generated)  # deterministic: re-registering is a no-op


def test_html_escapes_and_shows_every_attribute() -> None:
    card = model_card()
    card["attributes"]["developer"]["value"] = "<script>alert(1)</script>"
    page = render_html(card)
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert all(f'id="{key}"' in page for key in card["attributes"])


def test_register_uploads_one_library_per_model_version_to_a_stable_id() -> None:
    resources = Engine(None).registration()
    libraries = [r for r in resources if r["resourceType"] == "Library"]
    assert sorted(lib["id"] for lib in libraries) == sorted(library_id(c.name, c.version)
                                                           for c in registered_models())
    assert [lib["id"] for lib in libraries] == [lib["id"] for lib in model_card_libraries()]


def test_risk_assessments_provenance_and_device_reference_the_card() -> None:
    run = cohort_run()
    forecast = run.plan.baseline
    url = model_card_url(forecast.model, forecast.model_version)
    write = build_patient_write(run.plan, run.state, key=generate_key(), existing=[], now=NOW)
    by_type: dict[str, list[dict]] = {}
    for entry in write.bundle["entry"]:
        by_type.setdefault(entry["resource"]["resourceType"], []).append(entry["resource"])
    assert by_type["RiskAssessment"]
    for ra in by_type["RiskAssessment"]:
        assert [e["valueCanonical"] for e in ra["extension"] if e["url"] == EXT_MODEL_CARD] == [url]
    [provenance] = by_type["Provenance"]
    assert provenance["policy"] == [url]
    [device] = by_type["Device"]
    assert device == device_resource(forecast.model, forecast.model_version)
    assert [e["valueCanonical"] for e in device["extension"] if e["url"] == EXT_MODEL_CARD] == [url]


def test_profiles_declare_the_reference() -> None:
    extension = json.loads((PROFILES / "extensions" / "StructureDefinition-model-card.json").read_text())
    assert {c["expression"] for c in extension["context"]} >= {"Device", "RiskAssessment"}
    [value] = [e for e in extension["differential"]["element"] if e["id"] == "Extension.value[x]"]
    assert value["type"] == [{"code": "canonical",
                              "targetProfile": ["http://hl7.org/fhir/StructureDefinition/Library"]}]
    profile = json.loads((PROFILES / "structuredefinitions" / "StructureDefinition-fhirtwin-riskassessment.json")
                         .read_text())
    [slice_] = [e for e in profile["differential"]["element"] if e.get("sliceName") == "modelCard"]
    assert (slice_["min"], slice_["max"]) == (1, "1") and slice_["type"][0]["profile"] == [EXT_MODEL_CARD]


@pytest.mark.parametrize(("accept", "expected"), [
    (None, "application/json"), ("*/*", "application/json"), ("text/html", "text/html"),
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", "text/html"),
    ("application/json;q=0.5, text/html;q=0.9", "text/html"), ("text/*", "text/html"),
    ("text/markdown", "text/markdown"), ("image/png", None), ("text/html;q=0", None),
])
def test_accept_negotiation(accept: str | None, expected: str | None) -> None:
    assert preferred_media_type(accept) == expected


def test_model_card_endpoint_is_public_json_html_and_markdown() -> None:
    client = TestClient(create_app(ServiceSettings(fhir_server="http://127.0.0.1:9/fhir",
                                                   public_url="https://twin.example.org")))
    as_json = client.get("/model-card")  # no credentials: public
    assert as_json.status_code == 200 and as_json.headers["content-type"].startswith("application/json")
    assert as_json.json()["model"]["name"] == "fhirtwin-mechanistic"
    assert as_json.headers["vary"] == "Accept"
    as_html = client.get("/model-card", headers={"Accept": "text/html"})
    assert as_html.headers["content-type"].startswith("text/html") and "<table>" in as_html.text
    other = client.get("/model-card", params={"model": "fhirtwin-equations"}, headers={"Accept": "application/json"})
    assert other.json()["model"]["name"] == "fhirtwin-equations"
    assert client.get("/model-card", params={"model": "nope"}).status_code == 404
    assert client.get("/model-card", headers={"Accept": "image/png"}).status_code == 406
    markdown = client.get("/model-card", headers={"Accept": "text/markdown"})
    assert markdown.text.startswith("# Model card")
