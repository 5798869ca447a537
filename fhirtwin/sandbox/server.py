"""Lifecycle of the local HAPI FHIR sandbox: build once with Maven, run with Java on loopback.

The server is fhirtwin's own Spring Boot launcher around HAPI's published JPA modules (sources in
the repository's ``sandbox/hapi``). Its H2 database lives in a data folder and survives restarts;
``reset`` wipes it. Only the process recorded in the pid file is ever stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

MAIN_CLASS = "org.fhirtwin.sandbox.SandboxServer"
DEFAULT_PORT = 8080
DEFAULT_JAVA_OPTS = "-Xmx2g -XX:+UseSerialGC -XX:TieredStopAtLevel=1"
_JAR = "target/fhirtwin-sandbox-hapi.jar"


class SandboxError(RuntimeError):
    """The sandbox could not be built, started or stopped; the message says why."""


def sandbox_home() -> Path:
    """The repository's ``sandbox/`` folder (override with FHIRTWIN_SANDBOX_DIR)."""
    override = os.environ.get("FHIRTWIN_SANDBOX_DIR")
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parents[2] / "sandbox"


@dataclass(frozen=True)
class Sandbox:
    """One sandbox instance: a port and a data folder. Several can run side by side."""

    port: int = DEFAULT_PORT
    data_dir: Path = field(default_factory=lambda: sandbox_home() / "data")
    home: Path = field(default_factory=sandbox_home)

    @classmethod
    def from_env(cls, port: int | None = None, data_dir: str | Path | None = None) -> Sandbox:
        port = port or int(os.environ.get("FHIRTWIN_SANDBOX_PORT", DEFAULT_PORT))
        home = sandbox_home()
        if data_dir is None:
            default = home / "data"
            data_dir = default if port == DEFAULT_PORT else default.with_name(f"data-{port}")
        return cls(port=port, data_dir=Path(data_dir).resolve(), home=home)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "server.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def project_dir(self) -> Path:
        return self.home / "hapi"

    # ------------------------------------------------------------------ build

    def _source_digest(self) -> str:
        digest = hashlib.sha256()
        files = [self.project_dir / "pom.xml", *sorted((self.project_dir / "src").rglob("*"))]
        for path in files:
            if path.is_file():
                digest.update(str(path.relative_to(self.project_dir)).encode())
                digest.update(path.read_bytes())
        return digest.hexdigest()

    def is_built(self) -> bool:
        stamp = self.project_dir / "target" / "build.sha256"
        jar = self.project_dir / _JAR
        return jar.exists() and stamp.exists() and stamp.read_text().strip() == self._source_digest()

    def build(self, *, quiet: bool = False) -> bool:
        """Build the server jar and its runtime classpath if sources changed; True if it built."""
        if self.is_built():
            return False
        for tool in ("mvn", "java"):
            if shutil.which(tool) is None:
                raise SandboxError(f"'{tool}' is not on PATH; the sandbox needs Java 17 and Maven")
        if not quiet:
            print("Building the HAPI FHIR sandbox with Maven (a first build downloads about 350 MB)…", flush=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        build_log = self.data_dir / "build.log"
        with build_log.open("w") as log:
            result = subprocess.run(
                ["mvn", "-B", "-ntp", "package", "-DskipTests"],
                cwd=self.project_dir,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            raise SandboxError(f"Maven build failed (exit {result.returncode}); end of {build_log}:\n"
                               + _tail(build_log))
        (self.project_dir / "target" / "build.sha256").write_text(self._source_digest())
        return True

    # -------------------------------------------------------------- lifecycle

    def _read_pid(self) -> int | None:
        try:
            return int(json.loads(self.pid_file.read_text())["pid"])
        except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
            return None

    def _owns(self, pid: int) -> bool:
        """True if pid is alive and is this sandbox's Java process (not a reused pid)."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            try:
                os.kill(pid, 0)
            except OSError:
                return False
            return True  # no /proc (non-Linux): trust the pid file
        args = [a.decode(errors="replace") for a in cmdline]
        return MAIN_CLASS in args and f"--fhirtwin.sandbox.port={self.port}" in args

    def _ready(self, timeout: float = 2.0) -> bool:
        try:
            response = requests.get(f"{self.base_url}/metadata", timeout=timeout,
                                    headers={"Accept": "application/fhir+json"})
        except requests.RequestException:
            return False
        return response.status_code == 200

    def status(self) -> dict:
        pid = self._read_pid()
        alive = pid is not None and self._owns(pid)
        ready = alive and self._ready()
        return {
            "running": bool(ready),
            "base_url": self.base_url,
            "port": self.port,
            "pid": pid if alive else None,
            "process_alive": alive,
            "data_dir": str(self.data_dir),
            "log_file": str(self.log_file),
            "built": self.is_built(),
        }

    def start(self, *, timeout: float = 300.0, quiet: bool = False) -> str:
        """Start (building first if needed) and wait for /metadata; harmless if already running."""
        pid = self._read_pid()
        if pid is not None and self._owns(pid):
            if self._wait_ready(pid, timeout):
                return self.base_url
            raise SandboxError(f"sandbox process {pid} is alive but {self.base_url}/metadata does not "
                               f"answer after {timeout:.0f} s; end of {self.log_file}:\n{_tail(self.log_file)}")
        if self._ready(timeout=1.0):
            raise SandboxError(f"port {self.port} already serves a FHIR server that this sandbox did not "
                               "start; stop it or choose another port (--port / FHIRTWIN_SANDBOX_PORT)")
        self.build(quiet=quiet)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        java_opts = os.environ.get("FHIRTWIN_SANDBOX_JAVA_OPTS", DEFAULT_JAVA_OPTS).split()
        classpath = os.pathsep.join([str(self.project_dir / _JAR), str(self.project_dir / "target" / "lib" / "*")])
        command = ["java", *java_opts, "-cp", classpath, MAIN_CLASS,
                   f"--fhirtwin.sandbox.port={self.port}", f"--fhirtwin.sandbox.data-dir={self.data_dir}"]
        with self.log_file.open("w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid_file.write_text(json.dumps({"pid": process.pid, "port": self.port,
                                             "base_url": self.base_url, "started_at": time.time()}))
        if not self._wait_ready(process.pid, timeout, spawned=process):
            exited = process.poll()
            if exited is None:
                _signal_group(process.pid, signal.SIGKILL)
                process.wait()
            self.pid_file.unlink(missing_ok=True)
            what = (f"exited with status {exited}" if exited is not None
                    else f"did not answer {self.base_url}/metadata within {timeout:.0f} s")
            raise SandboxError(f"the sandbox {what}; end of {self.log_file}:\n{_tail(self.log_file)}")
        return self.base_url

    def _wait_ready(self, pid: int, timeout: float, spawned: subprocess.Popen | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            gone = spawned.poll() is not None if spawned is not None else not self._owns(pid)
            if gone:
                return False
            if self._ready():
                return True
            time.sleep(1.0)
        return False

    def stop(self, *, timeout: float = 60.0) -> bool:
        """Stop this sandbox's own process (by pid file); True if one was stopped."""
        pid = self._read_pid()
        if pid is None or not self._owns(pid):
            self.pid_file.unlink(missing_ok=True)
            return False
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.5)
        if _alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.2)
        self.pid_file.unlink(missing_ok=True)
        return True

    def reset(self, *, timeout: float = 300.0, quiet: bool = False) -> bool:
        """Wipe the database; restart if it was running. Returns whether it is running after."""
        was_running = self.stop()
        shutil.rmtree(self.data_dir / "h2", ignore_errors=True)
        if was_running:
            self.start(timeout=timeout, quiet=quiet)
        return was_running


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of this process counts as gone
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except OSError:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
