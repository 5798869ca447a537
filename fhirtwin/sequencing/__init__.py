"""Treatment sequencing: yearly start/intensify/add/stop decisions over the twin, solved exactly and learned.

Entry point: :func:`sequence` (TwinState or PatientInputs -> :class:`SequencePlan`). The decision process
(:mod:`.process`) is built from the engine's anchored hazards; :mod:`.mdp` solves it exactly;
:mod:`.policies` holds the comparators; :mod:`.learn` fits a policy across patients; :mod:`.env` exposes the
process as a gymnasium environment. Imports ``fhirtwin.sim``, never ``fhirtwin.fhir``.
"""

from fhirtwin.sequencing.plan import SequencePlan, SequencingError, Step, sequence
from fhirtwin.sequencing.process import Action, TherapyProcess, TherapySet, build_process

__all__ = ["Action", "SequencePlan", "SequencingError", "Step", "TherapyProcess", "TherapySet", "build_process",
           "sequence"]
