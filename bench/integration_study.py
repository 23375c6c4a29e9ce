#!/usr/bin/env python3
"""Integration-policy study for issue 20, on the fixtures' converged float64 references.

    /work/venv/bin/python bench/integration_study.py            # tables on stdout (markdown)
    /work/venv/bin/python bench/integration_study.py --json out.json

Input: the converged.safetensors files written by fixtures/make_converged.py: per step t the
float64 loss L and, per tensor k, f_k(s) = dtheta_t,k . grad_k L(theta_t + s dtheta_t) at the
33 points s = j/32. Every rule on that grid is a weight vector w (33 entries), and its LCA of
tensor k at step t is sum_j w_j f_k(j/32). The residual of step t is
r_t = L(1) - L(0) - sum_k LCA_k. The reference is composite Simpson on 32 sub-intervals.

A policy decides, per step, which grid points are evaluated and which weights apply. It is
charged one gradient evaluation per distinct point (the start point of step t is the end point
of step t-1, so a run of S steps costs 1 + sum_t (points_t - 1); plain Simpson: 1 + 2S).

Policies (see docs/integration-study.md):
  plain       Simpson, n = 2 everywhere
  abs1e-3     today's default: per step double n (2, 4, ..., 32) while |r_t| > 1e-3
  budget-uni  pass 1 plain Simpson; then, while sum_t |r_t| > eps * D: double n of the step
              with the largest |r_t| (not yet at 32)
  budget-pan  pass 1 plain Simpson; then, while sum_t |r_t| > eps * D: split the panel with
              the largest |e_p| over the whole run (a Simpson panel [a, b] with midpoint m;
              e_p = L(b) - L(a) - (b - a)/6 (F(a) + 4 F(m) + F(b)) is the panel's exact
              residual; splitting costs its 2 quarter points; panels no narrower than 1/16)
  budget-pan-step  the same, but first the step with the largest |r_t|, then its largest panel
D = |L_T - L_0| (run) or sum_t |L_{t+1} - L_t| ("var" suffix); eps = 1e-4 (0.01 %) times a
safety factor 0.5.

Error estimates (per tensor and step) validated against the reference (section 2 of the
output): see ESTIMATORS below. Section 3: estimator variants against issue 20's criterion
(bounded and within 10x for >= 95 % of entries) and the oracle ceiling (section3()).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
G = 32  # grid sub-intervals
FIXTURES = [
    ("mlp", FIX / "mlp/golden/converged"),
    ("mlp_heldout", FIX / "mlp_heldout/golden/converged"),
    ("mlp_tanh_adam", FIX / "mlp_tanh_adam/golden/converged"),
    ("cnn", FIX / "cnn/golden/converged"),
    ("cnn_strided", FIX / "cnn_strided/golden/converged"),
    ("deep40", FIX / "deep40/golden/converged"),
    ("gpt", FIX / "gpt/golden/converged"),
    ("resnet20/batch_stats", FIX / "resnet20/converged_batch_stats"),
    ("resnet20/running_stats", FIX / "resnet20/converged_running_stats"),
    ("resnet/batch_stats", FIX / "resnet/golden/batch_stats/converged"),
    ("resnet/running_stats", FIX / "resnet/golden/running_stats/converged"),
]
EPS = 1e-4
SAFETY = 0.5
SMALL = 1e-5  # an error bar below SMALL * |dL_run| counts as sharp (10 % of the run budget)


class Run:
    def __init__(self, name: str, base: Path) -> None:
        meta = json.loads(base.with_suffix(".json").read_text())
        st = load_file(str(base.with_suffix(".safetensors")))
        self.name = name
        self.names: list[str] = meta["names"]
        pb = set(meta["path_buffers"])
        self.layers = ["buffers" if k in pb else k.rsplit(".", 1)[0] for k in self.names]
        self.layer_names = list(dict.fromkeys(self.layers))
        self.L = st["loss"]  # [S, 33]
        self.f = np.stack([st[f"proj/{k}"] for k in self.names], axis=2)  # [S, 33, K]
        self.F = self.f.sum(axis=2)  # [S, 33]
        self.S = self.L.shape[0]
        self.dl = self.L[:, -1] - self.L[:, 0]
        self.dl_run = float(self.L[-1, -1] - self.L[0, 0])
        self.var = float(np.abs(self.dl).sum())
        self.ref32 = np.einsum("sjk,j->sk", self.f, uniform_w(32))
        self.ref16 = np.einsum("sjk,j->sk", self.f, uniform_w(16))
        # A finer reference (composite Simpson, 128 sub-intervals) where it was computed
        # (make_converged.py --fine 128): then errors are measured against it.
        fine = base.parent / (base.name + "128.safetensors")
        self.fine = fine.exists()
        self.ref, self.ref_unc = self.ref32, np.abs(self.ref32 - self.ref16)
        if self.fine:
            st2 = load_file(str(fine))
            assert np.array_equal(st2["loss"][:, ::4], self.L), name
            assert np.allclose(
                st2["lca2/" + self.names[0]], self.f[:, ::16, 0] @ [1 / 6, 4 / 6, 1 / 6]
            )
            self.ref = np.stack([st2[f"lca128/{k}"] for k in self.names], axis=1)
            meta2 = json.loads((base.parent / (base.name + "128.json")).read_text())
            self.sum_r128 = meta2["sum_abs_r_over_abs_dL"]["128"]
            self.ref_unc = np.abs(
                self.ref - np.stack([st2[f"lca64/{k}"] for k in self.names], axis=1)
            )
        self.steps_note = meta.get("steps_note", "all steps")
        self.layer_index = np.array([self.layer_names.index(x) for x in self.layers])

    def by_layer(self, a: np.ndarray) -> np.ndarray:
        """[..., K] -> [..., n_layers]"""
        out = np.zeros(a.shape[:-1] + (len(self.layer_names),))
        for k, li in enumerate(self.layer_index):
            out[..., li] += a[..., k]
        return out


def uniform_w(n: int) -> np.ndarray:
    w = np.zeros(G + 1)
    if n == 1:
        w[0] = w[G] = 0.5
        return w
    stride = G // n
    for i in range(n + 1):
        c = 1.0 if i in (0, n) else (4.0 if i % 2 else 2.0)
        w[i * stride] += c / (3.0 * n)
    return w


def trap_w(n: int) -> np.ndarray:
    """Composite trapezoid with n sub-intervals on the grid."""
    w = np.zeros(G + 1)
    stride = G // n
    for i in range(n + 1):
        w[i * stride] += (0.5 if i in (0, n) else 1.0) / n
    return w


def panel_w(panels: list[tuple[int, int]]) -> np.ndarray:
    w = np.zeros(G + 1)
    for a, b in panels:
        h = (b - a) / G
        w[a] += h / 6
        w[(a + b) // 2] += 4 * h / 6
        w[b] += h / 6
    return w


def panel_points(panels: list[tuple[int, int]]) -> set[int]:
    pts = set()
    for a, b in panels:
        pts |= {a, (a + b) // 2, b}
    return pts


def panel_err(run: Run, t: int, a: int, b: int) -> float:
    h = (b - a) / G
    m = (a + b) // 2
    return float(run.L[t, b] - run.L[t, a] - h / 6 * (run.F[t, a] + 4 * run.F[t, m] + run.F[t, b]))


# ------------------------------------------------------------------------------------------
# Policies: each returns (weights [S, 33], evaluations, per-step description)
# ------------------------------------------------------------------------------------------


def evals_of(points: list[set[int]]) -> int:
    return 1 + sum(len(p) - 1 for p in points)


def pol_uniform(run: Run, ns: list[int]) -> tuple[np.ndarray, int, Any]:
    w = np.stack([uniform_w(n) for n in ns])
    pts = [set(range(0, G + 1, G // n)) for n in ns]
    return w, evals_of(pts), ns


def residual(run: Run, w: np.ndarray) -> np.ndarray:
    return run.dl - np.einsum("sj,sj->s", w, run.F)


def pol_abs(run: Run, tol: float = 1e-3) -> tuple[np.ndarray, int, Any]:
    ns = []
    for t in range(run.S):
        n = 2
        while n < G:
            r = run.dl[t] - uniform_w(n) @ run.F[t]
            if abs(r) <= tol:
                break
            n *= 2
        ns.append(n)
    return pol_uniform(run, ns)


def budget(run: Run, denom: str, safety: float = SAFETY) -> float:
    d = abs(run.dl_run) if denom == "run" else run.var
    return EPS * safety * d


def pol_budget_uniform(
    run: Run, denom: str = "run", safety: float = SAFETY
) -> tuple[np.ndarray, int, Any]:
    B = budget(run, denom, safety)
    ns = [2] * run.S
    r = np.array([run.dl[t] - uniform_w(2) @ run.F[t] for t in range(run.S)])
    while np.abs(r).sum() > B:
        cand = [t for t in range(run.S) if ns[t] < G]
        if not cand:
            break
        t = max(cand, key=lambda i: abs(r[i]))
        ns[t] *= 2
        r[t] = run.dl[t] - uniform_w(ns[t]) @ run.F[t]
    return pol_uniform(run, ns)


def pol_budget_panels(
    run: Run,
    denom: str = "run",
    by_step: bool = False,
    max_factor: float | None = None,
    safety: float = SAFETY,
) -> tuple[np.ndarray, int, Any]:
    B = budget(run, denom, safety)
    panels = [[(0, G)] for _ in range(run.S)]
    errs = [[panel_err(run, t, 0, G)] for t in range(run.S)]
    r = np.array([sum(e) for e in errs])
    evals = 1 + 2 * run.S
    cap = None if max_factor is None else max_factor * (1 + 2 * run.S)
    while np.abs(r).sum() > B:
        best = None
        if by_step:
            order = sorted(range(run.S), key=lambda i: -abs(r[i]))
            for t in order:
                c = [
                    (abs(e), t, i)
                    for i, (e, p) in enumerate(zip(errs[t], panels[t]))
                    if p[1] - p[0] >= 4
                ]
                if c:
                    best = max(c)
                    break
        else:
            c = [
                (abs(e), t, i)
                for t in range(run.S)
                for i, (e, p) in enumerate(zip(errs[t], panels[t]))
                if p[1] - p[0] >= 4
            ]
            best = max(c) if c else None
        if best is None or (cap is not None and evals + 2 > cap):
            break
        _, t, i = best
        a, b = panels[t][i]
        m = (a + b) // 2
        panels[t][i : i + 1] = [(a, m), (m, b)]
        errs[t][i : i + 1] = [panel_err(run, t, a, m), panel_err(run, t, m, b)]
        r[t] = sum(errs[t])
        evals += 2
    w = np.stack([panel_w(p) for p in panels])
    assert evals == evals_of([panel_points(p) for p in panels])
    return w, evals, panels


def water_level(res: np.ndarray, B: float) -> float:
    """Largest tau with sum_t min(|r_t|, tau) <= B."""
    a = np.sort(np.abs(res))[::-1]
    if a.sum() <= B:
        return float(a[0]) if len(a) else 0.0
    # With the k largest capped at tau: k * tau + sum(a[k:]) = B, tau in [a[k], a[k-1]].
    for k in range(1, len(a) + 1):
        rest = a[k:].sum()
        tau = (B - rest) / k
        if tau >= (a[k] if k < len(a) else 0.0):
            return max(tau, 0.0)
    return 0.0


def pol_water(
    run: Run, safety: float = 1.0, max_factor: float | None = None
) -> tuple[np.ndarray, int, Any]:
    """(d) Water level: tau = the largest level with sum_t min(|r_t|, tau) <= B; every step
    with |r_t| > tau is refined on its own (largest |e_p| panel first) until |r_t| <= tau;
    repeat with the new residuals until sum_t |r_t| <= B (or nothing can be split)."""
    B = budget(run, "run", safety)
    panels = [[(0, G)] for _ in range(run.S)]
    errs = [[panel_err(run, t, 0, G)] for t in range(run.S)]
    r = np.array([sum(e) for e in errs])
    evals = 1 + 2 * run.S
    cap = None if max_factor is None else max_factor * (1 + 2 * run.S)
    rounds = 0
    while np.abs(r).sum() > B and rounds < 20:
        rounds += 1
        tau = water_level(r, B)
        progress = False
        for t in np.argsort(-np.abs(r)):
            while abs(r[t]) > tau:
                c = [
                    (abs(e), i)
                    for i, (e, p) in enumerate(zip(errs[t], panels[t]))
                    if p[1] - p[0] >= 4
                ]
                if not c or (cap is not None and evals + 2 > cap):
                    break
                _, i = max(c)
                a, b = panels[t][i]
                m = (a + b) // 2
                panels[t][i : i + 1] = [(a, m), (m, b)]
                errs[t][i : i + 1] = [panel_err(run, t, a, m), panel_err(run, t, m, b)]
                r[t] = sum(errs[t])
                evals += 2
                progress = True
        if not progress:
            break
    w = np.stack([panel_w(p) for p in panels])
    return w, evals, panels


def pol_halving(
    run: Run, safety: float = 1.0, max_factor: float | None = None, order: str = "desc"
) -> tuple[np.ndarray, int, Any, int]:
    """(d') Halving level, one visit per step and round: lam = max_t |r_t|; repeat: lam /= 2;
    visit the steps with |r_t| > lam in order of decreasing |r_t| and refine each (largest
    |e_p| panel first) until |r_t| <= lam; stop as soon as sum_t |r_t| <= B. Returns also the
    cost when a step visited in an earlier round is re-integrated from scratch (all of its
    points evaluated again) instead of keeping its points' gradients."""
    B = budget(run, "run", safety)
    panels = [[(0, G)] for _ in range(run.S)]
    errs = [[panel_err(run, t, 0, G)] for t in range(run.S)]
    r = np.array([sum(e) for e in errs])
    evals = 1 + 2 * run.S
    rescratch = 0
    visited = [False] * run.S
    cap = None if max_factor is None else max_factor * (1 + 2 * run.S)
    lam = float(np.abs(r).max()) if run.S else 0.0
    capped = False
    while np.abs(r).sum() > B and not capped and lam > 0:
        lam /= 2
        todo = [t for t in np.argsort(-np.abs(r)) if abs(r[t]) > lam]
        moved = False
        for t in todo:
            if np.abs(r).sum() <= B:
                break
            before = len(panel_points(panels[t]))
            split_here = False
            while abs(r[t]) > lam:
                c = [
                    (abs(e), i)
                    for i, (e, p) in enumerate(zip(errs[t], panels[t]))
                    if p[1] - p[0] >= 4
                ]
                if not c:
                    break
                if cap is not None and evals + 2 > cap:
                    capped = True
                    break
                _, i = max(c)
                a, b = panels[t][i]
                m = (a + b) // 2
                panels[t][i : i + 1] = [(a, m), (m, b)]
                errs[t][i : i + 1] = [panel_err(run, t, a, m), panel_err(run, t, m, b)]
                r[t] = sum(errs[t])
                evals += 2
                split_here = moved = True
            if split_here:
                if visited[t]:
                    rescratch += before
                visited[t] = True
            if capped:
                break
        if not moved and lam < 1e-300:
            break
    w = np.stack([panel_w(p) for p in panels])
    return w, evals, panels, rescratch


# ------------------------------------------------------------------------------------------
# Error estimates
# ------------------------------------------------------------------------------------------


def est_uniform(run: Run, ns: list[int], c: float) -> np.ndarray:
    """|R_n - R_{n/2}| * c per tensor and step (R_1 = trapezoid on the end points)."""
    out = np.zeros((run.S, len(run.names)))
    for t, n in enumerate(ns):
        d = (uniform_w(n) - uniform_w(n // 2)) @ run.f[t]
        out[t] = c * np.abs(d)
    return out


def est_panels(run: Run, panels: list[list[tuple[int, int]]], c: float) -> np.ndarray:
    """c * sum over leaf panels of |Simpson_p - Trapezoid_p| per tensor (trapezoid on the
    panel's end points), i.e. c * sum_p |(b - a)/3 * (f(m) - (f(a) + f(b))/2)|."""
    out = np.zeros((run.S, len(run.names)))
    for t, ps in enumerate(panels):
        for a, b in ps:
            h = (b - a) / G
            m = (a + b) // 2
            d = (2 * h / 3) * (run.f[t, m] - 0.5 * (run.f[t, a] + run.f[t, b]))
            out[t] += c * np.abs(d)
    return out


def ratio_stats(est: np.ndarray, act: np.ndarray, floor: float, small: float = 0.0) -> dict:
    """est/actual over the entries with actual > floor (entries at or below the floor of the
    reference's own accuracy are left out). 'sharp': est <= 10 actual, or est <= small (an
    error bar below `small` is harmless however loose)."""
    m = act > floor
    if not m.any():
        return {"n": 0}
    q = est[m] / act[m]
    return {
        "n": int(m.sum()),
        "covered": float((q >= 1).mean()),
        "within10": float(((q >= 1) & (q <= 10)).mean()),
        "sharp": float(((q <= 10) | (est[m] <= small)).mean()),
        "covered_and_sharp": float(((q >= 1) & ((q <= 10) | (est[m] <= small))).mean()),
        "p05": float(np.quantile(q, 0.05)),
        "median": float(np.median(q)),
        "p95": float(np.quantile(q, 0.95)),
    }


def evaluate(run: Run, w: np.ndarray) -> dict:
    lca = np.einsum("sj,sjk->sk", w, run.f)
    err = lca - run.ref
    r = residual(run, w)
    tot_err = err.sum(axis=0)
    tot_ref = run.ref.sum(axis=0)
    lerr = run.by_layer(err)
    ltot_err = lerr.sum(axis=0)
    return {
        "sum_abs_r": float(np.abs(r).sum() / abs(run.dl_run)),
        "tensor_step_max": float(np.abs(err).max()),
        "tensor_run_max": float(np.abs(tot_err).max()),
        "tensor_run_rel_own": float(np.max(np.abs(tot_err) / np.maximum(np.abs(tot_ref), 1e-300))),
        "layer_step_max": float(np.abs(lerr).max()),
        "layer_run_max": float(np.abs(ltot_err).max()),
        "lca": lca,
        "err": err,
    }


def parent_of(a: int, b: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(parent panel, sibling panel) of the dyadic panel [a, b], or None for the root."""
    w = b - a
    if w == G:
        return None
    if a % (2 * w) == 0:
        return (a, a + 2 * w), (b, b + w)
    return (a - w, b), (a - w, a)


def simpson_panel(run: Run, t: int, a: int, b: int) -> np.ndarray:
    h = (b - a) / G
    m = (a + b) // 2
    return h / 6 * (run.f[t, a] + 4 * run.f[t, m] + run.f[t, b])


def est_two_level(run: Run, panels: list[list[tuple[int, int]]]) -> np.ndarray:
    """Per step and tensor: sum over leaf panels p of d_p, where d_p = |S_p + S_sib - S_parent|
    / 2 for a panel with a parent (S = Simpson on a panel, sib = p's sibling at p's level,
    whether or not it was split further) and d_root = |S - T| = |(1/3)(2 f(1/2) - f(0) -
    f(1))| for an unsplit step (Simpson minus trapezoid on the same three points)."""
    out = np.zeros((run.S, len(run.names)))
    for t, ps in enumerate(panels):
        for a, b in ps:
            par = parent_of(a, b)
            if par is None:
                m = (a + b) // 2
                out[t] += np.abs((2 * run.f[t, m] - run.f[t, a] - run.f[t, b]) / 3)
            else:
                (pa, pb), (sa, sb) = par
                d = (
                    simpson_panel(run, t, a, b)
                    + simpson_panel(run, t, sa, sb)
                    - simpson_panel(run, t, pa, pb)
                )
                out[t] += np.abs(d) / 2
    return out


def est_calibrated(
    run: Run, panels: list[list[tuple[int, int]]], c: float = 1.0, lo: float = 0.0, hi: float = 1.0
) -> np.ndarray:
    """Two-level differences scaled by how well the same rule did on the total, which is
    known exactly from the losses: per leaf panel p, rho_p = |r_p| / |D_p| clamped to
    [lo, hi], where r_p = L(b) - L(a) - Simpson_p(F) is the panel's exact residual and D_p =
    sum_k d_pk its two-level difference of the total F (the same expressions as
    est_two_level, signed, summed over tensors); est_k += c * rho_p * |d_pk|."""
    out = np.zeros((run.S, len(run.names)))
    for t, ps in enumerate(panels):
        for a, b in ps:
            par = parent_of(a, b)
            if par is None:
                m = (a + b) // 2
                d = (2 * run.f[t, m] - run.f[t, a] - run.f[t, b]) / 3
            else:
                (pa, pb), (sa, sb) = par
                d = (
                    simpson_panel(run, t, a, b)
                    + simpson_panel(run, t, sa, sb)
                    - simpson_panel(run, t, pa, pb)
                ) / 2
            D = float(d.sum())
            r = panel_err(run, t, a, b)
            rho = hi if D == 0 else min(max(abs(r) / abs(D), lo), hi)
            out[t] += c * rho * np.abs(d)
    return out


def est_hybrid(
    run: Run,
    panels: list[list[tuple[int, int]]],
    c_split: float = 1.5,
    c_root: float = 3.0,
    lo: float = 0.1,
) -> np.ndarray:
    """c_split * est_two_level on split panels; on an unsplit step (one panel, three points)
    est_calibrated's form c_root * clamp(|r| / |D|, lo, 1) * |d_k|, where d_k = (2 f_k(1/2)
    - f_k(0) - f_k(1)) / 3 (Simpson minus trapezoid), D = sum_k d_k and r the step's
    residual."""
    out = np.zeros((run.S, len(run.names)))
    split = [t for t in range(run.S) if len(panels[t]) > 1]
    whole = [t for t in range(run.S) if len(panels[t]) == 1]
    if split:
        out[split] = c_split * est_two_level(run, panels)[split]
    if whole:
        out[whole] = est_calibrated(run, panels, c_root, lo)[whole]
    return out


def uniform_panels(n: int) -> list[tuple[int, int]]:
    w = 2 * G // n
    return [(a, a + w) for a in range(0, G, w)]


def validate(run: Run, panels: list[list[tuple[int, int]]], est: np.ndarray) -> dict:
    """est/actual at three levels. actual = |LCA - LCA_ref|; entries whose actual error is not
    above the reference's own two-level difference (|lca32 - lca16|, summed over steps for run
    totals) are left out, since the reference cannot resolve them."""
    w = np.stack([panel_w(p) for p in panels])
    err = np.einsum("sj,sjk->sk", w, run.f) - run.ref
    ref_unc = run.ref_unc
    out = {}
    sm = SMALL * abs(run.dl_run)
    out["step x tensor"] = ratio_stats(est, np.where(np.abs(err) > ref_unc, np.abs(err), 0), 0, sm)
    act_t = np.abs(err.sum(axis=0))
    unc_t = ref_unc.sum(axis=0)
    m = act_t > unc_t
    out["tensor run (sum)"] = ratio_stats(est.sum(axis=0), np.where(m, act_t, 0), 0, sm)
    out["tensor run (rss)"] = ratio_stats(
        np.sqrt((est**2).sum(axis=0)), np.where(m, act_t, 0), 0, sm
    )
    le, lest, lunc = run.by_layer(err), run.by_layer(est), run.by_layer(ref_unc)
    act_l = np.abs(le.sum(axis=0))
    ml = act_l > lunc.sum(axis=0)
    out["layer run (sum)"] = ratio_stats(lest.sum(axis=0), np.where(ml, act_l, 0), 0, sm)
    out["layer run (rss)"] = ratio_stats(
        np.sqrt((lest**2).sum(axis=0)), np.where(ml, act_l, 0), 0, sm
    )
    out["n tensors"] = len(run.names)
    out["n layers"] = len(run.layer_names)
    return out


C_SPLIT, C_ROOT, RHO_LO = 1.5, 5.0, 0.1  # the recommended estimate's parameters


def recommended_estimate(run: Run, panels: list[list[tuple[int, int]]]) -> np.ndarray:
    return est_hybrid(run, panels, C_SPLIT, C_ROOT, RHO_LO)


def recommended(run: Run) -> tuple[np.ndarray, int, Any]:
    """The recommended default: run-level budget, halving level (step first, largest panel
    first), safety 0.8, at most 4x plain Simpson's evaluations."""
    return pol_halving(run, 0.8, 4.0)[:3]


def summary(runs: list[Run]) -> None:
    print("## 0. Recommended policy and estimate, per run\n")
    print(
        f"Policy: halving, s = 0.8, cap 4×. Estimate: est_hybrid (c_split = "
        f"{C_SPLIT}, c_root = {C_ROOT}, lo = {RHO_LO}) per step and tensor; a layer's per "
        "step is the sum over its tensors; run totals are the "
        "root-sum-square over steps. Errors against the finest reference available (ref "
        "column); 'est ≥ actual' counts the entries whose actual error the reference "
        "resolves (of n).\n"
    )
    print(
        "| run | steps | ref | evals (plain) | × plain | Σ\\|r\\|/\\|ΔL\\| plain → policy | "
        "max layer err/run (÷\\|ΔL\\|) | max tensor err/step | tensor run totals: "
        "est ≥ actual / sharp, median est/actual | layer run totals: same | "
        "step×tensor: same | largest run-total error bar ÷ \\|ΔL\\|: tensor, layer |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        w0, ev0, _ = pol_uniform(run, [2] * run.S)
        w, ev, panels = recommended(run)
        e0, e = evaluate(run, w0), evaluate(run, w)
        est = recommended_estimate(run, panels)
        v = validate(run, panels, est)
        bar_t = np.sqrt((est**2).sum(axis=0)).max() / abs(run.dl_run)
        bar_l = np.sqrt((run.by_layer(est) ** 2).sum(axis=0)).max() / abs(run.dl_run)

        def cov(st: dict) -> str:
            return (
                "–"
                if not st["n"]
                else (
                    f"{100 * st['covered']:.0f} % / "
                    f"{100 * st['sharp']:.0f} % of {st['n']}, "
                    f"{st['median']:.1f}"
                )
            )

        print(
            f"| {run.name} | {run.S} | {128 if run.fine else 32} | {ev} ({ev0}) | "
            f"{ev / ev0:.2f} | {100 * e0['sum_abs_r']:.4f} % → {100 * e['sum_abs_r']:.4f} % "
            f"| {e['layer_run_max']:.1e} ({e['layer_run_max'] / abs(run.dl_run):.0e}) | "
            f"{e['tensor_step_max']:.1e} | {cov(v['tensor run (rss)'])} | "
            f"{cov(v['layer run (rss)'])} | {cov(v['step x tensor'])} | {bar_t:.0e}, "
            f"{bar_l:.0e} |"
        )
    print()


# ------------------------------------------------------------------------------------------
# Section 3: estimator variants against issue 20's criterion, and the oracle ceiling
# ------------------------------------------------------------------------------------------

# A fixture whose 32-interval reference is not converged (its Σ|r|/|ΔL| is 7x plain
# Simpson's): reported, never used to choose constants.
UNCONVERGED_REF = {"resnet20/batch_stats"}
LEVELS = ("step x tensor", "tensor run", "layer run")


def window_best(q: np.ndarray) -> tuple[float, float]:
    """Max over c of the fraction of the ratios q = actual / scale with c/10 <= q <= c, i.e.
    of the entries that an estimate c * scale bounds and stays within 10x of; and that c."""
    if not len(q):
        return float("nan"), float("nan")
    lq = np.sort(np.log10(q))
    j = np.searchsorted(lq, lq + 1.0, side="right")
    i = int(np.argmax(j - np.arange(len(lq))))
    return float((j[i] - i) / len(lq)), float(10.0 ** (lq[i] + 1.0))


class Parts:
    """What every variant is built from, for the recommended policy's panels of one run."""

    def __init__(self, run: Run) -> None:
        w, _, panels = recommended(run)
        self.run = run
        self.panels = panels
        self.err = np.einsum("sj,sjk->sk", w, run.f) - run.ref
        self.r = residual(run, w)
        self.split = np.array([len(p) > 1 for p in panels])
        K = len(run.names)
        # Unsplit steps: signed Simpson - trapezoid per tensor, and rho = |r| / |sum_k d_k|.
        self.d = np.zeros((run.S, K))
        self.rho = np.ones(run.S)
        # Split steps: signed and absolute sums of the leaf panels' two-level differences.
        self.tl = np.zeros((run.S, K))
        self.tl_signed = np.zeros((run.S, K))
        for t, ps in enumerate(panels):
            if len(ps) == 1:
                a, b = ps[0]
                m = (a + b) // 2
                self.d[t] = (2 * run.f[t, m] - run.f[t, a] - run.f[t, b]) / 3
                D = float(self.d[t].sum())
                self.rho[t] = 1.0 if D == 0 else abs(self.r[t]) / abs(D)
                continue
            for a, b in ps:
                (pa, pb), (sa, sb) = parent_of(a, b)  # type: ignore[misc]
                dp = (
                    simpson_panel(run, t, a, b)
                    + simpson_panel(run, t, sa, sb)
                    - simpson_panel(run, t, pa, pb)
                ) / 2
                self.tl[t] += np.abs(dp)
                self.tl_signed[t] += dp
        # Resolvable entries: the actual error exceeds the reference's own uncertainty.
        self.act_s = np.abs(self.err)
        self.ok_s = self.act_s > run.ref_unc
        self.act_t = np.abs(self.err.sum(axis=0))
        self.ok_t = self.act_t > run.ref_unc.sum(axis=0)
        self.act_l = np.abs(run.by_layer(self.err).sum(axis=0))
        self.ok_l = self.act_l > run.by_layer(run.ref_unc).sum(axis=0)

    def hybrid(
        self, c_root: float = C_ROOT, c_split: float = C_SPLIT, lo: float = RHO_LO
    ) -> np.ndarray:
        """est_hybrid from the parts (the same numbers as recommended_estimate)."""
        rho = np.clip(self.rho, lo, 1.0)[:, None]
        return np.where(self.split[:, None], c_split * self.tl, c_root * rho * np.abs(self.d))

    def signed(
        self, c_root: float = C_ROOT, c_split: float = C_SPLIT, lo: float = RHO_LO
    ) -> np.ndarray:
        rho = np.clip(self.rho, lo, 1.0)[:, None]
        return np.where(self.split[:, None], c_split * self.tl_signed, c_root * rho * self.d)

    def score(
        self,
        est: np.ndarray,
        run_t: np.ndarray | None = None,
        run_l: np.ndarray | None = None,
    ) -> dict:
        """Per level: n resolvable entries, fraction bounded (est >= actual), fraction within
        10x (actual <= est <= 10 actual). Run totals default to the root-sum-square."""
        run = self.run
        if run_t is None:
            run_t = np.sqrt((est**2).sum(axis=0))
        if run_l is None:
            run_l = np.sqrt((run.by_layer(est) ** 2).sum(axis=0))
        out = {}
        for level, e, a, ok in (
            ("step x tensor", est, self.act_s, self.ok_s),
            ("tensor run", run_t, self.act_t, self.ok_t),
            ("layer run", run_l, self.act_l, self.ok_l),
        ):
            q = e[ok] / a[ok]
            out[level] = {
                "n": int(ok.sum()),
                "bounded": float((q >= 1).mean()) if ok.any() else float("nan"),
                "within10": float(((q >= 1) & (q <= 10)).mean()) if ok.any() else float("nan"),
            }
        return out

    def oracle(self) -> dict:
        """The ceiling of an estimator that knows, per tensor, the true RMS of its per-step
        errors (sigma_k, over its resolvable steps) and uses the best single constant c for
        the fixture (est = c sigma_k); run totals: knows the true root-sum-square of the
        per-step errors of each tensor / layer (est = c RSS). Returns the best fraction both
        bounded and within 10x, per level, and the c."""
        run = self.run
        out = {}
        ok = self.ok_s
        if run.S > 1:
            n_k = np.maximum(ok.sum(axis=0), 1)
            sig = np.sqrt((np.where(ok, self.err, 0.0) ** 2).sum(axis=0) / n_k)
            q = (self.act_s / np.where(sig > 0, sig, np.inf))[ok]
            out["step x tensor"] = window_best(q)
        else:
            out["step x tensor"] = (float("nan"), float("nan"))  # one step: sigma_k = |err|
        rss_t = np.sqrt((self.err**2).sum(axis=0))
        rss_l = np.sqrt((run.by_layer(self.err) ** 2).sum(axis=0))
        out["tensor run"] = window_best(self.act_t[self.ok_t] / rss_t[self.ok_t])
        out["layer run"] = window_best(self.act_l[self.ok_l] / rss_l[self.ok_l])
        return out


def variants(
    p: Parts, cv: tuple[float, float, float], cvt: tuple[float, float], cve: tuple[float]
) -> dict:
    """The estimator variants of section 3, each (per-step estimate, tensor run totals or None,
    layer run totals or None; None = root-sum-square of the per-step estimates)."""
    run = p.run
    hyb = p.hybrid()
    sg = p.signed()
    rss_t = np.sqrt((hyb**2).sum(axis=0))
    rss_l = np.sqrt((run.by_layer(hyb) ** 2).sum(axis=0))
    # (b) the step's exact residual shared over its tensors in proportion to their estimates
    share = np.abs(p.r)[:, None] * hyb / np.maximum(hyb.sum(axis=1, keepdims=True), 1e-300)
    return {
        "recommended (rss)": (hyb, None, None),
        "recommended, run = Σ_t": (hyb, hyb.sum(axis=0), run.by_layer(hyb).sum(axis=0)),
        "(a) run = 1.5·|Σ_t signed| + 0.1·rss": (
            hyb,
            1.5 * np.abs(sg.sum(axis=0)) + 0.1 * rss_t,
            1.5 * np.abs(run.by_layer(sg).sum(axis=0)) + 0.1 * rss_l,
        ),
        "(b) max(recommended, 3·residual share)": (np.maximum(hyb, 3 * share), None, None),
        "(b') 3·residual share only": (3 * share, None, None),
        "(c) constants cross-validated": (p.hybrid(*cv), None, None),
        "(d) lo = 0.01": (p.hybrid(lo=0.01), None, None),
        "(d') per-tensor calibrated, cross-validated": (
            per_tensor_calibrated(p, *cvt),
            None,
            None,
        ),
        "(e) residual-scaled shares, cross-validated": (residual_scaled(p, *cve), None, None),
    }


GRID_HYBRID = [
    (cr, cs, lo)
    for cr in (1.0, 2.0, 3.0, 5.0, 8.0, 12.0)
    for cs in (0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
    for lo in (0.01, 0.03, 0.1, 0.3)
]
GRID_TENSOR = [(cu, cs) for cu in (1.0, 2.0, 3.0, 5.0, 8.0) for cs in (1.0, 2.0, 3.0, 5.0, 8.0)]


def per_tensor_calibrated(p: Parts, c_unsplit: float, c_split: float) -> np.ndarray:
    """(d') Each tensor's own ratio of actual error to estimator, measured on the run's split
    steps and applied to the run's other steps. On a split step the unsplit rule's error is
    known well (S_root - S_final), so kappa_k = RMS over split steps of (S_root - S_final)_k
    / RMS of d_k (Simpson - trapezoid); on steps split at least twice the level-1 composite's
    error (S_1 - S_final) against its two-level difference (S_1 - S_root) gives gamma_k.
    Unsplit steps: c_unsplit * kappa_k * |d_k|; split steps: c_split * gamma_k * sum_P
    |d_Pk|. Without such steps the recommended form is kept. Smooth tensors (output layers)
    get small ratios, kinked ones large."""
    run = p.run
    w = np.stack([panel_w(ps) for ps in p.panels])
    final = np.einsum("sj,sjk->sk", w, run.f)
    root = np.einsum("j,sjk->sk", uniform_w(2), run.f)
    s1 = np.einsum("j,sjk->sk", uniform_w(4), run.f)
    d0 = (2 * run.f[:, G // 2] - run.f[:, 0] - run.f[:, G]) / 3
    deep = np.array([len(ps) > 2 for ps in p.panels])

    def rms_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.sqrt((num**2).sum(axis=0) / np.maximum((den**2).sum(axis=0), 1e-300))

    est = p.hybrid().copy()
    sp = p.split
    if sp.any():
        kappa = rms_ratio((root - final)[sp], d0[sp])
        est[~sp] = c_unsplit * kappa[None, :] * np.abs(p.d[~sp])
    if deep.any():
        gamma = rms_ratio((s1 - final)[deep], (s1 - root)[deep])
        est[sp] = c_split * gamma[None, :] * p.tl[sp]
    return est


def residual_scaled(p: Parts, c: float) -> np.ndarray:
    """(e) Each tensor's share of the step's exact residual, learned on the run's split steps:
    alpha_k = RMS over split steps of (S_root - S_final)_k / RMS of the root panel's exact
    residual e_[0,1]; unsplit steps: c * alpha_k * |r_t| (no Simpson - trapezoid, which
    measures a smooth tensor's curvature rather than its error). Split steps and runs without
    split steps keep the recommended form."""
    run = p.run
    sp = p.split
    est = p.hybrid().copy()
    if not sp.any():
        return est
    w = np.stack([panel_w(ps) for ps in p.panels])
    final = np.einsum("sj,sjk->sk", w, run.f)
    root = np.einsum("j,sjk->sk", uniform_w(2), run.f)
    e_root = np.array([panel_err(run, t, 0, G) for t in range(run.S)])
    alpha = np.sqrt(((root - final)[sp] ** 2).sum(axis=0) / (e_root[sp] ** 2).sum())
    est[~sp] = c * alpha[None, :] * np.abs(p.r[~sp])[:, None]
    return est


def cv_constants(parts: list[Parts], family: Callable[..., np.ndarray], grid: list) -> dict:
    """Leave-one-fixture-out: for each fixture, the constants of `grid` that maximise, over
    the OTHER fixtures with a converged reference, the mean over fixtures and levels of the
    fraction both bounded and within 10x (family(p, *g) is the per-step estimate)."""
    table = {}
    for p in parts:
        rows = []
        for g in grid:
            s = p.score(family(p, *g))
            rows.append([s[lv]["within10"] if s[lv]["n"] else np.nan for lv in LEVELS])
        table[p.run.name] = np.array(rows)  # [grid, level]
    out = {}
    for p in parts:
        train = [
            table[q.run.name] for q in parts if q is not p and q.run.name not in UNCONVERGED_REF
        ]
        obj = np.nanmean(np.stack(train), axis=(0, 2))
        out[p.run.name] = grid[int(np.argmax(obj))]
    return out


def section3(runs: list[Run]) -> dict:
    parts = [Parts(run) for run in runs]
    cv = cv_constants(parts, lambda p, *g: p.hybrid(*g), GRID_HYBRID)
    cvt = cv_constants(parts, per_tensor_calibrated, GRID_TENSOR)
    cve = cv_constants(parts, residual_scaled, [(c,) for c in (0.5, 1.0, 2.0, 3.0, 5.0, 8.0)])
    print("\n## 3. Estimator variants against the 95 % / 10× criterion, and the oracle\n")
    print(
        "Recommended policy's panels. Per level: n = resolvable entries (actual error above "
        "the reference's own uncertainty), 'bnd' = est ≥ actual, 'in10' = actual ≤ est ≤ "
        "10·actual (no absolute floor). The criterion asks ≥ 95 % for both. (c): "
        "constants (c_root, c_split, lo) chosen leave-one-fixture-out on the other "
        "fixtures (never on resnet20/batch_stats, whose reference is unconverged). Oracle: "
        "est = c·σ_k with σ_k the true RMS of tensor k's per-step errors and the best c "
        "for the fixture (run totals: est = c·the true root-sum-square of the per-step "
        "errors); it is the ceiling of any estimator that gets each tensor's error size "
        "right but not the error of each entry. One-step runs: σ_k is the error itself "
        "(–).\n"
    )
    print(
        "| run | variant | step×tensor n: bnd / in10 | tensor run n: bnd / in10 | "
        "layer run n: bnd / in10 |"
    )
    print("|---|---|---|---|---|")
    res: dict = {}
    for p in parts:
        name = p.run.name + (" (ref. unconverged)" if p.run.name in UNCONVERGED_REF else "")
        for vname, (est, rt, rl) in variants(
            p, cv[p.run.name], cvt[p.run.name], cve[p.run.name]
        ).items():
            s = p.score(est, rt, rl)
            res.setdefault(p.run.name, {})[vname] = s
            cells = [
                "–"
                if not s[lv]["n"]
                else f"{s[lv]['n']}: {100 * s[lv]['bounded']:.0f} / {100 * s[lv]['within10']:.0f} %"
                for lv in LEVELS
            ]
            print(f"| {name} | {vname} | " + " | ".join(cells) + " |")
        # The best single rescaling of the recommended estimate, tuned on this fixture.
        hyb = p.hybrid()
        cells = []
        tune = {}
        for lv, e, a, ok in (
            ("step x tensor", hyb, p.act_s, p.ok_s),
            ("tensor run", np.sqrt((hyb**2).sum(axis=0)), p.act_t, p.ok_t),
            ("layer run", np.sqrt((p.run.by_layer(hyb) ** 2).sum(axis=0)), p.act_l, p.ok_l),
        ):
            frac, c = window_best(a[ok] / e[ok])
            tune[lv] = frac
            cells.append("–" if not ok.any() else f"{ok.sum()}: {100 * frac:.0f} % (×{c:.2g})")
        res[p.run.name]["best rescaling"] = tune
        print(f"| {name} | recommended × best c for this fixture | " + " | ".join(cells) + " |")
        o = p.oracle()
        res[p.run.name]["oracle"] = {lv: o[lv][0] for lv in LEVELS}
        cells = [
            "–" if np.isnan(o[lv][0]) else f"{100 * o[lv][0]:.0f} % (c = {o[lv][1]:.2g})"
            for lv in LEVELS
        ]
        print(f"| {name} | **oracle σ** | " + " | ".join(cells) + " |")
    # The oracle with ONE constant for all multi-step fixtures with a converged reference.
    pool: dict[str, list[np.ndarray]] = {lv: [] for lv in LEVELS}
    agree = []
    for p in parts:
        if p.run.S == 1 or p.run.name in UNCONVERGED_REF:
            continue
        ok = p.ok_s
        n_k = np.maximum(ok.sum(axis=0), 1)
        sig = np.sqrt((np.where(ok, p.err, 0.0) ** 2).sum(axis=0) / n_k)
        pool["step x tensor"].append((p.act_s / np.where(sig > 0, sig, np.inf))[ok])
        rss_t = np.sqrt((p.err**2).sum(axis=0))
        rss_l = np.sqrt((p.run.by_layer(p.err) ** 2).sum(axis=0))
        pool["tensor run"].append(p.act_t[p.ok_t] / rss_t[p.ok_t])
        pool["layer run"].append(p.act_l[p.ok_l] / rss_l[p.ok_l])
        sg = p.signed()
        agree.append(float((np.sign(sg[ok]) == np.sign(p.err[ok])).mean()))
    print(
        "\nOracle σ with one constant for all multi-step fixtures with a converged reference "
        "(pooled entries): "
        + "; ".join(
            f"{lv}: {100 * window_best(np.concatenate(pool[lv]))[0]:.0f} % of "
            f"{sum(map(len, pool[lv]))} (c = {window_best(np.concatenate(pool[lv]))[1]:.2g})"
            for lv in LEVELS
        )
        + ". A Gaussian error of exactly known σ is within [est/10, est] with probability "
        "at most 79.8 % (est = 4.6 σ). The sign of the signed per-step estimate (variant (a)) "
        f"agrees with the sign of the actual error on {100 * min(agree):.0f}–"
        f"{100 * max(agree):.0f} % of the resolvable (step, tensor) entries of these runs.\n"
    )
    print(
        "\nWhy the run-total bars are loose on the long runs: per resolvable tensor run "
        "total, the actual error |Σ_t e_t|, the root-sum-square of its true per-step errors "
        "√(Σ_t e_t²) and of the recommended per-step estimates √(Σ_t est_t²), and the share "
        "of the latter from unsplit steps. |Σ_t e_t| / √(Σ_t e_t²) is 0.2–2.4: the per-step "
        "errors add like random signs, as the root-sum-square assumes; the bars are loose "
        "because the per-step estimates of these tensors are 5–300× their errors.\n"
    )
    print(
        "| run | tensor | \\|Σ_t e_t\\| | √(Σ_t e_t²) | √(Σ_t est_t²) | est² from unsplit steps |"
    )
    print("|---|---|---|---|---|---|")
    for p in parts:
        if p.run.S < 40:
            continue
        hyb = p.hybrid()
        for k in np.where(p.ok_t)[0]:
            e2 = hyb[:, k] ** 2
            print(
                f"| {p.run.name} | {p.run.names[k]} | {p.act_t[k]:.1e} | "
                f"{np.sqrt((p.err[:, k] ** 2).sum()):.1e} | {np.sqrt(e2.sum()):.1e} | "
                f"{100 * e2[~p.split].sum() / e2.sum():.0f} % |"
            )
    print(
        "\nCross-validated constants per held-out fixture: (c) (c_root, c_split, lo); (d') "
        "(c_unsplit, c_split); (e) c:\n"
    )
    for name, g in cv.items():
        print(f"- {name}: {g}; {cvt[name]}; {cve[name][0]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    runs = []
    for name, base in FIXTURES:
        if base.with_suffix(".safetensors").exists():
            runs.append(Run(name, base))
    results: dict = {}
    summary(runs)
    print("## 1. Policies\n")
    print(
        "Budget policies: eps = 1e-4 times the safety factor s, D = |ΔL_run| (var: "
        "D = Σ_t|ΔL_t|); cap4: stop at 4× plain Simpson's evaluations. Errors against "
        "the finest reference (composite Simpson with 128 sub-intervals where computed, else "
        "32; the ref column of section 0); 'run' = summed over the steps; 'rel. own' "
        "= largest |run-total error| / |run-total LCA| of a tensor.\n"
    )
    print(
        "| run | steps | policy | evals | × plain | Σ\\|r\\|/\\|ΔL\\| | max tensor err/step "
        "| max tensor err/run | rel. own | max layer err/step | max layer err/run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    final_panels: dict = {}
    for run in runs:
        plain_ev = 1 + 2 * run.S
        pols = {
            "plain": pol_uniform(run, [2] * run.S),
            "abs 1e-3 (today)": pol_abs(run, 1e-3),
            "budget-uni s=1": pol_budget_uniform(run, "run", 1.0),
            "budget-pan s=1": pol_budget_panels(run, "run", False, None, 1.0),
            "budget-pan-step s=1": pol_budget_panels(run, "run", True, None, 1.0),
            "budget-pan-step s=0.5": pol_budget_panels(run, "run", True, None, 0.5),
            "budget-pan-step s=1 var": pol_budget_panels(run, "var", True, None, 1.0),
            "budget-pan-step s=0.8 cap4": pol_budget_panels(run, "run", True, 4.0, 0.8),
            "halving s=1": pol_halving(run, 1.0)[:3],
            "halving s=0.8 cap4": pol_halving(run, 0.8, 4.0)[:3],
            "water s=1": pol_water(run, 1.0),
            "water s=0.8 cap4": pol_water(run, 0.8, 4.0),
            "uniform 32 (ref)": pol_uniform(run, [32] * run.S),
        }
        final_panels[run.name] = pols["budget-pan-step s=0.8 cap4"][2]
        results[run.name] = {
            "S": run.S,
            "dl_run": run.dl_run,
            "var": run.var,
            "ref_selfcheck_max": float(np.abs(run.ref - run.ref16).max()),
            "policies": {},
        }
        for pname, (w, ev, _desc) in pols.items():
            e = evaluate(run, w)
            results[run.name]["policies"][pname] = {
                k: v for k, v in e.items() if k not in ("lca", "err")
            } | {"evals": ev}
            print(
                f"| {run.name} | {run.S} | {pname} | {ev} | {ev / plain_ev:.2f} | "
                f"{100 * e['sum_abs_r']:.4f} % | {e['tensor_step_max']:.1e} | "
                f"{e['tensor_run_max']:.1e} | {e['tensor_run_rel_own']:.1e} | "
                f"{e['layer_step_max']:.1e} | {e['layer_run_max']:.1e} |"
            )
    print()
    print(
        "| run | steps | ΔL_run | Σ\\|ΔL_t\\| | Σ\\|r\\|/\\|ΔL\\| n = 32 | n = 128 | "
        "max\\|lca32 − lca16\\| |"
    )
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        r128 = f"{100 * run.sum_r128:.5f} %" if run.fine else "–"
        print(
            f"| {run.name} | {run.S} ({run.steps_note}) | {run.dl_run:.4f} | {run.var:.4f} | "
            f"{100 * results[run.name]['policies']['uniform 32 (ref)']['sum_abs_r']:.4f} % | "
            f"{r128} | {results[run.name]['ref_selfcheck_max']:.1e} |"
        )
    print(
        "\nCost of pass 2 when a step visited again in a later round is re-integrated from "
        "scratch (all its points evaluated again) instead of keeping its points' gradients "
        "(halving policy):\n"
    )
    print("| run | s | cap | evals kept | × plain | evals from scratch | × plain |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        plain_ev = 1 + 2 * run.S
        for sf, cap in ((1.0, None), (0.8, 4.0)):
            _, ev, _, re = pol_halving(run, sf, cap)
            print(
                f"| {run.name} | {sf} | {cap or '–'} | {ev} | {ev / plain_ev:.2f} | {ev + re} | "
                f"{(ev + re) / plain_ev:.2f} |"
            )

    print("\n## 2. Error estimates: est/actual\n")
    print(
        "Estimate per step and tensor: est_two_level (sum over leaf panels of the two-level "
        "difference); a layer's is the sum over its tensors; run totals sum over steps "
        "(or root-sum-square, rss). Entries whose actual error the reference cannot resolve "
        "are left out (n = entries kept).\n"
    )
    print(
        "| run | rule | level | n | est ≥ actual | 1 ≤ est/actual ≤ 10 | sharp | p05 | median "
        "| p95 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    est_res: dict = {}
    for run in runs:
        rules = {
            "plain": [uniform_panels(2)] * run.S,
            "n=4": [uniform_panels(4)] * run.S,
            "n=8": [uniform_panels(8)] * run.S,
            "recommended": recommended(run)[2],
        }
        for rname, panels in rules.items():
            tl = est_two_level(run, panels)
            for ename, est in (
                ("two-level", tl),
                ("1.5 two-level", 1.5 * tl),
                ("calibrated c=5 lo=0.1", est_calibrated(run, panels, 5.0, 0.1)),
                ("hybrid (recommended)", recommended_estimate(run, panels)),
            ):
                v = validate(run, panels, est)
                est_res.setdefault(run.name, {})[f"{rname} {ename}"] = v
                for level, st in v.items():
                    if not isinstance(st, dict) or not st["n"]:
                        continue
                    print(
                        f"| {run.name} | {rname} {ename} | {level} | {st['n']} | "
                        f"{100 * st['covered']:.1f} % | {100 * st['within10']:.1f} % | "
                        f"{100 * st['sharp']:.1f} % | "
                        f"{st['p05']:.2f} | {st['median']:.2f} | {st['p95']:.1f} |"
                    )
    results["estimators"] = est_res
    results["variants"] = section3(runs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
