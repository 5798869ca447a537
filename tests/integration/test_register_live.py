"""`fhirtwin register` uploads fhirtwin's conformance resources and Device once; repeating changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import requests

from fhirtwin.sim.model import MechanisticTwin
from fhirtwin.writeback.device import device_id

pytestmark = pytest.mark.integration

MODEL_DEVICE = device_id(MechanisticTwin.name, MechanisticTwin.version)


def test_register_is_idempotent(base_url: str, http: requests.Session) -> None:
    def register() -> None:
        result = subprocess.run([sys.executable, "-m", "fhirtwin.cli", "register", "--server", base_url],
                                capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        assert "registered" in result.stdout

    register()
    device = http.get(f"{base_url}/Device/{MODEL_DEVICE}")
    assert device.status_code == 200
    code_systems = http.get(f"{base_url}/CodeSystem", params={"url": "https://fhirtwin.org/CodeSystem/fhirtwin"})
    assert code_systems.json()["total"] == 1
    register()
    again = http.get(f"{base_url}/Device/{MODEL_DEVICE}")
    assert again.json()["meta"]["versionId"] == device.json()["meta"]["versionId"]
