"""Names of categories and defect types: folder names, user input and knowledge base keys."""

from __future__ import annotations


def normalize_name(name: str) -> str:
    """Folder names, user input and KB keys meet in one spelling: lower_snake_case."""
    return "_".join(name.strip().lower().replace("-", " ").replace("_", " ").split())
