"""Procedure adapter: CABG/PCI, dialysis and kidney transplant by value set; status and time rules."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest

from fhirtwin.adapters import build_twin
from fhirtwin.adapters.reads import RECORD_TYPES
from fhirtwin.twin import LedgerKind

REF = date(2025, 1, 1)
SNOMED = "http://snomed.info/sct"
CPT = "http://www.ama-assn.org/go/cpt"
PCS = "http://www.cms.gov/Medicare/Coding/ICD10"


def proc(rid: str, code: str, system: str = SNOMED, status: str = "completed", **extra: Any) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Procedure",
        "id": rid,
        "meta": {"versionId": "1"},
        "status": status,
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": "Patient/p1"},
    }
    if "performedPeriod" not in extra and "performedString" not in extra:
        res["performedDateTime"] = "2018-05-04T10:00:00Z"
    res.update(extra)
    return res


def build(*resources: dict[str, Any]):
    return build_twin("p1", list(resources), REF)


def test_procedure_is_read_for_the_record():
    assert RECORD_TYPES["Procedure"] == "patient"


@pytest.mark.parametrize(
    ("system", "code"),
    [
        (SNOMED, "232717009"),  # coronary artery bypass grafting (VSAC CABG Surgeries)
        (SNOMED, "415070008"),  # percutaneous coronary intervention (VSAC PCI)
        (CPT, "33510"),  # CABG, vein only (VSAC CABG, PCI Procedure)
        (CPT, "92928"),  # coronary stent placement
        (PCS, "0210093"),  # ICD-10-PCS bypass of one coronary artery (VSAC CABG Surgeries)
    ],
)
def test_revascularisation_is_established_ascvd(system, code):
    st = build(proc("r", code, system))
    assert st.value("coronary_revascularisation") is True
    assert st.value("established_ascvd") is True
    assert st.latest("coronary_revascularisation").time.year == 2018


def test_kidney_transplant_procedure_is_history():
    st = build(proc("tx", "70536003", performedPeriod={"start": "2010-03-01", "end": "2010-03-01"}))
    ev = st.latest("kidney_transplant")
    assert ev.value is True and ev.time == date(2010, 3, 1)


def test_kidney_transplant_history_code_as_procedure():
    st = build(proc("h", "161665007"))
    assert st.value("kidney_transplant") is True


def test_dialysis_is_current_for_a_window_after_the_last_session():
    st = build(proc("d1", "302497006", performedDateTime="2024-12-15"))  # 17 days before the reference date
    assert st.value("dialysis") is True
    assert st.value("dialysis", as_of=date(2025, 2, 15)) is False  # two months without a record: not dialysing
    assert build(proc("d2", "302497006", performedDateTime="2024-11-01")).value("dialysis") is False
    assert build(proc("d3", "302497006", performedDateTime="2024-11-25")).value("dialysis") is True  # monthly
    old = build(proc("d0", "302497006", performedDateTime="2019-12-01"))
    assert old.value("dialysis") is False


def test_in_progress_dialysis_without_end_is_current():
    st = build(proc("d", "71192002", status="in-progress", performedPeriod={"start": "2020-01-01"}))
    assert st.value("dialysis") is True and st.latest("dialysis").end is None


@pytest.mark.parametrize("status", ["not-done", "preparation", "on-hold", "stopped", "unknown"])
def test_not_performed_statuses_do_not_count(status):
    st = build(proc("x", "232717009", status=status))
    assert st.latest_or_none("coronary_revascularisation") is None
    assert st.ledger.kinds_for("Procedure/x") == {LedgerKind.EXCLUDED}


def test_entered_in_error_recorded():
    st = build(proc("e", "70536003", status="entered-in-error"))
    assert st.latest_or_none("kidney_transplant") is None
    assert st.ledger.kinds_for("Procedure/e") == {LedgerKind.ENTERED_IN_ERROR}


def test_unmapped_missing_time_and_missing_code():
    appendix = proc("a", "80146002")  # appendectomy
    vague = proc("v", "70536003", performedString="years ago")
    no_code = proc("n", "70536003")
    del no_code["code"]
    st = build(appendix, vague, no_code)
    assert st.ledger.kinds_for("Procedure/a") == {LedgerKind.UNMAPPED}
    assert st.ledger.kinds_for("Procedure/v") == {LedgerKind.MISSING_TIME}
    assert st.ledger.kinds_for("Procedure/n") == {LedgerKind.MALFORMED}


def test_condition_only_value_sets_do_not_map_procedures():
    st = build(proc("c", "414545008"))  # ischaemic heart disease is a disorder, not a procedure
    assert st.latest_or_none("coronary_heart_disease") is None
