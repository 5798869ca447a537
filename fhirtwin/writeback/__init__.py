"""Write-back: RiskAssessment, CarePlan and signed Provenance in one transaction."""
