"""Specs shipped with the package (``transferlab demo`` runs quickstart.yaml)."""
