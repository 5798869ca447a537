"""Simulation: published equations, mechanistic dynamics, interventions, uncertainty."""
