"""Sandbox lifecycle through the real CLI, on a second instance so the shared one keeps serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

PORT = 8181


def fhirtwin(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fhirtwin.cli", "sandbox", *args, "--port", str(PORT), "--data-dir", str(data_dir)]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)


def status(data_dir: Path) -> dict:
    result = fhirtwin("status", "--json", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_start_status_restart_reset_stop(tmp_path: Path, sandbox) -> None:  # sandbox: jar already built
    data_dir = tmp_path / "sandbox-data"
    base = f"http://127.0.0.1:{PORT}/fhir"
    try:
        before = status(data_dir)
        assert before["running"] is False and before["base_url"] == base

        started = fhirtwin("start", data_dir=data_dir)
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == base
        running = status(data_dir)
        assert running["running"] is True and running["pid"]

        again = fhirtwin("start", data_dir=data_dir)  # harmless: same process, same URL
        assert again.returncode == 0 and again.stdout.strip() == base
        assert status(data_dir)["pid"] == running["pid"]

        created = requests.put(f"{base}/Patient/lifecycle-1", json={"resourceType": "Patient", "id": "lifecycle-1"},
                               headers={"Content-Type": "application/fhir+json"}, timeout=30)
        assert created.status_code in (200, 201)

        reset = fhirtwin("reset", data_dir=data_dir)
        assert reset.returncode == 0, reset.stderr
        assert status(data_dir)["running"] is True
        assert requests.get(f"{base}/Patient/lifecycle-1", timeout=30).status_code == 404

        stopped = fhirtwin("stop", data_dir=data_dir)
        assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
        after = status(data_dir)
        assert after["running"] is False and after["pid"] is None
        assert fhirtwin("stop", data_dir=data_dir).stdout.strip() == "not running"
    finally:
        fhirtwin("stop", data_dir=data_dir)


def test_database_survives_restart(tmp_path: Path, sandbox) -> None:
    data_dir = tmp_path / "sandbox-data"
    base = f"http://127.0.0.1:{PORT}/fhir"
    try:
        assert fhirtwin("start", data_dir=data_dir).returncode == 0
        requests.put(f"{base}/Patient/persist-1", json={"resourceType": "Patient", "id": "persist-1"},
                     headers={"Content-Type": "application/fhir+json"}, timeout=30).raise_for_status()
        assert fhirtwin("stop", data_dir=data_dir).returncode == 0
        assert fhirtwin("start", data_dir=data_dir).returncode == 0
        assert requests.get(f"{base}/Patient/persist-1", timeout=30).status_code == 200
    finally:
        fhirtwin("stop", data_dir=data_dir)


def test_start_timeout_reports_log_tail(tmp_path: Path, sandbox) -> None:
    data_dir = tmp_path / "sandbox-data"
    result = subprocess.run(
        [sys.executable, "-m", "fhirtwin.cli", "sandbox", "start", "--port", str(PORT), "--data-dir", str(data_dir),
         "--timeout", "2"], capture_output=True, text=True, timeout=300, check=False)
    try:
        assert result.returncode == 2
        assert "did not answer" in result.stderr and "server.log" in result.stderr
        assert status(data_dir)["process_alive"] is False
    finally:
        fhirtwin("stop", data_dir=data_dir)
