"""Locations of the golden model data copied from ../shared/golden (see tests/data/models)."""

from pathlib import Path

import pytest

MODELS = Path(__file__).parent / "data" / "models"


def golden_file(name: str, filename: str = "config.json") -> Path:
    """A golden model file, e.g. `golden_file("nat_rand", "original.pth")`."""
    path = MODELS / name / filename
    if not path.is_file():
        pytest.fail(f"golden file {path} is missing (copy it from ../shared/golden/{name})")
    return path


def golden_dir(name: str) -> Path:
    """Folder holding the golden model's config.json, weights and expected.npz."""
    return golden_file(name).parent
