"""The installed ``fhirtwin`` command against the live sandbox: bad input is one line, verify needs no key.

Each command runs as a subprocess with an environment stripped of every ``FHIRTWIN_*`` variable, so what
is checked is what a user gets from the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from fhirtwin.fhir.client import FhirClient

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"


def fhirtwin(*args: str, key_store: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIRTWIN_")}
    env["FHIRTWIN_KEY_STORE"] = str(key_store)
    return subprocess.run([sys.executable, "-m", "fhirtwin", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def _rewrite(node: Any, refs: dict[str, str]) -> Any:
    if isinstance(node, dict):
        out = {k: _rewrite(v, refs) for k, v in node.items()}
        if isinstance(node.get("reference"), str) and node["reference"] in refs:
            out["reference"] = refs[node["reference"]]
        return out
    if isinstance(node, list):
        return [_rewrite(v, refs) for v in node]
    return node


@pytest.fixture(scope="module")
def fresh_patient(loaded_cohort, base_url: str) -> str:
    """A copy of a cohort patient under server-assigned ids and without its identifiers, so tampering here
    touches no other test (and the cohort's identifier counts stay exact)."""
    source = loaded_cohort.bundles[4]
    resources = [e["resource"] for e in source["entry"]]
    refs = {f"{r['resourceType']}/{r['id']}": f"urn:uuid:{uuid.uuid4()}" for r in resources}
    entries = [{"fullUrl": refs[f"{r['resourceType']}/{r['id']}"],
                "resource": _rewrite({k: v for k, v in r.items() if k not in ("id", "meta", "identifier")}, refs),
                "request": {"method": "POST", "url": r["resourceType"]}} for r in resources]
    response = FhirClient(base_url).transaction({"resourceType": "Bundle", "type": "transaction", "entry": entries})
    location = next(e["response"]["location"] for e in response["entry"]
                    if e["response"]["location"].startswith("Patient/"))
    return location.split("/")[1]


def test_run_then_verify_from_another_key_store_then_tamper(fresh_patient: str, base_url: str,
                                                            tmp_path: Path) -> None:
    writer, verifier = tmp_path / "writer-keys", tmp_path / "verifier-keys"
    run = fhirtwin("run", "--server", base_url, "--patient", fresh_patient, "--json", key_store=writer)
    assert run.returncode == 0, run.stderr
    [patient] = json.loads(run.stdout)["patients"]
    assert patient["status"] == "written" and patient["provenance"].startswith("Provenance/")
    assert list(writer.glob("*.pem")), "a loopback server gets a development key in the key store"

    # a verifier with no key material of its own: the key comes from what the server publishes
    ok = fhirtwin("verify", "--server", base_url, patient["provenance"], key_store=verifier)
    assert ok.returncode == 0, ok.stderr
    assert "valid ES256 signature" in ok.stdout
    assert not verifier.exists() or not list(verifier.glob("*.pem")), "verify never makes a key"

    provenance = requests.get(f"{base_url}/{patient['provenance']}", headers={"Accept": FHIR_JSON}, timeout=30).json()
    target = provenance["target"][0]["reference"].split("/_history")[0]
    resource = requests.get(f"{base_url}/{target}", headers={"Accept": FHIR_JSON}, timeout=30).json()
    resource.setdefault("note", []).append({"text": "edited after signing"})
    put = requests.put(f"{base_url}/{target}", json=resource, headers={"Content-Type": FHIR_JSON}, timeout=30)
    assert put.status_code == 200
    tampered = fhirtwin("verify", "--server", base_url, patient["provenance"], key_store=verifier)
    assert tampered.returncode == 1
    assert "INVALID" in tampered.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (("state", "--server", "not-a-url", "--patient", "x"), "not an http(s) URL"),
    (("run", "--server", "{base}", "--patient", "x", "--as-of", "2026-13-01"), "is not a date"),
    (("state", "--server", "{root}", "--patient", "x"), "has no path"),
    (("state", "--server", "{base}", "--patient", "no-such-patient-x"), "Patient no-such-patient-x not found"),
    (("state", "--server", "http://127.0.0.1:9/fhir", "--patient", "x"), "is the FHIR server running at"),
    (("verify", "--server", "{base}", "Provenance/no-such-provenance"), "not found"),
    (("run", "--server", "https://ehr.example.invalid/fhir", "--patient", "x"), "no signing key"),
])
def test_bad_input_is_one_line_with_exit_code_2(base_url: str, tmp_path: Path, args: tuple[str, ...],
                                                needle: str) -> None:
    root = base_url.rsplit("/", 1)[0]
    argv = [a.format(base=base_url, root=root) for a in args]
    result = fhirtwin(*argv, key_store=tmp_path / "keys", timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
