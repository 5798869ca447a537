"""Local development sandbox: the HAPI FHIR server lifecycle and the synthetic cohort."""
