"""Shared test configuration: integration tests run against the real local HAPI sandbox."""
