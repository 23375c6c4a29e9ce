"""Shared pytest fixtures: the lca binary under test, the shipped example.

The suite tests the installed package when there is one (CI installs the wheel); from a bare
source tree it tests `python/lca` with the binary from $LCA_BIN or `target/release/lca`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

if importlib.util.find_spec("lca") is None:
    sys.path.insert(0, str(REPO / "python"))

from lca._binary import find_binary  # noqa: E402


@pytest.fixture(scope="session")
def lca_bin() -> Path:
    """The lca binary (set LCA_BIN to test a particular build)."""
    return find_binary()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture()
def mlp_run(tmp_path: Path) -> Path:
    """A copy of the shipped example (fixtures/mlp: 101 checkpoints, spec, data)."""
    dst = tmp_path / "mlp"
    shutil.copytree(REPO / "fixtures" / "mlp", dst, ignore=shutil.ignore_patterns("golden"))
    return dst
