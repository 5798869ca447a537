"""fhirtwin: FHIR-native multi-scale digital twins for personalised medicine."""

__version__ = "0.3.0"
