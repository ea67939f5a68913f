"""Shared fixtures. Everything a test needs it makes itself: no downloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).resolve().parent / "reference"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"  # screenshots etc., kept after the run


def read_reference(arch: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of a released model, from the listing shipped in tests/reference."""
    rows = (REFERENCE / f"{arch}_state_dict.tsv").read_text().splitlines()[1:]
    out = []
    for row in rows:
        key, shape, _dtype = row.split("\t")
        out.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return out


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
