"""Model assembly, freezing, the fit() loop and checkpoints."""
