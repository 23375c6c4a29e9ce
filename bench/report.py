"""Print the benchmark table from the results bench/compare.sh collected (Markdown, so that it
can be pasted into docs/performance.md).

Usage: python report.py RESULTS_DIR
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

MIB = 1 << 20


def load(d: str, name: str) -> Any:
    """The parsed JSON file d/name (a dict or a list), or None when it is absent."""
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return json.load(f)


def time_v(d: str, name: str) -> dict[str, Any] | None:
    """Wall seconds and peak RSS (bytes) from a `/usr/bin/time -v` log, plus lca's own lines."""
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return None
    text = open(p).read()
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) * 1024
    m = re.search(
        r"analysed (\d+) steps .* with (\d+) gradient evaluations over (\d+) samples", text
    )
    res = re.search(r"residual: Σ\|r\|/\|ΔL\| = (\S+)%", text)
    return {
        "seconds": secs,
        "rss": rss,
        "steps": int(m.group(1)),
        "evaluations": int(m.group(2)),
        "samples": int(m.group(3)),
        "rel_abs_residual_pct": float(res.group(1)) if res else None,
    }


def fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def spread(lca_all: list[float] | None, tor_all: list[float] | None) -> str:
    """The range of the speed-up over the repetitions: slowest PyTorch run against fastest lca
    run and the other way round, with the number of repetitions."""
    if not lca_all or not tor_all:
        return "–"
    lo, hi = min(tor_all) / max(lca_all), max(tor_all) / min(lca_all)
    return f"{lo:.2f}–{hi:.2f} ({len(lca_all)}/{len(tor_all)} runs)"


def torch_version(d: str, tgemm: dict[str, Any] | None) -> str:
    """PyTorch's version from whichever result recorded it."""
    if tgemm and tgemm.get("torch"):
        return tgemm["torch"]
    for name in sorted(os.listdir(d)):
        if name.endswith(".json") and name != "machine.json":
            r = load(d, name)
            for x in r if isinstance(r, list) else [r]:
                if isinstance(x, dict) and x.get("torch"):
                    return x["torch"]
    return "?"


def time_v_reps(d: str, stem: str) -> dict[str, Any] | None:
    """`time_v` of every repetition STEM_r<i>.time (or the single STEM.time)."""
    names = sorted(f for f in os.listdir(d) if re.fullmatch(re.escape(stem) + r"_r\d+\.time", f))
    runs = [time_v(d, f) for f in names] or [time_v(d, stem + ".time")]
    runs = [r for r in runs if r]
    if not runs:
        return None
    out = dict(runs[0])
    out["all_seconds"] = [r["seconds"] for r in runs]
    out["seconds"] = median(out["all_seconds"])
    out["rss"] = max(r["rss"] for r in runs)
    return out


def load_reps(d: str, stem: str) -> dict[str, Any] | None:
    """JSON results of every repetition STEM_r<i>.json (or the single STEM.json), with the
    median `seconds_per_step` and all of them."""
    names = sorted(f for f in os.listdir(d) if re.fullmatch(re.escape(stem) + r"_r\d+\.json", f))
    runs = [load(d, f) for f in names] or [load(d, stem + ".json")]
    runs = [r for r in runs if r]
    if not runs:
        return None
    out = dict(runs[0])
    out["all_seconds_per_step"] = [r["seconds_per_step"] for r in runs]
    out["seconds_per_step"] = median(out["all_seconds_per_step"])
    return out


def main() -> None:
    d = sys.argv[1]
    machine = load(d, "machine.json") or {}
    gemm, tgemm = load(d, "gemm.json"), load(d, "torch_gemm.json")
    rows: list[list[str]] = []

    # A ceiling is the GEMM GFLOP/s of the row's library, "self" for the GEMM row itself, or None.
    def pct(g: float | None, c: float | str | None) -> str:
        return "ceiling" if c == "self" else fmt(g / c * 100 if g and c else None, ".0f")

    def row(
        name: str,
        lca_s: float | None,
        tor_s: float | None,
        flops: float | None,
        lca_ceiling: float | str | None,
        tor_ceiling: float | str | None,
        lca_all: list[float] | None = None,
        tor_all: list[float] | None = None,
    ) -> None:
        lg = flops / lca_s / 1e9 if lca_s and flops else None
        tg = flops / tor_s / 1e9 if tor_s and flops else None
        rows.append(
            [
                name,
                fmt(lca_s, ".4f"),
                fmt(lg, ".1f"),
                pct(lg, lca_ceiling),
                fmt(tor_s, ".4f"),
                fmt(tg, ".1f"),
                pct(tg, tor_ceiling),
                fmt(tor_s / lca_s if lca_s and tor_s else None, ".2f"),
                spread(lca_all, tor_all),
            ]
        )

    n = gemm["n"] if gemm else 2048
    gflop = 2.0 * n**3
    lca_c2 = gemm["parallel_gflops"] if gemm else None
    tor_c2 = tgemm["parallel_gflops"] if tgemm else None
    threads = gemm["threads"] if gemm else 2
    if gemm or tgemm:
        row(
            f"f32 GEMM {n}³, 1 thread",
            gemm and gemm["single_seconds"],
            tgemm and tgemm["single_seconds"],
            gflop,
            None,
            None,
        )
        row(
            f"f32 GEMM {n}³, {threads} threads (lca: {threads} products at once, s per product)",
            gemm and gemm["parallel_seconds"] / threads,
            tgemm and tgemm["parallel_seconds"],
            gflop,
            "self",
            "self",
        )
    skipped = []
    torch_chunks = {}
    for key, label in (("mnist_fc", "MNIST-FC"), ("lenet", "LeNet")):
        g = load(d, f"grad_{key}.json")
        # PyTorch at each chunk size it ran with: the faster one is the reference.
        tries = [load(d, f) for f in sorted(os.listdir(d)) if f.startswith(f"torch_grad_{key}")]
        tries = [x for x in tries if x]
        t = min(tries, key=lambda x: x["median_seconds"]) if tries else None
        if tries:
            torch_chunks[key] = ", ".join(
                f"chunk {x['chunk']:,}: {x['median_seconds']:.4f} s" for x in tries
            )
        skip = os.path.join(d, f"grad_{key}.skipped")
        if os.path.exists(skip):
            skipped.append(f"{label} loss+gradient: skipped, {open(skip).read().strip()}")
            continue
        if not (g or t):
            continue
        ref = g or t
        if g and t and g["flops"] != t["flops"]:
            print(f"warning: {label}: lca counts {g['flops']:.4g} FLOP, PyTorch {t['flops']:.4g}")
        chunks = f"chunk {g['chunk']:,}" if g else ""
        if t:
            chunks += f"{' / ' if g else ''}PyTorch chunk {t['chunk']:,}"
        row(
            f"{label} loss+gradient, {ref['samples']:,} samples ({chunks})",
            g and g["median_seconds"],
            t and t["median_seconds"],
            ref["flops"],
            lca_c2,
            tor_c2,
            g and g.get("seconds"),
            t and t.get("seconds"),
        )
    fc = load(d, "grad_mnist_fc.json") or load(d, "torch_grad_mnist_fc.json")
    a50, tl = time_v_reps(d, "analyze_50"), load_reps(d, "torch_lca_50")
    un = time_v_reps(d, "analyze_50_unshared")
    tl_all = tl and tl["all_seconds_per_step"]
    if un:
        row(
            "MNIST-FC LCA per step, every point in full "
            f"(--no-share-first-layer, {un['steps']} steps)",
            un["seconds"] / un["steps"],
            tl and tl["seconds_per_step"],
            fc and fc["flops"] * un["evaluations"] / un["steps"],
            lca_c2,
            tor_c2,
            [x / un["steps"] for x in un["all_seconds"]],
            tl_all,
        )
    if a50 or tl:
        steps = (a50 or tl)["steps"]
        evals = (a50 or tl)["evaluations"]
        row(
            f"MNIST-FC LCA per step (Simpson, {steps} steps, {evals} evaluations, "
            "whole run / steps)",
            a50 and a50["seconds"] / steps,
            tl and tl["seconds_per_step"],
            fc and fc["flops"] * evals / steps,
            lca_c2,
            tor_c2,
            a50 and [x / steps for x in a50["all_seconds"]],
            tl_all,
        )

    print(
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores; "
        f"{machine.get('date', '?')}; {threads} threads; "
        f"load average {machine.get('load_before', '?')} before, "
        f"{machine.get('load_after', '?')} after; "
        f"torch {torch_version(d, tgemm)}."
    )
    print()
    head = [
        "measurement",
        "lca s",
        "lca GFLOP/s",
        "lca % of GEMM ceiling",
        "PyTorch s",
        "PyTorch GFLOP/s",
        "PyTorch % of GEMM ceiling",
        "speed-up (PyTorch s / lca s)",
        "speed-up spread",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")
    for s in skipped:
        print(f"\n{s}")
    for key, text in torch_chunks.items():
        print(f"\nPyTorch {key} gradient by chunk size (median): {text}.")
    print(
        f"\nGEMM ceiling = the {threads}-thread row of each library; lca's GEMM is "
        f"{(gemm or {}).get('backend', '?')}. GFLOP/s of the gradient rows count forward + "
        "backward without the first layer's input gradient."
    )

    # nanoGPT-style models (bench/gpt_compare.py): medians of the full-set loss+gradient.
    gpt = load(d, "gpt.json")
    if gpt:
        print(
            "\nnanoGPT-style models (bench/gpt_compare.py), full-set loss+gradient, median ms "
            "(PyTorch with the explicit masked softmax and with SDPA; "
            "speed-up = faster PyTorch / lca):\n"
        )
        print(
            "| model | params | tokens | threads | PyTorch ms | PyTorch SDPA ms | lca ms | "
            "speed-up | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for g in gpt:
            print(
                f"| {g['model']} | {g['params']:,} | {g['tokens']:,} | {g['threads']} | "
                f"{1e3 * g['torch_median_s']:.1f} | {1e3 * g['torch_sdpa_median_s']:.1f} | "
                f"{1e3 * g['lca_median_s']:.1f} | {g['speedup']:.2f} | "
                f"{g['load_before']:.2f}→{g['load_after']:.2f} |"
            )

    # bench/step_compare.py: per analysed step and the ResNet gradients.
    steps = load(d, "steps.json")
    if steps:
        print(
            "\nPer analysed step (`lca analyze --no-adaptive`, the process end to end, against "
            "PyTorch Simpson with the end gradient reused) and full-set loss+gradient "
            "(bench/step_compare.py); medians of the repetitions, PyTorch at its faster chunk; "
            "spread = slowest PyTorch / fastest lca … fastest PyTorch / slowest lca:\n"
        )
        print(
            "| row | model | samples | steps | lca chunk | lca s (min–max) | PyTorch chunk | "
            "PyTorch s (min–max) | speed-up | speed-up spread | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in steps:
            what = "per step" if r["kind"] == "step" else "loss+gradient"
            lo, hi = r["speedup_spread"]
            la, tb = r["lca"], r["torch_best"]
            print(
                f"| {what} | {r['model']} | {r['samples']:,} | {r.get('steps', '–')} | "
                f"{r['lca_chunk']} | "
                f"{la['median_s']:.4f} ({la['min_s']:.4f}–{la['max_s']:.4f}) | "
                f"{r['torch_chunk']} | "
                f"{tb['median_s']:.4f} ({tb['min_s']:.4f}–{tb['max_s']:.4f}) | "
                f"{r['speedup']:.2f} | {lo:.2f}–{hi:.2f} | "
                f"{r['load_before']:.2f}→{r['load_after']:.2f} |"
            )

    # Peak memory of `lca analyze`.
    mem = []
    for name in ("analyze_50", "analyze_200"):
        a = time_v_reps(d, name)
        if a:
            # Without the gradient rows (ROWS subset): the samples from lca's own report and
            # MNIST-FC's 84,060 parameters (bench/mnist_fc.toml).
            samples = fc["samples"] if fc else a["samples"]
            train = samples * 784 * 4 + samples * 4
            ckpt = (fc["params"] if fc else 84060) * 4
            bound = train + 4 * ckpt + 64 * MIB
            mem.append(
                f"| {a['steps']} | {a['evaluations']} | {a['seconds']:.1f} | "
                f"{a['rss'] / MIB:.1f} | "
                f"{bound / MIB:.1f} | {'yes' if a['rss'] <= bound else 'NO'} |"
            )
    if mem:
        print(
            "\nPeak RSS of `lca analyze` (MNIST-FC, /usr/bin/time -v). Bound = training set as f32 "
            f"inputs + u32 labels ({train / MIB:.1f} MiB) + "
            f"4 checkpoints ({4 * ckpt / MIB:.2f} MiB) + 64 MiB.\n"
        )
        print("| steps | evaluations | wall s | peak RSS MiB | bound MiB | within bound |")
        print("|---|---|---|---|---|---|")
        for m in mem:
            print(m)


if __name__ == "__main__":
    main()
