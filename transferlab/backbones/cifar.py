"""Placeholder: filled by the backbone-zoo work (issue 4)."""
