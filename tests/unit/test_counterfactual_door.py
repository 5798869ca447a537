"""The doors to individual counterfactuals: ``Engine.counterfactual`` on a planned run (the engine's seed and
components, bad actions as BadRequest) and ``fhirtwin counterfactual`` (parsing of --set/--shift, one-line errors
with exit code 2, the full path over an offline record source)."""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from writeback_fixtures import cohort_run, versioned_resources

from fhirtwin import cli
from fhirtwin.adapters import build_twin
from fhirtwin.causal.counterfactual import PAST_NOTE, SETTABLE, SetValue, Shift
from fhirtwin.engine import BadRequest, Engine, InsufficientPatientData
from fhirtwin.fhir.ndjson import NdjsonSource
from fhirtwin.sim.interventions import BASELINE
from fhirtwin.sim.model import MechanisticTwin

LDL, SBP, EGFR = "ldl_cholesterol_mg_dl", "systolic_bp_mm_hg", "egfr_ml_min_1_73m2"
ONE_MMOL = 38.67  # mg/dL of LDL-C
DRAWS = 60
OUTCOMES = ("ascvd", "total_cvd", "death", "heart_failure", "kidney_failure")


def at_horizon(arrays: dict[str, np.ndarray], outcome: str) -> np.ndarray:
    return arrays[outcome][:, -1]


# ------------------------------------------------------------------------------------------------ engine


def test_lower_ldl_lowers_ascvd_and_leaves_kidney_failure_identical() -> None:
    answer = Engine().counterfactual(cohort_run(), [Shift(LDL, -ONE_MMOL)], draws=DRAWS)
    factual, counter = answer.factual, answer.counterfactual
    assert set(OUTCOMES) <= set(factual)
    assert np.all(at_horizon(counter, "ascvd") < at_horizon(factual, "ascvd"))
    assert np.median(at_horizon(counter, "ascvd")) < np.median(at_horizon(factual, "ascvd"))
    assert answer.difference("ascvd")["p95"] < 0
    for untouched in ("kidney_failure", "heart_failure"):  # LDL-C has no path to them in the engine
        np.testing.assert_array_equal(counter[untouched], factual[untouched])
    assert answer.difference("kidney_failure") == {"median": 0.0, "p05": 0.0, "p95": 0.0}
    np.testing.assert_allclose(counter[f"path:{LDL}"], factual[f"path:{LDL}"] - ONE_MMOL)


def test_shift_zero_is_the_engines_forecast_with_the_engines_seed() -> None:
    run = cohort_run()
    assert run.model is not None
    answer = Engine(seed=7).counterfactual(run, [Shift(LDL, 0.0)], draws=DRAWS)
    same_seed = run.model.simulate(BASELINE, 10.0, DRAWS, seed=7)
    other_seed = run.model.simulate(BASELINE, 10.0, DRAWS, seed=0)
    for outcome in OUTCOMES:
        np.testing.assert_array_equal(answer.counterfactual[outcome], answer.factual[outcome])
        np.testing.assert_allclose(answer.factual[outcome], same_seed.cif[outcome], rtol=0, atol=1e-12)
    assert not np.allclose(answer.factual["ascvd"], other_seed.cif["ascvd"])


def test_a_past_only_action_changes_nothing_and_says_why() -> None:
    answer = Engine().counterfactual(cohort_run(), [SetValue(LDL, 100.0, -5.0, 0.0)], draws=DRAWS)
    for outcome in OUTCOMES:
        assert answer.difference(outcome) == {"median": 0.0, "p05": 0.0, "p95": 0.0}
    assert PAST_NOTE in answer.notes
    assert any("confined to the past" in note for note in answer.notes)


def test_the_engines_components_are_used_even_when_the_run_was_fitted_with_others() -> None:
    run = cohort_run()
    assert run.model is not None and run.model.acting_components()  # the run's model has components acting
    without = Engine(components=[]).counterfactual(run, [Shift(LDL, 0.0)], draws=DRAWS)
    expected = MechanisticTwin(components=[]).fit(run.state).simulate(BASELINE, 10.0, DRAWS, seed=0)
    np.testing.assert_allclose(without.factual["ascvd"], expected.cif["ascvd"], rtol=0, atol=1e-12)
    with_them = Engine().counterfactual(run, [Shift(LDL, 0.0)], draws=DRAWS)
    assert not np.allclose(without.factual["ascvd"], with_them.factual["ascvd"])


def test_a_mapping_action_is_the_same_action_and_a_scenario_acts_in_both_worlds() -> None:
    run = cohort_run()
    engine = Engine()
    by_object = engine.counterfactual(run, [Shift(SBP, -10.0, 1.0)], draws=DRAWS)
    by_mapping = engine.counterfactual(
        run, [{"kind": "shift", "variable": SBP, "value": -10, "start_years": 1, "end_years": None}], draws=DRAWS)
    for outcome in OUTCOMES:
        np.testing.assert_array_equal(by_mapping.counterfactual[outcome], by_object.counterfactual[outcome])
    treated = engine.counterfactual(run, [Shift(SBP, -10.0, 1.0)], scenario="pcsk9-inhibitor", draws=DRAWS)
    assert np.median(at_horizon(treated.factual, "ascvd")) < np.median(at_horizon(by_object.factual, "ascvd"))
    assert any("both worlds under the scenario" in note for note in treated.notes)
    assert not any("both worlds under the scenario" in note for note in by_object.notes)


@pytest.mark.parametrize(("actions", "says"), [
    ([SetValue("hba1c_percent", 6.5)], "hba1c_percent"),
    ([{"kind": "set", "variable": "bmi_kg_m2", "value": 25}], "bmi_kg_m2"),
    ([{"kind": "set", "variable": "cholesterol", "value": 100}], "settable paths"),
    ([{"kind": "set", "variable": LDL, "value": 100, "start_years": 2, "end_years": 1}], "empty window"),
    ([{"kind": "set", "variable": LDL, "value": float("nan")}], "finite"),
    ([{"kind": "shift", "variable": LDL, "value": float("inf")}], "finite"),
    ([{"kind": "set", "variable": LDL, "value": 10**400}], "finite"),
    ([{"kind": "set", "variable": LDL, "value": "100"}], "numbers"),
    ([{"kind": "set", "variable": LDL, "value": True}], "numbers"),
    ([{"kind": "hold", "variable": LDL, "value": 100}], "kind"),
    ([{"kind": "set", "value": 100}], "variable"),
    ([SetValue(LDL, -20.0)], "plausible range"),
    ([SetValue("systolic_bp_mm_hg", 10.0)], "plausible range 40-320"),
    ([SetValue("systolic_bp_mm_hg", 400.0)], "plausible range"),
    ([Shift(LDL, -1000.0)], "plausible range"),
    ([Shift("systolic_bp_mm_hg", 1e6)], "plausible range"),
    ([{"kind": "set", "variable": "egfr_ml_min_1_73m2", "value": 10}], "kidney failure"),
    (["ldl_cholesterol_mg_dl=100"], "mapping"),
    ([], "at least one action"),
])
def test_bad_actions_are_bad_requests(actions: list[Any], says: str) -> None:
    with pytest.raises(BadRequest, match=says) as caught:
        Engine().counterfactual(cohort_run(), actions, draws=DRAWS)
    assert caught.value.http_status == 400 and "\n" not in caught.value.message


@pytest.mark.parametrize(("options", "says"), [
    ({"draws": 0}, "draws"), ({"horizon_years": 50.0}, "horizon"), ({"scenario": "surgery"}, "unknown scenario"),
])
def test_bad_settings_are_bad_requests(options: dict[str, Any], says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        Engine().counterfactual(cohort_run(), [Shift(LDL, -10.0)], **{"draws": DRAWS, **options})


def test_without_a_plan_the_engine_says_why() -> None:
    state = build_twin("lonely", [{"resourceType": "Patient", "id": "lonely", "gender": "female",
                                   "birthDate": "1970-01-01"}], date(2026, 6, 30))
    run = Engine().simulate(state, draws=20)
    with pytest.raises(InsufficientPatientData):
        Engine().counterfactual(run, [Shift(LDL, -10.0)], draws=DRAWS)


# ------------------------------------------------------------------------------------------------ CLI

BASE = ["counterfactual", "--server", "http://127.0.0.1:9/fhir", "--patient", "p1"]


def test_set_and_shift_parse_into_actions_in_order() -> None:
    args = cli.build_parser().parse_args([*BASE, "--set", f"{LDL}=100@-5:0", "--shift", f"{SBP}=-10@1:",
                                          "--set", f"{EGFR}=45", "--shift", f"{LDL}=-38.67@:2.5"])
    assert args.actions == [SetValue(LDL, 100.0, -5.0, 0.0), Shift(SBP, -10.0, 1.0, math.inf),
                            SetValue(EGFR, 45.0, 0.0, math.inf), Shift(LDL, -38.67, 0.0, 2.5)]
    assert [type(a) for a in args.actions] == [SetValue, Shift, SetValue, Shift]
    assert args.draws == 1000 and args.scenario is None and not args.json


def test_the_help_names_every_settable_path(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["counterfactual", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--set VAR=VALUE[@START:END]" in text and "--shift VAR=DELTA[@START:END]" in text
    assert all(name in text for name in SETTABLE)


@pytest.mark.parametrize(("option", "says"), [
    ("hba1c_percent=6.5", "'hba1c_percent' cannot be set"),
    ("ldl=100", "'ldl' cannot be set"),
    (LDL, "is not VAR=VALUE"),
    (f"{LDL}=low", "are numbers"),
    (f"{LDL}=100@3:1", "empty window"),
    (f"{LDL}=100@-5", "the window is @START:END"),
    (f"{LDL}=nan", "finite"),
    (f"{LDL}=100@x:", "are numbers"),
])
def test_bad_set_options_are_one_line_and_exit_2(option: str, says: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([*BASE, "--set", option])
    assert exited.value.code == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err and "Traceback" not in err


def test_no_action_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(BASE) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "at least one --set or --shift" in err


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The first cohort patient as an NDJSON folder (an offline record source the CLI's engine reads)."""
    patient_id, resources = versioned_resources()
    folder = tmp_path_factory.mktemp("ndjson")
    for resource in resources:
        with open(folder / f"{resource['resourceType']}.ndjson", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(resource) + "\n")
    return patient_id, folder


def _offline_cli(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    monkeypatch.setattr(cli, "_engine", lambda args, draws=None, signed=False: Engine(NdjsonSource(folder),
                                                                                      draws=draws or 1000))


def test_the_cli_json_is_the_engines_answer(offline: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    patient_id, folder = offline
    _offline_cli(monkeypatch, folder)
    argv = ["counterfactual", "--server", "http://127.0.0.1:9/fhir", "--patient", patient_id, "--as-of",
            "2026-06-30", "--draws", str(DRAWS), "--shift", f"{LDL}=-{ONE_MMOL}", "--json"]
    assert cli.main(argv) == cli.EXIT_OK
    summary = json.loads(capsys.readouterr().out)
    assert summary["horizon_years"] == 10 and summary["draws"] == DRAWS and summary["scenario"] == "baseline"
    assert summary["actions"] == [{"kind": "shift", "variable": LDL, "value": -ONE_MMOL, "start_years": 0.0,
                                   "end_years": None}]
    assert set(summary["outcomes"]) == set(OUTCOMES)
    engine = Engine(NdjsonSource(folder))
    run = engine.run(patient_id, as_of=date(2026, 6, 30), scenario="baseline", draws=DRAWS)
    direct = engine.counterfactual(run, [Shift(LDL, -ONE_MMOL)], draws=DRAWS)
    for outcome, row in summary["outcomes"].items():
        assert row["factual_median"] == pytest.approx(float(np.median(at_horizon(direct.factual, outcome))))
        assert row["counterfactual_median"] == pytest.approx(
            float(np.median(at_horizon(direct.counterfactual, outcome))))
        assert row["difference"] == pytest.approx(direct.difference(outcome))
    assert summary["outcomes"]["ascvd"]["difference"]["p95"] < 0
    assert summary["outcomes"]["kidney_failure"]["difference"] == {"median": 0.0, "p05": 0.0, "p95": 0.0}


def _offline_argv(patient_id: str, *actions: str) -> list[str]:
    """A counterfactual command line against the offline source (the server URL is never contacted)."""
    return ["counterfactual", "--server", "http://127.0.0.1:9/fhir", "--patient", patient_id, "--as-of",
            "2026-06-30", "--draws", str(DRAWS), *actions]


def test_the_cli_prints_the_past_only_note(offline: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    patient_id, folder = offline
    _offline_cli(monkeypatch, folder)
    assert cli.main(_offline_argv(patient_id, "--set", f"{LDL}=100@-5:0")) == cli.EXIT_OK
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in OUTCOMES}
    assert set(rows) == set(OUTCOMES)
    assert all("+0.0000 (+0.0000 to +0.0000)" in row for row in rows.values())
    assert "note: an action confined to the past" in out and f"{LDL} set to 100 in years [-5, 0)" in out


def test_an_engine_refusal_is_one_line_and_exit_2(offline: tuple[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    patient_id, folder = offline
    _offline_cli(monkeypatch, folder)
    assert cli.main(_offline_argv(patient_id, "--set", f"{LDL}=0")) == cli.EXIT_ERROR
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "fhirtwin counterfactual: the action takes ldl_cholesterol_mg_dl outside its plausible range" in captured.err
