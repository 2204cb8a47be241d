"""Shared test fixtures: where the read-only ../shared data lives, and a skip when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCHMARK = SHARED / "data" / "benchmark"
OFFICIAL = SHARED / "reference" / "official_weights"


def need(path: Path) -> Path:
    """Skip the calling test, naming the path, when read-only shared data is absent."""
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the project's shared data (../shared)")
    return path
