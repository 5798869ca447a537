"""Runs the official HL7 FHIR Validator once per test session, in the background (see ``hl7_validator.py``).

The run starts when collection finishes; the conformance tests are moved to the end of the session and
wait for its result, so it overlaps the other tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hl7_validator import HERE, BackgroundValidation, ValidationRun

FIXTURE = "hl7_validation"
_KEY = pytest.StashKey[BackgroundValidation]()


def _wants_validator(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents and FIXTURE in getattr(item, "fixturenames", ())


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance: validated by the official HL7 FHIR Validator (Java)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the conformance tests last, so that the background validation overlaps the other tests."""
    mine = [i for i in items if HERE in Path(str(i.path)).resolve().parents]
    if mine and len(mine) < len(items):
        items[:] = [i for i in items if i not in mine] + mine


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(_wants_validator(item) for item in session.items) and _KEY not in session.config.stash:
        session.config.stash[_KEY] = BackgroundValidation().start()


def pytest_unconfigure(config: pytest.Config) -> None:
    background = config.stash.get(_KEY, None)
    if background is not None:
        background.stop()


@pytest.fixture(scope="session")
def hl7_validation(pytestconfig: pytest.Config) -> ValidationRun:
    """The validator's result for the session (started in the background at collection time)."""
    if _KEY not in pytestconfig.stash:
        pytestconfig.stash[_KEY] = BackgroundValidation().start()
    return pytestconfig.stash[_KEY].result()
