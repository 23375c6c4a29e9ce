"""The package version: the installed distribution's, which maturin takes from Cargo.toml."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__: str = version("loss-change-allocation")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"
