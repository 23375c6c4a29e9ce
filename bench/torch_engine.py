"""Per-step cost of LCA with lca's PyTorch engine against a hand-written PyTorch script.

Both do Simpson with the end gradient reused (2 full-set gradients per step) along the same
synthetic path on the same device, precision and chunk size:

- `engine`: the worker (`python -m lca.engine.worker`) driven through its binary protocol by
  lca.engine.client, as the `lca` binary drives it (θ and gradients through pipes, f64
  accumulation), with the LCA sums in numpy as lca keeps them;
- `script`: what a PyTorch user writes by hand: functional_call per chunk, loss.backward(),
  gradients accumulated in .grad, LCA accumulated on the device;
- `lca`: the `lca` binary itself (`lca analyze RUN --engine torch --no-adaptive`, LCA_BIN or
  target/release/lca) on a Recorder-style run of the same kind of path, everything included
  (checkpoint reading, pipes, outputs, journal); its seconds per step are
  (T(S steps) − T(1 step)) / (S − 1), so start-up and the first gradient do not count.

    python bench/torch_engine.py --model resnet20 --samples 2000 --steps 3 --device cpu
    python bench/torch_engine.py --model gpt10m --samples 64 --steps 3 --device cuda
    python bench/torch_engine.py --model resnet20 --samples 45000 --device cuda --chunk-size 2500

Prints one markdown row per model: seconds per analysed step for each and their ratio. Do
not time on a loaded machine. The model factories below are also what the worker imports
(`--model bench/torch_engine.py:resnet20`).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"lca_example_{name}", ROOT / "docs/examples" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def resnet20() -> nn.Module:
    """ResNet-20 for CIFAR-10 (272,474 parameters), docs/examples/resnet20.py."""
    return _example("resnet20").resnet20()  # type: ignore[no-any-return]


def gpt10m() -> nn.Module:
    """nanoGPT shakespeare-char's configuration: 6 layers, 6 heads, C = 384, T = 256,
    65 characters (10.7M parameters), docs/examples/nanogpt.py."""
    ng = _example("nanogpt")
    cfg = ng.GPTConfig(
        block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.0, bias=True
    )
    return ng.GPT(cfg)  # type: ignore[no-any-return]


MODELS = {"resnet20": (resnet20, "batch-stats"), "gpt10m": (gpt10m, None)}


def make_data(model: str, n: int, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    if model == "resnet20":
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
        y = torch.randint(0, 10, (n,), generator=g)
        save_file({"x": x, "y": y}, str(path))
        return (x.double() / 255).float(), y
    tok = torch.randint(0, 65, (n, 257), generator=g)
    save_file({"tokens": tok}, str(path))
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def path_points(theta0: np.ndarray, steps: int) -> list[np.ndarray]:
    """A synthetic path: θ_t = θ_0 + a seeded random walk of relative size 1e-3 per step."""
    rng = np.random.default_rng(2)
    pts = [theta0.astype(np.float64)]
    scale = 1e-3 * (np.abs(theta0).mean() + 1e-3)
    for _ in range(steps):
        pts.append(pts[-1] + scale * rng.standard_normal(theta0.size))
    return pts


def run_engine(args: argparse.Namespace, data: Path, bn: str | None) -> tuple[float, float]:
    from lca.engine.client import EngineClient

    wargs = ["--model", f"{Path(__file__).resolve()}:{args.model}", "--data", str(data)]
    wargs += ["--loss", "cross_entropy", "--device", args.device, "--precision", args.precision]
    wargs += ["--chunk-size", str(args.chunk_size)]
    if args.model == "gpt10m":
        wargs += ["--tokens", "tokens"]
    if bn:
        wargs += ["--bn-mode", bn]
    with EngineClient(wargs) as c:
        init = MODELS[args.model][0]()
        sd = {k: v.detach().numpy() for k, v in init.state_dict().items()}
        pts = path_points(c.flatten(sd).astype(np.float64), args.steps)
        dt = np.float32 if args.precision == "f32" else np.float64
        t0 = time.perf_counter()
        g0 = c.loss_grad(pts[0].astype(dt)).grad
        t_first = time.perf_counter() - t0
        lca = np.zeros(c.numel)
        times = []
        for t in range(args.steps):
            s = time.perf_counter()
            d = pts[t + 1].astype(dt).astype(np.float64) - pts[t].astype(dt).astype(np.float64)
            gm = c.loss_grad((pts[t].astype(dt) + 0.5 * d).astype(dt)).grad
            g1 = c.loss_grad(pts[t + 1].astype(dt)).grad
            assert g0 is not None and gm is not None and g1 is not None
            lca += d * (g0 + 4 * gm + g1) / 6
            g0 = g1
            times.append(time.perf_counter() - s)
    return statistics.median(times), t_first


def write_run(args: argparse.Namespace, run: Path, data: Path, bn: str | None) -> None:
    """A Recorder-style run directory: lca-run.json, the data, one checkpoint per point."""
    import json

    from safetensors.torch import save_file

    model = MODELS[args.model][0]()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    theta0 = torch.cat([sd[n].reshape(-1).double() for n in names])
    (run / "checkpoints").mkdir(parents=True)
    for t, pt in enumerate(path_points(theta0.numpy(), args.steps)):
        o, th = 0, torch.from_numpy(pt)
        for n in names:
            k = sd[n].numel()
            sd[n] = th[o : o + k].view(sd[n].shape).float()
            o += k
        save_file(sd, str(run / f"checkpoints/step_{t:06d}.safetensors"), {"step": str(t)})
    tokens = args.model == "gpt10m"
    manifest = {
        "format": "lca-run",
        "format_version": 1,
        "model": {"factory": f"torch_engine:{args.model}", "sys_path": [str(ROOT / "bench")]},
        "data": {
            "file": str(data),
            "x": None if tokens else "x",
            "y": None if tokens else "y",
            "tokens": "tokens" if tokens else None,
        },
        "loss": "cross_entropy",
        "batch_norm": bn or "running-stats",
        "model_has_batch_norm": bn is not None,
        "chunk_size": args.chunk_size,
        "checkpoints": "checkpoints",
    }
    (run / "lca-run.json").write_text(json.dumps(manifest))


def run_lca(args: argparse.Namespace, tmp: Path, data: Path, bn: str | None) -> float:
    """Seconds per analysed step of `lca analyze --engine torch` (see the module docstring)."""
    import os
    import subprocess

    lca = os.environ.get("LCA_BIN", str(ROOT / "target/release/lca"))
    run = tmp / "run"
    write_run(args, run, data, bn)
    env = dict(os.environ, LCA_PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])

    def once(last: int) -> float:
        cmd = [lca, "analyze", str(run), "--engine", "torch", "--device", args.device]
        cmd += ["--precision", args.precision, "--chunk-size", str(args.chunk_size)]
        cmd += ["--no-adaptive", "-q", "--last", str(last), "-o", str(tmp / f"out{last}")]
        s = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        return time.perf_counter() - s

    return (once(args.steps) - once(1)) / (args.steps - 1)


def run_script(
    args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, bn: str | None
) -> tuple[float, float]:
    """The hand-written PyTorch script."""
    dev = torch.device(args.device)
    dtype = torch.float32 if args.precision == "f32" else torch.float64
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = MODELS[args.model][0]().to(dev, dtype).eval()
    if bn == "batch-stats":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    names = [n for n, _ in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    pts = path_points(theta0.numpy(), args.steps)
    shapes = [p.shape for p in model.parameters()]
    xs = x.to(dev, dtype) if x.is_floating_point() else x.to(dev)
    ys = y.to(dev)
    n = xs.shape[0]

    def grad(flat: np.ndarray) -> torch.Tensor:
        th = torch.from_numpy(flat).to(dev, dtype)
        ps, o = {}, 0
        for name, s in zip(names, shapes):
            k = int(np.prod(s))
            ps[name] = th[o : o + k].view(s).clone().requires_grad_(True)
            o += k
        for a in range(0, n, args.chunk_size):
            out = torch.func.functional_call(model, ps, (xs[a : a + args.chunk_size],))
            out = out[0] if isinstance(out, tuple) else out
            loss = (
                F.cross_entropy(
                    out.reshape(-1, out.shape[-1]),
                    ys[a : a + args.chunk_size].reshape(-1),
                    reduction="sum",
                )
                / ys.numel()
            )
            loss.backward()
        return torch.cat([ps[k].grad.reshape(-1) for k in names])  # type: ignore[union-attr]

    t0 = time.perf_counter()
    g0 = grad(pts[0])
    t_first = time.perf_counter() - t0
    lca = torch.zeros_like(g0)
    times = []
    for t in range(args.steps):
        s = time.perf_counter()
        d = torch.from_numpy(pts[t + 1] - pts[t]).to(dev, dtype)
        gm = grad(pts[t] + 0.5 * (pts[t + 1] - pts[t]))
        g1 = grad(pts[t + 1])
        lca += d * (g0 + 4 * gm + g1) / 6
        g0 = g1
        float(lca.sum())  # synchronise
        times.append(time.perf_counter() - s)
    return statistics.median(times), t_first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="resnet20")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["f32", "f64"], default="f32")
    p.add_argument("--chunk-size", type=int, default=500)
    p.add_argument("--no-lca", action="store_true", help="skip the `lca` binary's column")
    args = p.parse_args()
    bn = MODELS[args.model][1]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.safetensors"
        x, y = make_data(args.model, args.samples, data)
        script, script_first = run_script(args, x, y, bn)
        engine, engine_first = run_engine(args, data, bn)
        lca = run_lca(args, Path(tmp), data, bn) if args.steps >= 2 and not args.no_lca else None
    dev = args.device if args.device == "cpu" else torch.cuda.get_device_name(args.device)
    print(
        "| model | device | precision | samples | chunk | script s/step | engine s/step "
        "| engine / script | lca s/step | lca / script | first gradient script / engine s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    lca_cols = f"{lca:.3f} | {lca / script:.3f}" if lca is not None else "– | –"
    print(
        f"| {args.model} | {dev} | {args.precision} | {args.samples} | {args.chunk_size} "
        f"| {script:.3f} | {engine:.3f} | {engine / script:.3f} | {lca_cols} "
        f"| {script_first:.3f} / {engine_first:.3f} |"
    )


if __name__ == "__main__":
    main()
