"""A minimal TOML writer for the spec files lca reads (tables, arrays of tables, scalars)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any


def value(v: Any) -> str:
    """One TOML value: bool, int, float, string, array or inline table."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot write {v!r} in a spec")
        text = repr(v)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, Sequence):
        return "[" + ", ".join(value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} in a spec")


def key(k: str) -> str:
    """A bare key when possible, else a quoted one."""
    if k and all(c.isalnum() or c in "_-" for c in k):
        return k
    return json.dumps(k)


def table(name: str, entries: Mapping[str, Any], array: bool = False) -> str:
    """`[name]` (or `[[name]]`) and its `key = value` lines."""
    head = f"[[{name}]]" if array else f"[{name}]"
    lines = [head] + [f"{key(k)} = {value(v)}" for k, v in entries.items() if v is not None]
    return "\n".join(lines) + "\n"
