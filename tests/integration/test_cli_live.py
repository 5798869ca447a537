"""The installed ``fhirtwin`` command against the live sandbox: bad input is one line, verify needs no key.

Each command runs as a subprocess with an environment stripped of every ``FHIRTWIN_*`` variable, so what
is checked is what a user gets from the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"


def fhirtwin(*args: str, key_store: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRTWIN_")}
    env["FHIRTWIN_KEY_STORE"] = str(key_store)
    return subprocess.run([sys.executable, "-m", "fhirtwin", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def cohort_patient(loaded_cohort) -> str:
    return str(loaded_cohort.bundles[4]["entry"][0]["resource"]["id"])


def test_run_then_verify_from_another_key_store_then_tamper(cohort_patient: str, base_url: str,
                                                            tmp_path: Path) -> None:
    writer, verifier = tmp_path / "writer-keys", tmp_path / "verifier-keys"
    run = fhirtwin("run", "--server", base_url, "--patient", cohort_patient, "--json", key_store=writer)
    assert run.returncode == 0, run.stderr
    [patient] = json.loads(run.stdout)["patients"]
    assert patient["status"] in ("written", "unchanged") and patient["provenance"].startswith("Provenance/")
    assert list(writer.glob("*.pem")), "a loopback server gets a development key in the key store"

    # a verifier with no key material of its own: the key comes from what the server publishes
    ok = fhirtwin("verify", "--server", base_url, patient["provenance"], key_store=verifier)
    assert ok.returncode == 0, ok.stderr
    assert "valid ES256 signature" in ok.stdout
    assert not verifier.exists() or not list(verifier.glob("*.pem")), "verify never makes a key"

    provenance = requests.get(f"{base_url}/{patient['provenance']}", headers={"Accept": FHIR_JSON}, timeout=30).json()
    target = provenance["target"][0]["reference"].split("/_history")[0]
    original = requests.get(f"{base_url}/{target}", headers={"Accept": FHIR_JSON}, timeout=30).json()
    edited = {**original, "note": [*original.get("note", []), {"text": "edited after signing"}]}
    put = requests.put(f"{base_url}/{target}", json=edited, headers={"Content-Type": FHIR_JSON}, timeout=30)
    assert put.status_code == 200
    try:
        tampered = fhirtwin("verify", "--server", base_url, patient["provenance"], key_store=verifier)
        assert tampered.returncode == 1
        assert "INVALID" in tampered.stderr
    finally:  # the signed content back (a new version of the same content verifies again)
        restored = requests.put(f"{base_url}/{target}", json=original, headers={"Content-Type": FHIR_JSON},
                                timeout=30)
        assert restored.status_code == 200
    again = fhirtwin("verify", "--server", base_url, patient["provenance"], key_store=verifier)
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (("state", "--server", "not-a-url", "--patient", "x"), "not an http(s) URL"),
    (("run", "--server", "{base}", "--patient", "x", "--as-of", "2026-13-01"), "is not a date"),
    (("state", "--server", "{root}", "--patient", "x"), "has no path"),
    (("state", "--server", "{base}", "--patient", "no-such-patient-x"), "Patient no-such-patient-x not found"),
    (("state", "--server", "http://127.0.0.1:9/fhir", "--patient", "x"), "is the FHIR server running at"),
    (("verify", "--server", "{base}", "Provenance/no-such-provenance"), "not found"),
    (("run", "--server", "https://ehr.example.invalid/fhir", "--patient", "x"), "no signing key"),
    (("state", "--server", "http://127.0.0.1:99999/fhir", "--patient", "x"), "invalid port"),
    (("state", "--server", "http://evil.example\\@127.0.0.1:8080/fhir", "--patient", "x"), "user information"),
    (("verify", "--server", "{base}", "Provenance/x", "--key", "{notpem}"), "is not a PEM"),
])
def test_bad_input_is_one_line_with_exit_code_2(base_url: str, tmp_path: Path, args: tuple[str, ...],
                                                needle: str) -> None:
    root = base_url.rsplit("/", 1)[0]
    notpem = tmp_path / "not-a-key.pem"
    notpem.write_text("not a key\n")
    argv = [a.format(base=base_url, root=root, notpem=notpem) for a in args]
    result = fhirtwin(*argv, key_store=tmp_path / "keys", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
