"""Front-door web service: $simulate, Subscription webhook, CDS Hooks, SMART launch."""
