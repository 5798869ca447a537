"""A pip-installed fhirtwin works without the checkout around it.

The wheel is built from a copy of the checkout's sources and installed into a fresh virtual environment in a
temporary directory; the installed ``fhirtwin`` console script then runs from a working directory outside the
checkout. ``fhirtwin register`` must upload every conformance resource of ``fhirtwin/profiles`` (read back from
the sandbox by canonical URL) and ``fhirtwin serve`` must answer ``/model-card``: both read package data, so a
file missing from the wheel, or a path relative to the checkout, fails here.

Timings (build, venv, install) are printed (``pytest -s``); tests never assert on wall time. Dependencies come
from the package index through pip's cache; ``FHIRTWIN_WHEEL_FIND_LINKS`` (a folder of wheels) is passed to pip
as ``--find-links`` when set.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROFILES = REPO / "fhirtwin" / "profiles"
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    workdir: Path
    env: dict[str, str]

    def script(self, name: str) -> str:
        return str(self.venv / "bin" / name)


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 900) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result.stdout


def _profile_files() -> list[Path]:
    """The conformance resources of the checkout, found by globbing the source tree."""
    files = sorted(PROFILES.rglob("*.json"))
    assert files, f"no JSON files under {PROFILES.relative_to(REPO)}"
    return files


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    root = Path(tempfile.mkdtemp(prefix="fhirtwin-wheel-")).resolve()
    assert not root.is_relative_to(REPO), "the wheel test must run outside the checkout"
    try:
        timings: dict[str, float] = {}
        # Build from a copy of the sources: an in-tree build would leave build/ and *.egg-info in the checkout.
        src = root / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "fhirtwin", src / "fhirtwin", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        wheels = root / "wheels"
        started = time.monotonic()
        _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--disable-pip-version-check",
              "-w", str(wheels), str(src)], cwd=root)
        timings["build"] = time.monotonic() - started
        (wheel,) = wheels.glob("fhirtwin-*.whl")

        venv = root / "venv"
        started = time.monotonic()
        _run([sys.executable, "-m", "venv", str(venv)], cwd=root)
        timings["venv"] = time.monotonic() - started
        # nothing of the checkout may reach the installed commands: no import path, no variable naming it
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PATH") and str(REPO) not in v}
        path = [str(venv / "bin"), *(p for p in os.environ.get("PATH", "").split(os.pathsep) if str(REPO) not in p)]
        env.update(VIRTUAL_ENV=str(venv), PATH=os.pathsep.join(path), PYTHONNOUSERSITE="1", PYTHONUNBUFFERED="1")
        find_links = os.environ.get("FHIRTWIN_WHEEL_FIND_LINKS")
        started = time.monotonic()
        _run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *(["--find-links", find_links] if find_links else []), str(wheel)], cwd=root, env=env)
        timings["install"] = time.monotonic() - started
        print("wheel test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))

        workdir = root / "work"
        workdir.mkdir()
        location = _run([str(venv / "bin" / "python"), "-c", "import fhirtwin; print(fhirtwin.__file__)"],
                        cwd=workdir, env=env).strip()
        assert Path(location).resolve().is_relative_to(venv), f"fhirtwin imported from {location}, not the venv"
        yield Installed(wheel, venv, workdir, env)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_wheel_ships_profiles_and_model_card(installed: Installed) -> None:
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    missing = [f"fhirtwin/{p.relative_to(REPO / 'fhirtwin').as_posix()}" for p in _profile_files()]
    missing = [name for name in missing if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert "fhirtwin/model-card.md" in names


def test_installed_register_uploads_every_profile(installed: Installed, base_url: str) -> None:
    result = subprocess.run([installed.script("fhirtwin"), "register", "--server", base_url], cwd=installed.workdir,
                            env=installed.env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    files = _profile_files()
    found = []
    with requests.Session() as http:
        http.headers.update({"Accept": FHIR_JSON, "Cache-Control": "no-cache"})
        for path in files:
            resource = json.loads(path.read_text("utf-8"))
            kind, url = resource["resourceType"], resource["url"]
            response = http.get(f"{base_url}/{kind}", params={"url": url}, timeout=30)
            assert response.status_code == 200, response.text[:500]
            ids = [e["resource"]["id"] for e in response.json().get("entry", [])]
            if resource["id"] in ids:
                found.append(path.name)
    assert len(found) == len(files), sorted({p.name for p in files} - set(found))


def test_installed_serve_answers_model_card(installed: Installed, base_url: str, start_service) -> None:
    # the installed script, outside the checkout; start_service checks its log for tracebacks at the end
    url = start_service(base_url, command=[str(installed.script("fhirtwin"))], env=installed.env,
                        cwd=installed.workdir)
    card = requests.get(f"{url}/model-card", headers={"Accept": "text/markdown"}, timeout=10)
    assert card.status_code == 200
    expected = (REPO / "fhirtwin" / "model-card.md").read_text("utf-8")
    assert card.text == expected
    # the HTI-1 card: no checkout around an installed package, so no generated validation results
    attributes = requests.get(f"{url}/model-card", timeout=10).json()["attributes"]
    assert attributes["validity_external"]["status"] == "not-generated"
