#!/usr/bin/env python3
"""Check the module layering that docs/architecture.md documents.

For every top-level module of src/ (a file `src/X.rs` or a folder `src/X/`), collect the
modules it names as `crate::Y` (in `use` lines and in paths), then report:
- import cycles between top-level modules (strongly connected components of the graph);
- imports that point up the layering (a module naming one of a higher layer).

Exit status 1 if anything is found. Usage: scripts/check-layers.py [--graph]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"

# Layer of each top-level module, lowest first (see docs/architecture.md). A module may use
# modules of its own layer or below.
LAYERS = [
    ["error", "files", "safetensors_header", "tensors", "alloc", "interrupt", "progress"],
    ["spec"],
    ["net"],
    ["checkpoint", "data"],
    ["eval", "engine"],
    ["lca"],
    ["output", "report"],
    ["journal"],
    ["analyze", "shard"],
    ["summarize", "inspect", "check", "plot", "html", "init"],
    ["cli"],
]
LAYER = {m: i for i, ms in enumerate(LAYERS) for m in ms}
# Upward imports known and assigned (printed, not counted): spec.rs names
# net::batch_norm::BnMode; the mode belongs in spec (the spec/registry work of issue 16).
PENDING: set[tuple[str, str]] = set()
# `lca::report` is an alias of `output` kept for callers not yet moved over.
ALIAS = {"report": "output"}


def modules() -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in SRC.iterdir():
        if p.name in ("lib.rs", "main.rs"):
            continue
        if p.suffix == ".rs":
            out[p.stem] = [p]
        elif p.is_dir():
            out[p.name] = sorted(p.rglob("*.rs"))
    return out


def strip_tests(text: str) -> str:
    # Unit tests (`#[cfg(test)] mod tests`) may use anything; they sit at the end of a file.
    # Comments (docs included) name modules without depending on them.
    i = text.find("#[cfg(test)]\nmod tests")
    text = text if i < 0 else text[:i]
    return re.sub(r"//[^\n]*", "", text)


def edges(mods: dict[str, list[Path]]) -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, files in mods.items():
        for f in files:
            text = strip_tests(f.read_text())
            for used in re.findall(r"crate::([a-z_][a-z0-9_]*)", text):
                used = ALIAS.get(used, used)
                if used != m and used in mods:
                    g[m].add(used)
            for group in re.findall(r"use crate::\{([^;]*)\}", text, re.S):
                for used in re.findall(r"(?:^|[,{\s])([a-z_][a-z0-9_]*)\s*(?:::|,|}|$)", group):
                    used = ALIAS.get(used, used)
                    if used != m and used in mods:
                        g[m].add(used)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    mods = modules()
    g = edges(mods)
    if "--graph" in sys.argv:
        for m in sorted(g, key=lambda m: (LAYER.get(m, 99), m)):
            print(f"{m} -> {', '.join(sorted(g[m])) or '-'}")
    bad = 0
    for comp in cycles(g):
        pending = any(a in comp and b in comp for a, b in PENDING)
        print(("pending cycle: " if pending else "cycle: ") + " <-> ".join(comp))
        bad += 0 if pending else 1
    for m in sorted(g):
        if m not in LAYER:
            print(f"unknown module {m}: add it to LAYERS and docs/architecture.md")
            bad += 1
            continue
        for u in sorted(g[m]):
            if LAYER.get(u, -1) > LAYER[m] and (m, u) in PENDING:
                print(f"pending upward import: {m} uses {u}")
            elif LAYER.get(u, -1) > LAYER[m]:
                print(f"upward import: {m} (layer {LAYER[m]}) uses {u} (layer {LAYER[u]})")
                bad += 1
    print(f"{len(g)} modules, {sum(len(v) for v in g.values())} imports, {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
