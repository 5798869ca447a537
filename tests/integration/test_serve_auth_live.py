"""``fhirtwin serve`` as a real process is secure by default: without ``--dev-no-auth`` every door answers
401 to a caller without credentials, the flag is refused off loopback, and a token from the configured issuer
(minted here with PyJWT) reads a real patient from the sandbox."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"
IDP = "https://idp.example.org"
EHR = "https://ehr.example.org"
PATIENT = "ftp-0172"  # an in-scope cohort patient; this test only reads


def serve_exit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fhirtwin.cli", "serve", "--port", "1", *args],
                          capture_output=True, text=True, timeout=60)


def test_serve_refuses_to_start_without_credentials_or_with_dev_mode_off_loopback(base_url) -> None:
    bare = serve_exit("--fhir-server", base_url)
    assert bare.returncode == 2 and "no credentials are configured" in bare.stderr
    exposed = serve_exit("--fhir-server", base_url, "--host", "0.0.0.0", "--dev-no-auth")
    assert exposed.returncode == 2 and "loopback" in exposed.stderr
    proxied = serve_exit("--fhir-server", base_url, "--dev-no-auth", "--public-url", "https://twin.example.org")
    assert proxied.returncode == 2 and "loopback" in proxied.stderr


@pytest.fixture(scope="module")
def secured(base_url, loaded_cohort, start_service, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("auth")
    idp_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ehr_key = ec.generate_private_key(ec.SECP384R1())
    (folder / "idp.json").write_text(json.dumps({"keys": [
        {**json.loads(RSAAlgorithm.to_jwk(idp_key.public_key())), "kid": "idp-1", "alg": "RS384"}]}))
    (folder / "ehr.json").write_text(json.dumps({"keys": [
        {**json.loads(ECAlgorithm.to_jwk(ehr_key.public_key())), "kid": "ehr-1", "alg": "ES384"}]}))
    (folder / "secret").write_text("a-webhook-secret-of-some-length")
    (folder / "fhirtwin.toml").write_text(
        f'[auth]\nissuer = "{IDP}"\njwks = "idp.json"\nwebhook_secret_file = "secret"\n'
        f'[[auth.cds_clients]]\nissuer = "{EHR}"\njwks = "ehr.json"\nfhir_servers = ["{base_url}"]\n')
    url = start_service(base_url, args=["--config", str(folder / "fhirtwin.toml")])
    return {"url": url, "idp": idp_key, "ehr": ehr_key, "folder": folder}


def test_every_door_answers_401_without_credentials(secured) -> None:
    url = secured["url"]
    write = {"resourceType": "Parameters", "parameter": [{"name": "write", "valueBoolean": True}]}
    simulate = requests.post(f"{url}/fhir/Patient/{PATIENT}/$simulate", timeout=30, json=write)
    assert simulate.status_code == 401 and simulate.json()["resourceType"] == "OperationOutcome"
    assert requests.get(f"{url}/fhir/Patient/{PATIENT}/$simulate", timeout=30).status_code == 401
    cds = requests.post(f"{url}/cds-services/fhirtwin-cardiorenal-risk", timeout=30,
                        json={"hook": "patient-view", "hookInstance": str(uuid.uuid4()),
                              "context": {"userId": "Practitioner/x", "patientId": PATIENT}})
    assert cds.status_code == 401 and set(cds.json()) == {"error", "message"}
    observation = {"resourceType": "Observation", "id": "x", "subject": {"reference": f"Patient/{PATIENT}"}}
    delivery = requests.put(f"{url}/hooks/fhir/Observation/x", timeout=30, json=observation)
    assert delivery.status_code == 401
    assert requests.post(f"{url}/hooks/fhir/dead-letter/replay", timeout=30).status_code == 401
    assert requests.get(f"{url}/health", timeout=30).status_code == 200  # holds no patient data


def test_a_token_from_the_configured_issuer_reads_a_real_patient(secured, base_url, http) -> None:
    """The read is answered, refused for writing without the scopes, and audited (BALP AuditEvent with the
    token's client as agent, reaching the server through the store's outbox)."""
    started = time.time()
    now = int(started)
    token = jwt.encode({"iss": IDP, "aud": f"{secured['url']}/fhir", "exp": now + 300, "iat": now,
                        "client_id": "integration-engine", "scope": "system/Patient.rs"},
                       secured["idp"], algorithm="RS384", headers={"kid": "idp-1"})
    response = requests.get(f"{secured['url']}/fhir/Patient/{PATIENT}/$simulate", timeout=120,
                            headers={"Authorization": f"Bearer {token}", "Accept": FHIR_JSON})
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "transaction"
    refused = requests.post(f"{secured['url']}/fhir/Patient/{PATIENT}/$simulate", timeout=120,
                            headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR_JSON},
                            json={"resourceType": "Parameters", "parameter": [{"name": "write", "valueBoolean": True}]})
    assert refused.status_code == 403
    deadline = time.monotonic() + 60
    clients: list[str] = []
    while time.monotonic() < deadline and "integration-engine" not in clients:
        bundle = http.get(f"{base_url}/AuditEvent", params={"entity": f"Patient/{PATIENT}", "_count": 200,
                                                             "_sort": "-_lastUpdated"}).json()
        clients = [agent["who"]["identifier"]["value"] for e in bundle.get("entry", [])
                   for agent in e["resource"].get("agent", []) if agent.get("who", {}).get("identifier")]
        time.sleep(1)
    assert "integration-engine" in clients, "the service's read of the patient left no AuditEvent on the server"


def test_a_registered_cds_client_gets_cards_once_per_token(secured, base_url) -> None:
    now = int(time.time())
    url = f"{secured['url']}/cds-services/fhirtwin-cardiorenal-risk"
    token = jwt.encode({"iss": EHR, "sub": "ehr", "aud": url, "exp": now + 300, "iat": now, "jti": str(uuid.uuid4())},
                       secured["ehr"], algorithm="ES384", headers={"kid": "ehr-1"})
    body = {"hook": "patient-view", "hookInstance": str(uuid.uuid4()), "fhirServer": base_url,
            "context": {"userId": "Practitioner/x", "patientId": PATIENT}}
    first = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert first.status_code == 200, first.text
    assert first.json()["cards"]
    replay = requests.post(url, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=120)
    assert replay.status_code == 401


def test_subscription_deliveries_carry_the_secret_set_by_subscribe(secured, base_url, http, capsys) -> None:
    """Finding 4: ``serve`` could not set the webhook secret. ``subscribe --secret-file`` puts it in the
    channel header, HAPI sends it, and only then does the delivery recompute the patient."""
    from datetime import UTC, datetime

    from fhirtwin.cli import main

    patient = "ftp-0174"  # in scope; no other test writes to it
    tag = {"system": "https://fhirtwin.org/CodeSystem/fhirtwin-tests", "code": "serve-auth-live"}
    endpoint = f"{secured['url']}/hooks/fhir"
    secret_file = secured["folder"] / "secret"
    generated = "https://fhirtwin.org/CodeSystem/fhirtwin|fhirtwin-generated"

    def current() -> set[str]:
        bundle = http.get(f"{base_url}/RiskAssessment", params={
            "subject": f"Patient/{patient}", "_tag": generated,
            "_tag:not": "https://fhirtwin.org/CodeSystem/fhirtwin|superseded", "_count": 100}).json()
        return {e["resource"]["id"] for e in bundle.get("entry", [])}

    before = current()
    observation_id = None
    try:
        assert main(["subscribe", "--server", base_url, "--endpoint", endpoint, "--payload",
                     "--secret-file", str(secret_file), "--filter", f"_tag={tag['system']}|{tag['code']}"]) == 0
        capsys.readouterr()
        ldl = {"resourceType": "Observation", "status": "final", "meta": {"tag": [tag]},
               "code": {"coding": [{"system": "http://loinc.org", "code": "13457-7"}]},
               "subject": {"reference": f"Patient/{patient}"},
               "effectiveDateTime": datetime.now(UTC).isoformat(timespec="seconds"),
               "valueQuantity": {"value": 150, "unit": "mg/dL", "system": "http://unitsofmeasure.org",
                                 "code": "mg/dL"}}
        created = http.post(f"{base_url}/Observation", json=ldl)
        assert created.status_code == 201, created.text
        observation_id = created.json()["id"]
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not (current() - before):
            time.sleep(0.5)
        assert current() - before, "the authenticated delivery did not recompute the patient"
    finally:
        main(["subscribe", "--server", base_url, "--endpoint", endpoint, "--off"])
        if observation_id:
            http.delete(f"{base_url}/Observation/{observation_id}")
