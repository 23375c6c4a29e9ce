"""Finding and running the `lca` binary that ships in the wheel."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path


class LcaError(RuntimeError):
    """`lca` exited with an error; the message is lca's own."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


def find_binary() -> Path:
    """The `lca` executable: $LCA_BIN, else the one installed beside this Python (the wheel's
    scripts directory), else `lca` on PATH, else a development build in the source tree."""
    env = os.environ.get("LCA_BIN")
    if env:
        return Path(env)
    exe = "lca.exe" if sys.platform == "win32" else "lca"
    scripts = Path(sysconfig.get_path("scripts")) / exe
    if scripts.is_file():
        return scripts
    on_path = shutil.which(exe)
    if on_path:
        return Path(on_path)
    repo = Path(__file__).resolve().parents[2]
    for profile in ("release", "debug"):
        dev = repo / "target" / profile / exe
        if dev.is_file():
            return dev
    raise FileNotFoundError(
        "the lca binary was not found: install the package (pip install .) or set LCA_BIN"
    )
