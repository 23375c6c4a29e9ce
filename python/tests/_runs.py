"""Helpers for the Recorder tests: train a few steps while recording, run `lca analyze`."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

import lca.recorder

# lca's step-0 loss and PyTorch's are both float32 forward passes with float64 sums over the
# terms, in different orders of operations (im2col/GEMM blocking vs PyTorch's kernels). Each
# term then differs by a few float32 rounding steps of the logits: relative 2^-24 ~ 6e-8 per
# operation, times depth. The tolerance, 2e-6 relative (about 30 ulps of the loss), allows that
# and is well below what a wrong spec changes (the n_head case: 2.3e-5 on 4.4, 5e-6).
REL_TOL = 2e-6


def close(a: float, b: float) -> bool:
    return abs(a - b) <= REL_TOL * max(1.0, abs(a), abs(b))


def train(
    model: nn.Module,
    run: Path,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    steps: int = 2,
    lr: float = 0.05,
    batch: int = 32,
    **kw: Any,
) -> lca.recorder.Recorder:
    """Record `steps` SGD-momentum steps of `model` on minibatches of (x, y)."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    lossfn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    if loss == "cross_entropy":

        def lossfn(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1))
    else:
        lossfn = F.mse_loss
    model.train()
    with lca.recorder.Recorder(model, run, data=(x, y), loss=loss, **kw) as rec:
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            opt.zero_grad()
            lossfn(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.step()
    return rec


def torch_loss_of(run: Path, step: int = 0) -> float:
    with safe_open(str(run / "checkpoints" / f"step_{step:06d}.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lca.torch_loss_dtype"] == "float32"
    return float(meta["lca.torch_loss"])


def analyze(
    lca_bin: Path, run: Path, out: Path, spec: Path | None = None, quick: bool = False
) -> dict[str, Any]:
    """Run `lca analyze` on the run; returns steps.csv rows and summary.json."""
    cmd = [
        str(lca_bin),
        "analyze",
        str(run / "checkpoints"),
        "--spec",
        str(spec or run / "model.toml"),
        "-o",
        str(out),
        "-q",
    ]
    if spec is not None:  # a deliberately edited spec: measure its loss, do not refuse it
        cmd += ["--no-verify-loss"]
    if quick:  # only the step-0 loss matters: one step, first order
        cmd += ["--last", "1", "--method", "first-order", "--no-lca-tensors"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"lca analyze failed ({r.returncode}):\n{r.stderr}"
    with open(out / "steps.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    return {"steps": rows, "summary": summary}


def lca_loss0(res: dict[str, Any]) -> float:
    return float(res["steps"][0]["loss_before"])


def edit_spec(run: Path, dest: Path, old: str, new: str, count: int = 1) -> Path:
    """A copy of the run's spec with `old` replaced by `new` (beside it, so [data] resolves)."""
    text = (run / "model.toml").read_text()
    assert text.count(old) >= count, f"{old!r} not in the spec"
    dest.write_text(text.replace(old, new, count))
    return dest
