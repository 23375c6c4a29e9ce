"""The package version: the installed distribution's, which maturin takes from Cargo.toml.

Run from a source tree without installing (``PYTHONPATH=python``), the version is read from
the tree's ``Cargo.toml``, so ``lca.__version__`` and ``lca --version`` agree either way.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "loss-change-allocation"


def _cargo_version(cargo_toml: Path) -> str | None:
    """The `version` of the `[package]` table of a Cargo.toml, or None."""
    try:
        text = cargo_toml.read_text(encoding="utf-8")
    except OSError:
        return None
    in_package = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            in_package = stripped == "[package]"
            continue
        if in_package:
            m = re.match(r'version\s*=\s*"([^"]+)"', stripped)
            if m:
                return m.group(1)
    return None


def _source_tree_version() -> str | None:
    """The version of the source tree this file sits in (python/lca/ under the repository)."""
    return _cargo_version(Path(__file__).resolve().parents[2] / "Cargo.toml")


def _find_version() -> str:
    here = Path(__file__).resolve()
    try:
        dist_version = version(DISTRIBUTION)
    except PackageNotFoundError:
        dist_version = None
    # An editable install or a plain source checkout: trust the tree's Cargo.toml when this
    # file is inside one (an installed wheel has no Cargo.toml two levels up).
    tree = _source_tree_version() if (here.parents[2] / "Cargo.toml").is_file() else None
    if tree is not None:
        return pep440(tree)
    if dist_version is not None:
        return dist_version
    return "0.0.0+unknown"


def pep440(cargo_version: str) -> str:
    """A Cargo (semver) version as maturin writes it into the wheel's metadata (PEP 440):
    `0.1.0` stays, `0.2.0-alpha.1` becomes `0.2.0a1`, `-beta.N` `bN`, `-rc.N` `rcN`,
    `-dev.N` `.devN`."""
    m = re.fullmatch(r"(\d+\.\d+\.\d+)(?:-([A-Za-z]+)\.?(\d*))?(?:\+(.+))?", cargo_version)
    if not m:
        return cargo_version
    base, pre, num, local = m.groups()
    out = base
    if pre:
        n = num or "0"
        short = {"alpha": "a", "a": "a", "beta": "b", "b": "b", "rc": "rc", "c": "rc"}
        if pre.lower() in short:
            out += short[pre.lower()] + n
        elif pre.lower() == "dev":
            out += ".dev" + n
        else:
            return cargo_version
    if local:
        out += "+" + local
    return out


__version__: str = _find_version()
