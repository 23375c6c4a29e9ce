"""Loss Change Allocation (Lan et al., NeurIPS 2019) from PyTorch training runs.

`import lca` needs only numpy; torch is imported by the parts that need it (the Recorder,
tracing a module into a spec, the PyTorch engine's worker) when they are first used.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from ._version import __version__

__all__ = ["__version__", "Recorder", "trace_spec", "analyze", "load", "Results", "LcaError"]

# name -> module that defines it, imported on first access (keeps `import lca` torch-free).
_LAZY = {
    "Recorder": "lca.recorder",
    "trace_spec": "lca.trace",
    "analyze": "lca.results",
    "load": "lca.results",
    "Results": "lca.results",
    "LcaError": "lca._binary",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lca' has no attribute {name!r}")
