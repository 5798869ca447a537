"""Adapters: one module per FHIR source kind, each emitting Evidence for the TwinState."""
