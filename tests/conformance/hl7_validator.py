"""The official HL7 FHIR Validator: build on first use, one run per test session in the background.

One JVM validates every file together (profiles, cohort inputs, what fhirtwin writes), because loading
the R4 core definitions is most of a run's cost. The run starts when collection finishes (a thread that
only waits on subprocesses: Maven on first use, the input builder, the validator), and the conformance
tests, moved to the end of the session, wait for its result, so it overlaps the other tests. The
validator is built on first use under ``sandbox/validator/target/`` (see ``sandbox/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VALIDATOR = ROOT / "sandbox" / "validator"
TARGET = VALIDATOR / "target"
FHIR_HOME = TARGET / "fhir-home"
PACKAGES = FHIR_HOME / ".fhir" / "packages"
CORE_JAR = TARGET / "core-src" / "hapi-fhir-validation-resources-r4.jar"
STAMP = TARGET / "build.sha256"
PROFILES = ROOT / "fhirtwin" / "profiles"
JAVA_OPTS = ["-Xmx1536m", "-XX:+UseSerialGC"]


@dataclass
class ValidationRun:
    """What the validator said, per file (absolute path -> OperationOutcome issues)."""

    issues: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    work_dir: Path | None = None
    command: list[str] = field(default_factory=list)
    seconds: float = 0.0
    log_tail: str = ""
    error: str | None = None


def _source_digest() -> str:
    digest = hashlib.sha256()
    for path in [VALIDATOR / "pom.xml", VALIDATOR / "fhir-settings.json", *sorted((VALIDATOR / "src").rglob("*"))]:
        if path.is_file():
            digest.update(str(path.relative_to(VALIDATOR)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _run(cmd: list[str], log: Path, *, cwd: Path, timeout: float) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        result = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed (exit {result.returncode}); end of {log}:\n{log.read_text()[-3000:]}")


def build_validator(log: Path) -> None:
    """The validator's classpath (Maven) and the offline R4 core package, rebuilt only when sources change."""
    if STAMP.exists() and STAMP.read_text().strip() == _source_digest():
        return
    for tool in ("mvn", "java"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"'{tool}' is not on PATH; the HL7 validator needs Java 17 and Maven")
    _run(["mvn", "-B", "-ntp", "-q", "package", "-DskipTests"], log, cwd=VALIDATOR, timeout=1800)
    _run(["java", "-cp", f"{TARGET / 'classes'}{os.pathsep}{TARGET / 'lib' / '*'}",
          "org.fhirtwin.validator.BuildCorePackage", str(CORE_JAR), str(PACKAGES)], log, cwd=VALIDATOR, timeout=600)
    # ValidatorCli 6.5.18 reads its settings only from <user.home>/.fhir (its -fhir-settings option fails):
    # no network access at all, no package servers.
    shutil.copyfile(VALIDATOR / "fhir-settings.json", FHIR_HOME / ".fhir" / "fhir-settings.json")
    STAMP.write_text(_source_digest())


def validator_command(files: list[Path], output: Path) -> list[str]:
    """The ValidatorCli command line: R4 core, the fhirtwin profiles as an IG, no terminology server."""
    return ["java", *JAVA_OPTS, f"-Duser.home={FHIR_HOME}", "-cp", str(TARGET / "lib" / "*"),
            "org.hl7.fhir.validation.ValidatorCli", *map(str, files),
            "-version", "4.0.1", "-tx", "n/a", "-ig", str(PROFILES),
            "-txCache", str(TARGET / "tx-cache"), "-output", str(output)]


class BackgroundValidation:
    """Builds the inputs and runs the validator in a thread; :meth:`result` waits for it."""

    def __init__(self) -> None:
        self.work_dir = Path(tempfile.mkdtemp(prefix="fhirtwin-hl7-"))
        self.run = ValidationRun(work_dir=self.work_dir)
        self._proc: subprocess.Popen | None = None
        self._cancelled = False
        self._thread = threading.Thread(target=self._work, name="hl7-validator", daemon=True)

    def start(self) -> BackgroundValidation:
        self._thread.start()
        return self

    def _work(self) -> None:
        started = time.monotonic()
        log = self.work_dir / "validator.log"
        try:
            build_validator(log)
            inputs = self.work_dir / "inputs"
            _run([sys.executable, str(HERE / "conformance_inputs.py"), str(inputs)], log, cwd=ROOT, timeout=600)
            self.run.manifest = json.loads((inputs / "manifest.json").read_text())
            files = sorted(PROFILES.rglob("*.json")) + sorted(p for p in inputs.glob("*.json")
                                                                if p.name != "manifest.json")
            output = self.work_dir / "outcome.json"
            self.run.command = validator_command(files, output)
            with log.open("a") as out:
                if self._cancelled:
                    return
                self._proc = subprocess.Popen(self.run.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            try:
                code = self._proc.wait(timeout=1200)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
                raise RuntimeError("the HL7 validator did not finish within 20 minutes") from None
            if not output.exists():
                raise RuntimeError(f"the HL7 validator wrote no result (exit {code})")
            outcome = json.loads(output.read_text())
            outcomes = [e["resource"] for e in outcome.get("entry", [])] if outcome["resourceType"] == "Bundle" \
                else [outcome]
            for oo in outcomes:
                name = next(e["valueString"] for e in oo.get("extension", [])
                            if e["url"].endswith("/operationoutcome-file"))
                self.run.issues[str(Path(name).resolve())] = oo.get("issue", [])
        except Exception as exc:  # reported by the tests, never lost
            self.run.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.run.seconds = time.monotonic() - started
            if log.exists():
                self.run.log_tail = log.read_text()[-4000:]

    def result(self, timeout: float = 1500) -> ValidationRun:
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.run.error = "the HL7 validation is still running"
        return self.run

    def stop(self) -> None:
        """End the validator if it still runs (only the process this object started) and clean up."""
        self._cancelled = True
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._thread.join(30)
        if not self._thread.is_alive():
            shutil.rmtree(self.work_dir, ignore_errors=True)
