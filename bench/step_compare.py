#!/usr/bin/env python3
"""Per analysed step and full-set gradient rows of bench/compare.sh beyond MNIST-FC: lca against
PyTorch on the CPU, same thread count, each at its faster chunk size.

Rows (``--rows``, comma-separated; default all):

  lenet_step        LeNet (docs/examples/lenet.toml) on MNIST-shaped synthetic data
  resnet20_rs_step  ResNet-20 (docs/examples/resnet20.py) on CIFAR-shaped synthetic data,
                    batch norm with running statistics (model.eval())
  resnet20_bs_step  the same, batch norm with each chunk's statistics (the chunk is part of
                    the loss, so both sides use the spec's chunk)
  gpt0_step ... gpt3_step
                    the nanoGPT-style configurations of bench/gpt_specs.py (PyTorch with SDPA)
  resnet20_grad     ResNet-20 full-set loss+gradient, running statistics, 32x32
  resnet18_grad     torchvision's resnet18 (unchanged, 32x32 inputs) full-set loss+gradient,
                    running statistics; its spec is written by lca.trace_spec

A *step* row writes a spec, a data set and STEPS+1 checkpoints (SGD steps of the PyTorch model)
to WORK/<row>/, then times, REPS times each:
  - ``lca analyze CKPTS -s SPEC --no-adaptive -j THREADS -q --no-verify-loss`` end to end
    (the process, loading included; whether the first layer is shared is lca's own decision),
    seconds / steps;
  - PyTorch Simpson with the end gradient reused (1 + 2*STEPS full-set gradients, midpoints in
    float64 as bench/torch_lca.py), loading included, seconds / steps, at each candidate
    chunk size; the faster median is the reference.
A *grad* row times examples/bench_grad (one full-set loss and gradient, REPS repetitions after a
warm-up) against PyTorch's chunked full-set gradient (bench/common.py's full_grad).

Both sides try the same candidate chunk sizes and are reported at their faster median, except
in batch-stats mode, where the chunk is part of the loss and both use the spec's. (lca runs its
chunks in parallel, one per thread: 500 images in chunks of 100 leave one of 2 threads idle for
a sixth of the time, which a larger chunk avoids; PyTorch parallelises inside each product.)

Every row records all repetitions (the spread), the median and the minimum; the speed-up is
PyTorch's median / lca's median. Prints one JSON list (also written to --json).

Usage: python bench/step_compare.py --lca target/release/lca --bench-grad
       target/release/examples/bench_grad [--rows R1,R2] [--threads 2] [--reps 5]
       [--work bench/work/steps] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    "lenet_step",
    "resnet20_rs_step",
    "resnet20_bs_step",
    "gpt0_step",
    "gpt1_step",
    "gpt2_step",
    "gpt3_step",
    "resnet20_grad",
    "resnet18_grad",
]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=0, help="steps per step row (0: the row's own)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every row's sample count")
    p.add_argument("--work", default=str(ROOT / "bench/work/steps"))
    p.add_argument("--lca", default=str(ROOT / "target/release/lca"))
    p.add_argument("--bench-grad", default=str(ROOT / "target/release/examples/bench_grad"))
    p.add_argument("--json")
    return p.parse_args()


ARGS = parse()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file, save_model  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "docs/examples"))
import gpt_specs  # noqa: E402
from common import LeNet, timed  # noqa: E402

torch.set_num_threads(ARGS.threads)


def say(msg: str) -> None:
    print(f"   {msg}", file=sys.stderr, flush=True)


def stats(ts: list[float]) -> dict[str, Any]:
    return {"seconds": ts, "median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts)}


# --- the models --------------------------------------------------------------------------------


class Row:
    """One row: a model, its data, its chunk sizes and how its spec is written."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.kind = "grad" if key.endswith("_grad") else "step"
        self.bn = "running-stats"
        self.tokens = False
        self.sdpa = False
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(1)
        if key == "lenet_step":
            self.name, self.model = "LeNet (MNIST-shaped)", LeNet()
            n, self.steps, self.chunk, self.torch_chunks = 4000, 3, 250, [250, 1000]
            self.x = torch.rand(int(n * ARGS.scale), 1, 28, 28, generator=g)
        elif key.startswith("resnet20"):
            import resnet20

            self.model = resnet20.resnet20()
            self.bn = "batch-stats" if key == "resnet20_bs_step" else "running-stats"
            self.name = f"ResNet-20 (CIFAR-shaped, {self.bn})"
            n = 1000 if self.kind == "grad" else 500
            self.steps, self.chunk = 2, 100
            self.torch_chunks = [100] if self.bn == "batch-stats" else [100, 250]
            self.x = torch.randn(int(n * ARGS.scale), 3, 32, 32, generator=g)
        elif key == "resnet18_grad":
            import torchvision

            self.model = torchvision.models.resnet18(num_classes=10)
            self.name = "ResNet-18 (torchvision, 32x32, running-stats)"
            n, self.steps, self.chunk, self.torch_chunks = 1000, 0, 100, [100, 250]
            self.x = torch.randn(int(n * ARGS.scale), 3, 32, 32, generator=g)
        elif key.startswith("gpt"):
            import nanogpt

            i = int(key[3])
            name, vocab, t, layers, heads, c, n_seq, chunk = gpt_specs.CONFIGS[i]
            self.model = gpt_specs.build(nanogpt, i)
            self.name, self.tokens, self.sdpa = name, True, True
            self.gpt = (vocab, t, layers, heads, c)
            self.steps, self.chunk, self.torch_chunks = 3, chunk, gpt_specs.chunk_candidates(i)
            self.x = torch.randint(0, vocab, (int(n_seq * ARGS.scale), t + 1), generator=g)
            nanogpt.CausalSelfAttention.forward = gpt_specs.sdpa_forward
        else:
            raise SystemExit(f"unknown row {key!r}; rows: {', '.join(ROWS)}")
        if ARGS.steps:
            self.steps = ARGS.steps
        if not self.tokens:
            self.y = torch.randint(0, 10, (self.x.shape[0],), generator=g)

    # The loss PyTorch computes: summed cross-entropy of a chunk of samples (or sequences).
    def chunk_loss(self, a: int, b: int) -> tuple[torch.Tensor, int]:
        if self.tokens:
            x, y = self.x[a:b, :-1], self.x[a:b, 1:]
            logits = self.model(x)
            return F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"
            ), y.numel()
        return F.cross_entropy(self.model(self.x[a:b]), self.y[a:b], reduction="sum"), b - a

    def write(self, d: Path) -> None:
        """Spec, data and checkpoints for lca under d (skipped when already there)."""
        d.mkdir(parents=True, exist_ok=True)
        done = d / f"ckpts/ckpt_{self.steps}.safetensors"
        if done.exists() and (d / "model.toml").exists():
            return
        (d / "ckpts").mkdir(exist_ok=True)
        if self.tokens:
            vocab, t, layers, heads, c = self.gpt
            (d / "model.toml").write_text(
                gpt_specs.spec_toml(vocab, t, layers, heads, c, self.chunk)
            )
            save_file({"tokens": self.x.contiguous()}, str(d / "train.safetensors"))
        else:
            from lca.trace import trace_spec

            r = trace_spec(
                self.model,
                self.x[:2],
                batch_norm=self.bn,
                chunk_size=self.chunk,
                data={"train": "train.safetensors"},
            )
            if r.spec is None:
                raise SystemExit(f"{self.key}: no spec: {r.message}")
            (d / "model.toml").write_text(r.spec)
            save_file({"x": self.x.contiguous(), "y": self.y}, str(d / "train.safetensors"))
        # SGD steps on batches of the data (train mode: batch norm's running stats move).
        opt = torch.optim.SGD(self.model.parameters(), lr=0.02, momentum=0.9)
        self.model.train()
        for t in range(self.steps + 1):
            path = str(d / f"ckpts/ckpt_{t}.safetensors")
            save_model(self.model, path, metadata={"step": str(t)})
            opt.zero_grad()
            b = min(64, self.x.shape[0])
            a = t * b % (self.x.shape[0] - b + 1)
            loss, k = self.chunk_loss(a, a + b)
            (loss / k).backward()
            opt.step()

    # --- PyTorch ----------------------------------------------------------------------------

    def full_grad(self, chunk: int) -> float:
        """Full-set mean loss; its gradient is left in p.grad."""
        for p in self.model.parameters():
            p.grad = None
        total, count = 0.0, 0
        n = self.x.shape[0]
        for a in range(0, n, chunk):
            loss, k = self.chunk_loss(a, min(a + chunk, n))
            loss.backward()
            total += float(loss.detach())
            count += k
        for p in self.model.parameters():
            p.grad /= count
        return total / count

    def torch_simpson(self, d: Path, chunk: int, steps: int | None = None) -> float:
        """PyTorch Simpson with the end gradient reused, loading included; seconds per step
        (`steps`: fewer than the row's, e.g. 0 for a warm-up)."""
        steps = self.steps if steps is None else steps
        t0 = time.perf_counter()
        if self.tokens:
            self.x = load_file(str(d / "train.safetensors"))["tokens"]
        else:
            data = load_file(str(d / "train.safetensors"))
            self.x, self.y = data["x"], data["y"]
        self.model.train(self.bn == "batch-stats")
        names = [n for n, _ in self.model.named_parameters()]
        state = self.model.state_dict()
        floats = [k for k, v in state.items() if v.is_floating_point()]

        def ckpt(t: int) -> dict[str, torch.Tensor]:
            sd = load_file(str(d / f"ckpts/ckpt_{t}.safetensors"))
            return {k: sd[k].double() for k in floats if k in sd}

        def grad_at(theta: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
            with torch.no_grad():
                for k, v in theta.items():
                    state[k].copy_(v)
            loss = self.full_grad(chunk)
            return loss, {n: p.grad.double() for n, p in self.model.named_parameters()}

        th0 = ckpt(0)
        _, g0 = grad_at(th0)
        for t in range(steps):
            th1 = ckpt(t + 1)
            _, g1 = grad_at(th1)
            delta = {k: th1[k] - th0[k] for k in th0}
            _, gm = grad_at({k: th0[k] + 0.5 * delta[k] for k in th0})
            lca = {n: delta[n] * (g0[n] + 4.0 * gm[n] + g1[n]) / 6.0 for n in names if n in delta}
            sum(v.sum().item() for v in lca.values())
            th0, g0 = th1, g1
        return (time.perf_counter() - t0) / max(steps, 1)

    # --- the measurements -------------------------------------------------------------------

    def measure(self) -> dict[str, Any]:
        d = Path(ARGS.work) / self.key
        self.write(d)
        load_before = os.getloadavg()[0]
        out: dict[str, Any] = {
            "row": self.key,
            "kind": self.kind,
            "model": self.name,
            "threads": ARGS.threads,
            "reps": ARGS.reps,
            "params": sum(p.numel() for p in self.model.parameters()),
            "samples": int(self.x.shape[0]),
            "lca_chunk": self.chunk,
            "torch": torch.__version__,
        }
        # lca at each candidate chunk (the spec's only where the chunk is part of the loss).
        lca_chunks = [self.chunk] if self.bn == "batch-stats" else self.torch_chunks
        lca_tries: dict[int, list[float]] = {}
        if self.kind == "step":
            out["steps"] = self.steps
            for c in lca_chunks:
                spec = self.spec_with_chunk(d, c)
                lca_tries[c] = [self.lca_step(d, spec) for _ in range(ARGS.reps)]
            tries = {}
            for c in self.torch_chunks:
                self.torch_simpson(d, c, steps=0)  # warm-up (loading, first products)
                tries[c] = [self.torch_simpson(d, c) for _ in range(ARGS.reps)]
        else:
            for c in lca_chunks:
                lca_tries[c] = self.lca_grad(d, c)
            sd = load_file(str(d / "ckpts/ckpt_0.safetensors"))
            self.model.load_state_dict(sd, strict=False)
            self.model.train(self.bn == "batch-stats")
            tries = {}
            for c in self.torch_chunks:
                # common.timed: one warm-up call, then ARGS.reps timed calls.
                tries[c] = timed(lambda c=c: self.full_grad(c), ARGS.reps)
        best = min(tries, key=lambda c: statistics.median(tries[c]))
        lca_best = min(lca_tries, key=lambda c: statistics.median(lca_tries[c]))
        out["lca_chunk"] = lca_best
        out["lca_by_chunk"] = {str(c): stats(ts) for c, ts in lca_tries.items()}
        out["lca"] = stats(lca_tries[lca_best])
        out["torch_by_chunk"] = {str(c): stats(ts) for c, ts in tries.items()}
        out["torch_chunk"] = best
        out["torch_best"] = stats(tries[best])
        out["speedup"] = out["torch_best"]["median_s"] / out["lca"]["median_s"]
        out["speedup_spread"] = [
            out["torch_best"]["min_s"] / out["lca"]["max_s"],
            out["torch_best"]["max_s"] / out["lca"]["min_s"],
        ]
        out["load_before"], out["load_after"] = load_before, os.getloadavg()[0]
        return out

    def spec_with_chunk(self, d: Path, chunk: int) -> Path:
        """The row's spec with another `chunk_size` (written beside it; the spec itself when it
        has that chunk already: a work directory written before a row's chunk changed keeps
        its old spec, so the chunk is read, not assumed)."""
        text = (d / "model.toml").read_text()
        if re.search(rf"(?m)^chunk_size = {chunk}$", text):
            return d / "model.toml"
        new, n = re.subn(r"(?m)^chunk_size = \d+$", f"chunk_size = {chunk}", text)
        if n != 1:
            raise SystemExit(f"{self.key}: no single chunk_size line in {d / 'model.toml'}")
        path = d / f"model_chunk{chunk}.toml"
        path.write_text(new)
        return path

    def lca_step(self, d: Path, spec: Path) -> float:
        o = d / "lca_out"
        subprocess.run(["rm", "-rf", str(o)], check=True)
        t0 = time.perf_counter()
        r = subprocess.run(
            [
                ARGS.lca,
                "analyze",
                str(d / "ckpts"),
                "-s",
                str(spec),
                "-o",
                str(o),
                "--no-adaptive",
                "--no-verify-loss",
                "-j",
                str(ARGS.threads),
                "-q",
            ],
            capture_output=True,
            text=True,
        )
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise SystemExit(f"{self.key}: lca analyze failed:\n{r.stderr}")
        return dt / self.steps

    def lca_grad(self, d: Path, chunk: int) -> list[float]:
        r = subprocess.run(
            [
                ARGS.bench_grad,
                "--spec",
                str(d / "model.toml"),
                "--data",
                str(d / "train.safetensors"),
                "--chunk",
                str(chunk),
                "--threads",
                str(ARGS.threads),
                "--reps",
                str(ARGS.reps),
                "--ckpt",
                str(d / "ckpts/ckpt_0.safetensors"),
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise SystemExit(f"{self.key}: bench_grad failed:\n{r.stderr}")
        return json.loads(r.stdout)["seconds"]


def main() -> int:
    rows = []
    for key in [r for r in ARGS.rows.split(",") if r]:
        say(f"{key}: writing the inputs and timing ({ARGS.reps} repetitions each)")
        r = Row(key).measure()
        say(
            f"{key}: lca {r['lca']['median_s']:.4f} s, PyTorch {r['torch_best']['median_s']:.4f} s "
            f"(chunk {r['torch_chunk']}), speed-up {r['speedup']:.2f}"
        )
        rows.append(r)
    text = json.dumps(rows, indent=1)
    if ARGS.json:
        Path(ARGS.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
