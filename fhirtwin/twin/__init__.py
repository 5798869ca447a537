"""TwinState: the typed multi-scale state built from Evidence; the contract between reading and simulating."""
