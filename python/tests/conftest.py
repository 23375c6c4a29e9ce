"""Shared pytest fixtures: the lca binary under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from lca._binary import find_binary


@pytest.fixture(scope="session")
def lca_bin() -> Path:
    """The lca binary (set LCA_BIN to test a particular build)."""
    return find_binary()
