"""Shared fixtures. Integration and end-to-end tests run against the real HAPI FHIR sandbox,
started (and built) on first use; no fake stands in for the server. Unit tests never request them."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from ports import free_port

from fhirtwin.sandbox.server import Sandbox
from fhirtwin.writeback.jws import ENV_KEY_FILE, SigningKey, generate_key

FHIR_JSON = "application/fhir+json"


@pytest.fixture(scope="module")
def deployment_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningKey]:
    """A deployment signing key in ``FHIRTWIN_SIGNING_KEY_FILE`` for one test module (population runs sign
    their bundles; the variable is set before any Dask worker process starts, so workers inherit it)."""
    from cryptography.hazmat.primitives import serialization

    signing = generate_key("ES256")
    path = tmp_path_factory.mktemp("key") / "signing.pem"
    path.write_bytes(signing.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENV_KEY_FILE, str(path))
        yield signing


@pytest.fixture(scope="session", autouse=True)
def _state_dir(tmp_path_factory) -> None:
    """The service's default store (``$FHIRTWIN_STATE_DIR``) in a temporary folder, never the home directory."""
    import os

    os.environ["FHIRTWIN_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    box = Sandbox.from_env()
    box.start(timeout=600)
    return box


@pytest.fixture(scope="session")
def base_url(sandbox: Sandbox) -> str:
    return sandbox.base_url


@pytest.fixture()
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.headers.update({"Accept": FHIR_JSON, "Content-Type": FHIR_JSON, "Cache-Control": "no-cache"})
    yield session
    session.close()


@dataclass
class Delivery:
    method: str
    path: str
    body: bytes


@dataclass
class Receiver:
    """A loopback HTTP server that records what the FHIR server delivers to it."""

    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            state.deliveries.append(Delivery(self.command, self.path, self.rfile.read(length)))
            state.arrived.set()
            self.send_response(200)
            self.send_header("Content-Type", FHIR_JSON)
            self.end_headers()
            self.wfile.write(json.dumps({"resourceType": "OperationOutcome", "issue": []}).encode())

        do_POST = do_PUT = do_DELETE = _record

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def cohort():
    """The default synthetic cohort, as generated (deterministic)."""
    from fhirtwin.sandbox.cohort import generate_cohort

    return generate_cohort()


@pytest.fixture(scope="session")
def loaded_cohort(base_url: str, cohort):
    """Make sure the sandbox holds the default cohort (skips the upload when it already does)."""
    from fhirtwin.sandbox.load import load_sandbox

    load_sandbox(base_url)
    return cohort


@pytest.fixture(scope="session")
def start_service(tmp_path_factory):
    """Start `fhirtwin serve` as a real subprocess: ``start(fhir_server, port=None) -> base URL``.

    Every service started is stopped at the end of the session, and its log must hold no traceback.
    """
    import os
    import subprocess
    import sys
    import time

    started: list[tuple[subprocess.Popen, object]] = []

    def start(fhir_server: str, port: int | None = None, *, command: list[str] | None = None,
              env: dict[str, str] | None = None, cwd: object = None, args: list[str] | None = None) -> str:
        """``fhirtwin serve`` (or ``command`` + serve arguments, e.g. an installed script) until /health answers.

        ``args``: extra serve arguments (default ``--dev-no-auth``: the doors open, as on a developer's loopback).
        Each service gets its own store in a temporary folder."""
        port = port or free_port()
        folder = tmp_path_factory.mktemp("service")
        log_path = folder / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*(command or [sys.executable, "-m", "fhirtwin.cli"]), "serve", "--host", "127.0.0.1",
                 "--port", str(port), "--fhir-server", fhir_server, "--log-level", "warning",
                 "--store", str(folder / "service.sqlite3"), *(["--dev-no-auth"] if args is None else args)],
                stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                env={**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"})
        started.append((proc, log_path))
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"fhirtwin serve did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)

    yield start
    for proc, log_path in started:
        proc.terminate()
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        text = log_path.read_text()
        assert "Traceback" not in text, text[-3000:]
