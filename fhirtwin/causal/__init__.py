"""The causal layer: the declared causal graph of the twin, do() and individual counterfactuals on the engine,
and the parametric g-formula for time-varying treatment strategies in a population.

It reads the engine (``fhirtwin.sim``) and the twin (``fhirtwin.twin``), never FHIR.
"""
