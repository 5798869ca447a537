"""In-silico trial replication: the spec contract, the virtual cohort, the arms and the report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fhirtwin.cli import main
from fhirtwin.validation.cohort import sample_cohort
from fhirtwin.validation.spec import TrialSpecError, load_spec, parse_spec
from fhirtwin.validation.trial import replicate

TRIALS = Path(__file__).resolve().parents[2] / "validation" / "trials"
CONTRACT_KEYS = {"name", "outcome", "follow_up_years", "n_virtual", "control_cumulative_incidence",
                 "treatment_cumulative_incidence", "hazard_ratio", "hazard_ratio_interval90", "published",
                 "control_ratio_to_published", "hr_within_published_ci95"}


def _sprint() -> dict:
    return json.loads((TRIALS / "SPRINT.json").read_text())


def test_every_spec_in_the_repository_follows_the_format() -> None:
    names = {load_spec(p).name for p in TRIALS.glob("*.json")}
    assert {"SPRINT", "JUPITER", "DAPA-CKD", "FOURIER"} <= names and len(names) >= 8


@pytest.mark.parametrize(("change", "word"), [
    (lambda d: d.__setitem__("follow_up_yrs", 3.0), "follow_up_yrs"),
    (lambda d: d["arms"]["treatment"].__setitem__(0, {"kind": "aspirin"}), "aspirin"),
    (lambda d: d["population"].__setitem__("age_years", {"mean": 60}), "sd"),
    (lambda d: d["published"].__setitem__("hazard_ratio", 0.5), "hazard_ratio_ci95"),
    (lambda d: d.__setitem__("format", "fhirtwin-trial/2"), "format"),
])
def test_unknown_or_broken_fields_are_a_clear_error(change, word) -> None:
    data = _sprint()
    change(data)
    with pytest.raises(TrialSpecError) as err:
        parse_spec(data)
    assert word in str(err.value)


def test_reader_notes_are_kept_not_interpreted() -> None:
    data = _sprint()
    data["population"]["_note"] = "from Table 1"
    spec = parse_spec(data)
    assert spec.provenance and spec.population.n_virtual == 4000


def test_virtual_cohort_reproduces_the_baseline_table() -> None:
    spec = load_spec(TRIALS / "SPRINT.json")
    cohort = sample_cohort(spec.population, 3000)
    values = {k: np.array([getattr(p, k) for p in cohort.patients], dtype=float)
              for k in ("age_years", "systolic_bp_mm_hg", "egfr_ml_min_1_73m2", "current_smoker", "diabetes")}
    assert abs(values["age_years"].mean() - 67.9) < 1.0 and values["age_years"].min() >= 50
    assert abs(values["systolic_bp_mm_hg"].mean() - 139.7) < 1.5
    assert abs(values["egfr_ml_min_1_73m2"].mean() - 71.7) < 1.5
    assert abs(values["current_smoker"].mean() - 0.133) < 0.03 and values["diabetes"].sum() == 0
    uacr = np.array([p.uacr_mg_g for p in cohort.patients])
    assert abs(np.median(uacr) - 9.6) < 1.5
    # the copula joins the marginals: older virtual patients have lower eGFR (assumed r = -0.6)
    assert np.corrcoef(values["age_years"], values["egfr_ml_min_1_73m2"])[0, 1] < -0.3
    assert all(p.total_cholesterol_mg_dl > p.hdl_cholesterol_mg_dl + p.ldl_cholesterol_mg_dl for p in cohort.patients)


def test_binary_traits_keep_the_sign_of_their_correlations() -> None:
    # correlations.json: diabetes-HbA1c +0.55, male-HDL -0.35 (point-biserial); the sampled cohort keeps the signs
    cohort = sample_cohort(load_spec(TRIALS / "DAPA-CKD.json").population, 3000)
    a1c = np.array([p.hba1c_percent for p in cohort.patients])
    diabetic = np.array([p.diabetes for p in cohort.patients])
    male = np.array([p.sex == "male" for p in cohort.patients])
    hdl = np.array([p.hdl_cholesterol_mg_dl for p in cohort.patients])
    assert a1c[diabetic].mean() > a1c[~diabetic].mean() + 0.5
    assert hdl[male].mean() < hdl[~male].mean()


def test_identical_arms_give_a_hazard_ratio_of_one_and_a_real_treatment_less() -> None:
    data = _sprint()
    data["arms"]["treatment"] = [{"kind": "placebo"}]
    same = replicate(parse_spec(data), n_virtual=40, draws=20)
    assert same.hazard_ratio == pytest.approx(1.0) and same.hazard_ratio_interval90 == pytest.approx((1.0, 1.0))
    treated = replicate(load_spec(TRIALS / "SPRINT.json"), n_virtual=40, draws=20)
    assert treated.hazard_ratio < 0.95 and set(treated.to_json()) >= CONTRACT_KEYS
    assert treated.control_cumulative_incidence == pytest.approx(same.control_cumulative_incidence)
    again = replicate(load_spec(TRIALS / "SPRINT.json"), n_virtual=40, draws=20)
    assert again.to_json() == treated.to_json()  # reproducible from the spec's seed


def test_measured_ldl_reduction_is_applied_as_measured() -> None:
    spec = load_spec(TRIALS / "FOURIER.json")
    strong = replicate(spec, n_virtual=40, draws=20)
    data = json.loads((TRIALS / "FOURIER.json").read_text())
    data["arms"]["treatment"][0]["percent"] = 20
    weak = replicate(parse_spec(data), n_virtual=40, draws=20)
    assert strong.hazard_ratio < weak.hazard_ratio < 1.0


def test_validate_trials_writes_table_json_and_forest_plot(tmp_path: Path, capsys) -> None:
    assert main(["validate", "trials", str(TRIALS), "--n-virtual", "60", "--draws", "20", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "trials.md").read_text()
    rows = json.loads((tmp_path / "trials.json").read_text())
    svg = (tmp_path / "trials-forest.svg").read_text()
    assert len(rows) == len(list(TRIALS.glob("*.json"))) and all(set(r) >= CONTRACT_KEYS for r in rows)
    assert all(r["name"] in table and r["name"] in svg for r in rows)
    assert svg.startswith("<svg") and "trials meet both checks" in capsys.readouterr().out


def test_validate_trial_json_last_line_and_bad_spec_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["validate", "trial", str(TRIALS / "HOPE-3.json"), "--n-virtual", "30", "--draws", "10",
                 "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert set(json.loads(last)) >= CONTRACT_KEYS
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**_sprint(), "extra": 1}))
    assert main(["validate", "trial", str(bad)]) != 0
    err = capsys.readouterr().err.strip()
    assert "extra" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_kidney_composite_counts_cardiovascular_death_lowered_only_by_an_sglt2_inhibitor() -> None:
    from fhirtwin.sim import get_model
    from fhirtwin.validation.trial import _cv_death_by

    patient = sample_cohort(load_spec(TRIALS / "DAPA-CKD.json").population, 5).patients[0]
    model = get_model("fhirtwin-mechanistic").fit(patient)
    cv = _cv_death_by(model, 29)
    all_cause = 1.0 - np.exp(-model.anchors_.death_all[:29].sum() / 12.0)
    share = 1.0 - 0.696  # cardiovascular share of US deaths (MMWR 2013), written out here
    assert cv == pytest.approx(share * all_cause, rel=1e-6)
    spec = load_spec(TRIALS / "DAPA-CKD.json")
    same = parse_spec({**json.loads((TRIALS / "DAPA-CKD.json").read_text()),
                       "arms": {"control": [{"kind": "placebo"}], "treatment": [{"kind": "placebo"}]}})
    assert replicate(same, n_virtual=20, draws=10).hazard_ratio == pytest.approx(1.0)
    assert replicate(spec, n_virtual=20, draws=10).control_cumulative_incidence > cv * 0.5
    from fhirtwin.sim.interventions import Scenario, intervention_parameters
    from fhirtwin.validation.trial import _cv_death_in_arm, to_interventions

    ratio = np.array([0.86, 0.81])  # Staplin 2021 point estimate and lower bound, written out here
    treated = _cv_death_in_arm(cv, Scenario("t", to_interventions(spec.arms.treatment)), ratio)
    assert treated == pytest.approx(1.0 - (1.0 - cv) ** ratio) and (treated < cv).all()
    placebo = _cv_death_in_arm(cv, Scenario("c", to_interventions(spec.arms.control)), ratio)
    assert (placebo == cv).all()
    assert intervention_parameters()["ratios"]["sglt2i_cardiovascular_death_rr"]["value"] == 0.86


def test_subgroups_partition_the_cohort_and_flag_hazard_ratios_outside_the_trials_ci() -> None:
    from fhirtwin.validation.trial import subgroup_rows

    spec = load_spec(TRIALS / "SPRINT.json")
    cohort = sample_cohort(spec.population, 400)
    rng = np.random.default_rng(3)
    f_c = rng.uniform(0.05, 0.15, (400, 5))
    rows = subgroup_rows(cohort, f_c, f_c * 0.7, (0.64, 0.89))
    by = {(r["dimension"], r["level"]): r for r in rows}
    assert by[("sex", "female")]["n"] + by[("sex", "male")]["n"] == 400
    assert by[("engine scope", "in")]["n"] + by[("engine scope", "out")].get("n", 0) == 400
    female = np.array([p.sex == "female" for p in cohort.patients])
    assert by[("sex", "female")]["control_cumulative_incidence"] == pytest.approx(f_c[female].mean())
    assert all(r["n"] >= 50 for r in rows)
    assert not any(r["flag"] for r in rows)  # treatment = 0.7 x control: HR about 0.69 everywhere, inside the CI
    flagged = subgroup_rows(cohort, f_c, f_c * 0.98, (0.64, 0.89))
    assert all(r["flag"] for r in flagged)  # HR about 0.98: outside the CI in every subgroup
