"""Transport: FHIR R4 REST client, SMART auth, paging, retries, batch/transaction, NDJSON."""
