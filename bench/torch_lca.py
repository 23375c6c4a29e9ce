"""The PyTorch way to compute LCA, for the per-step comparison with `lca analyze`: Simpson's rule
(1/6, 4/6, 1/6) on each step with the end gradient reused as the next step's start, i.e.
2 full-training-set gradient evaluations per step plus 1 at the start.

Gradients are float32 (chunks of CHUNK samples, accumulated over chunks), the midpoint and the
LCA are computed in float64; each step's per-parameter LCA is written as float32 to
OUTDIR/step_<t>.safetensors (as `lca analyze` writes lca.safetensors). Prints one JSON object;
`seconds` runs from loading the data to the last step written (imports are not counted).

Usage: python torch_lca.py DATA.safetensors CKPT_DIR STEPS CHUNK THREADS OUTDIR
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

from common import MnistFC, full_grad, load_data


def main() -> None:
    data, ckpts, steps, chunk, threads, out = sys.argv[1:7]
    steps, chunk, threads = int(steps), int(chunk), int(threads)
    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    x, y = load_data(data)
    model = MnistFC()
    names = [n for n, _ in model.named_parameters()]

    def ckpt(t: int) -> dict[str, torch.Tensor]:
        sd = load_file(os.path.join(ckpts, f"ckpt_{t}.safetensors"))
        return {n: sd[n].double() for n in names}

    def grad_at(theta: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(theta[n])
        loss = full_grad(model, x, y, chunk)
        return loss, {n: p.grad.double() for n, p in model.named_parameters()}

    th0 = ckpt(0)
    l0, g0 = grad_at(th0)
    first, evals, lca_total, resid_abs = l0, 1, 0.0, 0.0
    for t in range(steps):
        th1 = ckpt(t + 1)
        l1, g1 = grad_at(th1)
        delta = {n: th1[n] - th0[n] for n in names}
        _, gm = grad_at({n: th0[n] + 0.5 * delta[n] for n in names})
        evals += 2
        lca = {n: delta[n] * (g0[n] + 4.0 * gm[n] + g1[n]) / 6.0 for n in names}
        s = sum(v.sum().item() for v in lca.values())
        lca_total += s
        resid_abs += abs(l1 - l0 - s)
        save_file(
            {n: v.float().contiguous() for n, v in lca.items()},
            os.path.join(out, f"step_{t}.safetensors"),
        )
        th0, l0, g0 = th1, l1, g1
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "kind": "torch_lca",
                "torch": torch.__version__,
                "steps": steps,
                "samples": x.shape[0],
                "chunk": chunk,
                "threads": threads,
                "evaluations": evals,
                "seconds": seconds,
                "seconds_per_step": seconds / steps,
                "loss_first": first,
                "loss_last": l0,
                "lca_sum": lca_total,
                "rel_abs_residual": resid_abs / abs(l0 - first),
            }
        )
    )


if __name__ == "__main__":
    main()
