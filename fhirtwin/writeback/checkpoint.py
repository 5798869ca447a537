"""The local checkpoint of ``fhirtwin run``: which patients are done, so that a rerun skips them.

Why: after a crash (or a SIGKILL) part-way through ``run --all``, the rerun would otherwise re-simulate
every patient. The rerun still reads each record (one request, which also brings fhirtwin's stored
results), but it simulates only patients whose inputs changed or whose results are no longer current.

One SQLite file per FHIR base URL (``run-<digest of the URL>.sqlite``) in the state folder:
``$FHIRTWIN_STATE_DIR``, else ``$XDG_STATE_HOME/fhirtwin``, else ``~/.local/state/fhirtwin``. Per patient
it records a digest of the inputs (every resource of the record with its version, plus what else fixes
the results: model, settings, package version) and the outputs (``Type/id`` of the results current after
the write, and the run's Provenance). Each patient is committed on its own, so a killed run loses at
most the patient in flight. A patient is skipped when its input digest is unchanged **and** its current
results on the server are exactly the recorded outputs (a result superseded, retired or added by another
door since makes it run again). Nothing in the file names a patient beyond the id the server uses.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fhirtwin.writeback.transaction import RESULT_TYPES, is_superseded, key_of


def state_dir() -> Path:
    """Where fhirtwin keeps local state: ``$FHIRTWIN_STATE_DIR``, ``$XDG_STATE_HOME/fhirtwin`` or
    ``~/.local/state/fhirtwin`` (the XDG Base Directory default for state data)."""
    explicit = os.environ.get("FHIRTWIN_STATE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "fhirtwin"


def checkpoint_path(base_url: str, folder: Path | None = None) -> Path:
    """The checkpoint file of one FHIR base URL (the URL itself is hashed, not written into the name)."""
    digest = hashlib.sha256(base_url.rstrip("/").encode("utf-8")).hexdigest()[:16]
    return (folder or state_dir()) / f"run-{digest}.sqlite"


def input_digest(resources: Iterable[Mapping[str, Any]], settings: Mapping[str, Any]) -> str:
    """Digest of a record's versioned resources and the settings that fix its results."""
    refs = sorted(f"{r.get('resourceType')}/{r.get('id')}/_history/{(r.get('meta') or {}).get('versionId')}"
                  for r in resources)
    text = json.dumps({"inputs": refs, "settings": dict(settings)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def current_results(stored: Iterable[Mapping[str, Any]]) -> list[str]:
    """``Type/id`` of fhirtwin's current (untagged) results among stored ones, sorted."""
    return sorted(f"{r['resourceType']}/{r['id']}" for r in stored
                  if r.get("resourceType") in RESULT_TYPES and key_of(dict(r)) and not is_superseded(dict(r)))


@dataclass(frozen=True)
class Done:
    """What the checkpoint holds for a patient."""

    patient_id: str
    digest: str
    outputs: list[str]
    provenance: str | None


class CheckpointError(ValueError):
    """The checkpoint file cannot be used (corrupt, locked, unwritable): named, with the way out."""


class Checkpoint:
    """The checkpoint file of one server; use as a context manager (or call :meth:`close`)."""

    def __init__(self, path: Path, base_url: str = "") -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS patient (id TEXT PRIMARY KEY, digest TEXT NOT NULL, "
                             "outputs TEXT NOT NULL, provenance TEXT)")
            self._db.execute("CREATE TABLE IF NOT EXISTS server (base_url TEXT)")
            if base_url and not self._db.execute("SELECT 1 FROM server").fetchone():
                self._db.execute("INSERT INTO server VALUES (?)", (base_url,))
            self._db.commit()
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointError(f"the checkpoint {path} cannot be used ({type(exc).__name__}): move it aside "
                                  "or run with --no-checkpoint") from exc

    @classmethod
    def for_server(cls, base_url: str, folder: Path | None = None) -> Checkpoint:
        return cls(checkpoint_path(base_url, folder), base_url)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    def get(self, patient_id: str) -> Done | None:
        row = self._db.execute("SELECT digest, outputs, provenance FROM patient WHERE id = ?", (patient_id,)).fetchone()
        if row is None:
            return None
        try:
            outputs = json.loads(row[1])
        except (ValueError, TypeError):
            return None  # an unreadable entry: the patient simply runs again
        return Done(patient_id, str(row[0]), list(outputs) if isinstance(outputs, list) else [], row[2])

    def skip(self, patient_id: str, digest: str, stored: Iterable[Mapping[str, Any]] | None) -> Done | None:
        """The checkpoint entry when the patient needs no run: same inputs, recorded outputs still current."""
        done = self.get(patient_id)
        if done is None or stored is None or done.digest != digest:
            return None
        return done if sorted(done.outputs) == current_results(stored) else None

    def record(self, patient_id: str, digest: str, outputs: Iterable[str], provenance: str | None) -> None:
        """Mark a patient done (committed at once: a run killed later keeps it)."""
        self._db.execute("INSERT OR REPLACE INTO patient VALUES (?, ?, ?, ?)",
                         (patient_id, digest, json.dumps(sorted(set(outputs))), provenance))
        self._db.commit()

    def forget(self, patient_id: str) -> None:
        """Drop a patient (its write failed: it must run again)."""
        self._db.execute("DELETE FROM patient WHERE id = ?", (patient_id,))
        self._db.commit()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM patient").fetchone()[0])
