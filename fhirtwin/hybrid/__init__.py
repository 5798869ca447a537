"""Hybrid mechanistic + learned dynamics: a governed residual on the mechanistic biomarker trajectories.

Importing this package registers the ``fhirtwin-hybrid`` model (:class:`HybridTwin`). Training reads a staged
population (:func:`~fhirtwin.hybrid.data.dataset_from_stage`) and fits the residual
(:func:`~fhirtwin.hybrid.train.fit_residual`); the result is a versioned artifact folder
(:class:`~fhirtwin.hybrid.artifact.ResidualArtifact`). See docs/hybrid.md.
"""

from __future__ import annotations

from fhirtwin.hybrid.artifact import ENV_ARTIFACT, ENV_SWITCH, ArtifactError, BiomarkerResidual, ResidualArtifact
from fhirtwin.hybrid.model import HybridTwin, configured_model

__all__ = ["ENV_ARTIFACT", "ENV_SWITCH", "ArtifactError", "BiomarkerResidual", "HybridTwin", "ResidualArtifact",
           "configured_model"]
