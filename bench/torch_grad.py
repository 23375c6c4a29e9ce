"""PyTorch reference timings on the CPU, printed as one JSON object.

torch_grad.py gemm --threads T [--n 2048] [--reps 5]
    f32 n^3 matrix product with T intra-op threads (and with 1), GFLOP/s = 2 n^3 / s.
torch_grad.py grad --model mnist_fc|lenet --data D.safetensors --chunk C --threads T
                   [--reps 7] [--ckpt C.safetensors]
    full-training-set mean cross-entropy and its gradient, float32, chunks of C samples,
    gradient accumulated over chunks, no input gradient; median of --reps after a warm-up.
"""

from __future__ import annotations

import argparse
import json

import torch
from safetensors.torch import load_file

from common import MODELS, flops_per_sample, full_grad, load_data, timed


def gemm(args: argparse.Namespace) -> None:
    a = torch.rand(args.n, args.n, generator=torch.Generator().manual_seed(1)) * 2 - 1
    b = torch.rand(args.n, args.n, generator=torch.Generator().manual_seed(2)) * 2 - 1
    c = torch.empty(args.n, args.n)
    flop = 2.0 * args.n**3
    out = {"kind": "torch_gemm", "n": args.n, "torch": torch.__version__}
    for threads, key in ((1, "single"), (args.threads, "parallel")):
        torch.set_num_threads(threads)
        ts = sorted(timed(lambda: torch.mm(a, b, out=c), args.reps))
        out[f"{key}_seconds"] = ts[len(ts) // 2]
        out[f"{key}_gflops"] = flop / ts[len(ts) // 2] / 1e9
    out["threads"] = args.threads
    print(json.dumps(out))


def grad(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MODELS[args.model]()
    if args.ckpt:
        model.load_state_dict(load_file(args.ckpt))
    x, y = load_data(args.data)
    loss = full_grad(model, x, y, args.chunk)
    ts = timed(lambda: full_grad(model, x, y, args.chunk), args.reps)
    med = sorted(ts)[len(ts) // 2]
    fps = flops_per_sample(model, x.shape[1:])
    print(
        json.dumps(
            {
                "kind": "torch_grad",
                "model": args.model,
                "torch": torch.__version__,
                "samples": x.shape[0],
                "chunk": args.chunk,
                "threads": args.threads,
                "params": sum(p.numel() for p in model.parameters()),
                "loss": loss,
                "flops_per_sample": fps,
                "flops": fps * x.shape[0],
                "seconds": ts,
                "median_seconds": med,
                "min_seconds": min(ts),
                "gflops": fps * x.shape[0] / med / 1e9,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gemm")
    g.add_argument("--n", type=int, default=2048)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--reps", type=int, default=5)
    r = sub.add_parser("grad")
    r.add_argument("--model", choices=sorted(MODELS), required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--chunk", type=int, required=True)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--reps", type=int, default=7)
    r.add_argument("--ckpt")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    {"gemm": gemm, "grad": grad}[args.cmd](args)


if __name__ == "__main__":
    main()
