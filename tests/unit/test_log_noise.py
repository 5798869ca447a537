"""A record with many broken resources is summarised, never echoed once per resource."""

from __future__ import annotations

import logging
from datetime import date

import pytest

from fhirtwin.adapters import build_twin
from fhirtwin.twin import LedgerKind


def broken_request(i: int) -> dict:
    # dosageInstruction of the wrong shape and no medication: unreadable, for the same reason 1,000 times
    return {"resourceType": "MedicationRequest", "id": f"mr{i}", "meta": {"versionId": "1"}, "status": "active",
            "intent": "order", "subject": {"reference": "Patient/p1"}, "dosageInstruction": "twice daily"}


def test_one_thousand_malformed_requests_log_at_most_one_line(caplog: pytest.LogCaptureFixture) -> None:
    record = [{"resourceType": "Patient", "id": "p1", "meta": {"versionId": "1"}, "gender": "male",
               "birthDate": "1960-01-01"}, *(broken_request(i) for i in range(1000))]
    with caplog.at_level(logging.DEBUG, logger="fhirtwin"):
        state = build_twin("p1", record, date(2026, 1, 1))
    ledgered = {e.source.split("/_history")[0] for e in state.ledger
                if e.kind in (LedgerKind.MALFORMED, LedgerKind.UNMAPPED, LedgerKind.NO_VALUE)}
    assert len(ledgered) == 1000  # every one is accounted for in the ledger ...
    lines = [r for r in caplog.records if r.name.startswith("fhirtwin")]
    assert len(lines) <= 1  # ... and the log says so once
    assert "mr1" not in caplog.text
