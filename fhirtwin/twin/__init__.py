"""TwinState: the typed multi-scale state built from Evidence; the contract between reading and simulating."""

from fhirtwin.twin.evidence import Evidence, Scale, SourceRef, TimePoint, Value, to_instant
from fhirtwin.twin.ledger import Ledger, LedgerEntry, LedgerKind
from fhirtwin.twin.state import FRAME_COLUMNS, Demographics, MissingEvidence, TwinState
from fhirtwin.twin.variables import UnknownVariable, Variable, get_variable, registry

__all__ = [
    "FRAME_COLUMNS",
    "Demographics",
    "Evidence",
    "Ledger",
    "LedgerEntry",
    "LedgerKind",
    "MissingEvidence",
    "Scale",
    "SourceRef",
    "TimePoint",
    "TwinState",
    "UnknownVariable",
    "Value",
    "Variable",
    "get_variable",
    "registry",
    "to_instant",
]
