"""Condition adapter: SNOMED CT and ICD-10-CM mapping, clinical/verification status rules, episodes."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhirtwin.adapters import BuildOptions, build_twin
from fhirtwin.adapters.conditions import map_codes
from fhirtwin.twin import LedgerKind

REF = date(2025, 1, 1)
SNOMED = "http://snomed.info/sct"
ICD = "http://hl7.org/fhir/sid/icd-10-cm"


def cond(
    rid: str,
    code: str,
    system: str = SNOMED,
    clinical: str | None = "active",
    verification: str | None = "confirmed",
    onset: str | None = "2015-03-01",
    **extra: Any,
) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Condition",
        "id": rid,
        "meta": {"versionId": "1"},
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/p1"},
    }
    if clinical:
        res["clinicalStatus"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical", "code": clinical}]
        }
    if verification:
        res["verificationStatus"] = {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]
        }
    if onset:
        res["onsetDateTime"] = onset
    res.update(extra)
    return res


def build(*resources: dict[str, Any], **opts: Any):
    return build_twin("p1", list(resources), REF, BuildOptions(**opts) if opts else None)


ASCVD = {"established_ascvd": ""}


@pytest.mark.parametrize(
    ("system", "code", "expected"),
    [
        (SNOMED, "44054006", {"diabetes": "", "diabetes_type": "type2"}),
        (ICD, "E11.9", {"diabetes": "", "diabetes_type": "type2"}),
        (ICD, "E1165", {"diabetes": "", "diabetes_type": "type2"}),  # dots ignored
        (ICD, "e11.65", {"diabetes": "", "diabetes_type": "type2"}),  # case ignored
        (ICD, "E10.9", {"diabetes": "", "diabetes_type": "type1"}),
        (SNOMED, "59621000", {"hypertension": ""}),
        (ICD, "I10", {"hypertension": ""}),
        (ICD, "N18.31", {"ckd": "", "ckd_stage": "3a"}),
        (ICD, "N18.3", {"ckd": "", "ckd_stage": "3"}),
        (ICD, "N18.4", {"ckd": "", "ckd_stage": "4"}),
        (ICD, "N18.6", {"ckd": "", "ckd_stage": "5"}),
        (SNOMED, "700379002", {"ckd": "", "ckd_stage": "3b"}),
        (ICD, "I21.4", {"prior_mi": ""} | ASCVD),
        (ICD, "I22.1", {"prior_mi": ""} | ASCVD),  # local category I22, descendants included
        (ICD, "I25.2", {"prior_mi": "", "atherosclerotic_disease": ""} | ASCVD),
        (ICD, "I63.9", {"prior_stroke": "", "cerebrovascular_disease": ""} | ASCVD),
        # behaviour change: Z86.73 (history of TIA or cerebral infarction) is CMS347 cerebrovascular disease,
        # not an ischaemic stroke diagnosis; it still counts as established ASCVD
        (ICD, "Z86.73", {"cerebrovascular_disease": ""} | ASCVD),
        (ICD, "G45.9", {"tia": "", "cerebrovascular_disease": ""} | ASCVD),
        (ICD, "I50.22", {"heart_failure": ""}),
        (ICD, "E78.01", {"familial_hypercholesterolemia": ""}),
        # behaviour change: I13.0 no longer implies CKD (no published CKD value set lists I12/I13)
        (ICD, "I13.0", {"hypertension": "", "heart_failure": ""}),
        (ICD, "E78.5", {}),
        # behaviour change: coronary atherosclerosis is coronary heart disease (CMS145) and CMS347 atherosclerosis
        (ICD, "I25.10", {"coronary_heart_disease": "", "atherosclerotic_disease": ""} | ASCVD),
        (ICD, "I70.213", {"peripheral_arterial_disease": "", "atherosclerotic_disease": ""} | ASCVD),
        (ICD, "I48.0", {"atrial_fibrillation": ""}),
        (ICD, "I61.9", {}),  # haemorrhagic stroke is not ischaemic stroke (behaviour change)
        (ICD, "Z94.0", {"kidney_transplant": ""}),
    ],
)
def test_code_tables(system, code, expected):
    got = {var: val for var, (val, _) in map_codes({"coding": [{"system": system, "code": code}]}).items()}
    assert got == expected


@pytest.mark.parametrize(
    ("code", "variable"),
    [
        ("414545008", "coronary_heart_disease"),  # ischaemic heart disease (VSAC 2.16.840.1.113762.1.4.1047.46)
        ("399261000", "coronary_revascularisation"),  # history of CABG (documented local addition)
        ("127013003", "diabetic_kidney_disease"),  # VSAC Diabetic Nephropathy
        ("90781000119102", "diabetic_kidney_disease"),  # local addition
        ("157141000119108", "diabetic_kidney_disease"),  # local addition
        ("422034002", "diabetic_retinopathy"),  # VSAC Diabetic Retinopathy and Diabetes
        ("161665007", "kidney_transplant"),  # VSAC Kidney Transplant Recipient 20180310 member, local addition
    ],
)
def test_issue_codes_map(code, variable):
    got = map_codes({"coding": [{"system": SNOMED, "code": code}]})
    assert variable in got
    if variable in ("coronary_heart_disease", "coronary_revascularisation"):
        assert "established_ascvd" in got
    if variable.startswith("diabetic_"):
        assert "diabetes" in got


def test_issue_codes_reach_the_twin():
    st = build(
        cond("ihd", "414545008"),
        cond("cabg", "399261000", clinical="resolved", abatementDateTime="2016-01-01"),
        cond("dkd", "90781000119102"),
        cond("tx", "161665007", clinical="inactive", recordedDate="2016-01-01"),
    )
    assert st.value("coronary_heart_disease") is True
    assert st.value("coronary_revascularisation") is True  # history: counts after resolution
    assert st.value("established_ascvd") is True
    assert st.value("diabetes") is True and st.value("diabetes_type") == "type2"
    assert st.value("diabetic_kidney_disease") is True
    assert st.value("kidney_transplant") is True


def test_who_icd10_matches_the_same_icd10cm_code():
    got = map_codes({"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]})
    assert got["diabetes"][0] == ""


def test_pregnancy_is_current_within_its_window_only():
    st = build(cond("p", "77386006", onset="2024-06-01"), cond("old", "77386006", onset="2019-01-01"))
    assert st.value("pregnancy") is True
    assert st.value("pregnancy", as_of=date(2025, 6, 1)) is False
    assert st.value("pregnancy", as_of=date(2019, 6, 1)) is True


def test_refuted_ascvd_not_counted():
    st = build(
        cond("r", "414545008", verification="refuted"),
        cond("e", "399261000", clinical=None, verification="entered-in-error"),
    )
    assert st.latest_or_none("established_ascvd") is None
    assert st.ledger.kinds_for("Condition/r") == {LedgerKind.REFUTED}
    assert st.ledger.kinds_for("Condition/e") == {LedgerKind.ENTERED_IN_ERROR}


def test_abated_current_flags_end_but_history_flags_stay():
    st = build(
        cond("dm", "44054006", clinical="resolved", onset="2010-01-01", abatementDateTime="2012-01-01"),
        cond("mi", "22298006", clinical="resolved", onset="2010-01-01", abatementDateTime="2010-02-01"),
    )
    assert st.value("diabetes") is False and st.value("diabetes_type") == "none"
    assert st.value("prior_mi") is True and st.value("established_ascvd") is True


def test_icd10_and_snomed_both_mapped_to_flags():
    st = build(cond("a", "E11.9", ICD), cond("b", "59621000"), cond("c", "N18.32", ICD))
    assert st.value("diabetes") is True
    assert st.value("hypertension") is True
    assert st.value("ckd") is True and st.value("ckd_stage") == "3b"
    ev = st.latest("diabetes")
    assert ev.code == "http://hl7.org/fhir/sid/icd-10-cm|E11.9"
    assert ev.time == date(2015, 3, 1)


def test_refuted_and_entered_in_error_ignored_and_recorded():
    st = build(
        cond("ref", "44054006", verification="refuted"),
        cond("eie", "59621000", clinical=None, verification="entered-in-error"),
    )
    assert st.latest_or_none("diabetes") is None and st.latest_or_none("hypertension") is None
    assert st.ledger.kinds_for("Condition/ref") == {LedgerKind.REFUTED}
    assert st.ledger.kinds_for("Condition/eie") == {LedgerKind.ENTERED_IN_ERROR}


def test_suspected_not_counted_unless_configured():
    res = cond("prov", "44054006", verification="provisional")
    assert build(res).latest_or_none("diabetes") is None
    assert build(res, count_suspected_conditions=True).value("diabetes") is True


def test_resolved_kept_as_history_with_abatement():
    st = build(cond("mi", "22298006", clinical="resolved", abatementDateTime="2015-04-01"))
    ev = st.history("prior_mi")[0]
    assert ev.end == date(2015, 4, 1)
    assert st.value("prior_mi") is True  # history-of flag: still true after resolution


def test_resolved_current_flag_is_false_after_abatement_but_history_remains():
    st = build(cond("htn", "I10", ICD, clinical="resolved", onset="2010-01-01", abatementDateTime="2012-01-01"))
    assert st.value("hypertension", as_of=date(2011, 1, 1)) is True
    latest = st.latest("hypertension")
    assert latest.value is False and latest.time == date(2012, 1, 1)
    assert len(st.history("hypertension")) == 1


def test_resolved_without_abatement_ends_at_recording():
    st = build(cond("r", "I10", ICD, clinical="inactive", onset="2010-01-01", recordedDate="2013-05-05"))
    assert st.latest("hypertension").value is False
    assert st.value("hypertension", as_of=date(2012, 1, 1)) is True


def test_recurrence_and_relapse_are_current():
    st = build(cond("a", "I50.9", ICD, clinical="recurrence"), cond("b", "E11.9", ICD, clinical="relapse"))
    assert st.value("heart_failure") is True and st.value("diabetes") is True


def test_onset_period_and_recorded_date_fallback():
    st = build(
        cond("a", "I10", ICD, onset=None, onsetPeriod={"start": "2011-02-03"}),
        cond("b", "E11.9", ICD, onset=None, recordedDate="2012-01-01"),
        cond("c", "I48.0", ICD, onset=None),
    )
    assert st.latest("hypertension").time == date(2011, 2, 3)
    assert st.latest("diabetes").time == date(2012, 1, 1)
    assert st.ledger.kinds_for("Condition/c") == {LedgerKind.MISSING_TIME}


def test_unmapped_and_missing_code():
    no_code = cond("x", "I10", ICD)
    del no_code["code"]
    st = build(cond("hl", "55822004"), no_code)
    assert st.ledger.kinds_for("Condition/hl") == {LedgerKind.UNMAPPED}
    assert st.ledger.kinds_for("Condition/x") == {LedgerKind.MALFORMED}


def test_air_pollution_exposure_condition_is_environmental():
    st = build(cond("z", "Z77.110", ICD))
    assert st.latest("air_pollution_exposure").scale.value == "environmental"
