"""Validation of the engine against what it did not make: published randomised trials replicated in silico."""
