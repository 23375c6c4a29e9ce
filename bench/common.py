"""Shared pieces of the PyTorch side of the benchmark: the study's models, the data, the
chunked full-training-set gradient, and the FLOP count used in the table.

FLOPs of one loss+gradient evaluation, per sample: 2*MACs forward, plus 2*MACs for the weight
gradient of every layer with parameters, plus 2*MACs for the input gradient of every such layer
except the first (whose input is the data, which needs no gradient). Pooling, activations and
the loss are not counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file
from torch import nn


class MnistFC(nn.Module):
    """The study's MNIST-FC: 784-100-50-10, ReLU. Parameter names match bench/mnist_fc.toml."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 100)
        self.fc2 = nn.Linear(100, 50)
        self.fc3 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LeNet(nn.Module):
    """The study's modified LeNet: conv 20 5x5 same, maxpool 2, conv 40 5x5 same, maxpool 2,
    dense 400, dense 10; ReLU (dropout is off at evaluation). 808,970 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5, padding=2)
        self.conv2 = nn.Conv2d(20, 40, 5, padding=2)
        self.fc1 = nn.Linear(40 * 7 * 7, 400)
        self.fc2 = nn.Linear(400, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


MODELS = {"mnist_fc": MnistFC, "lenet": LeNet}


def flops_per_sample(model: nn.Module, sample_shape: tuple[int, ...]) -> int:
    """FLOPs of forward + backward without the first layer's input gradient (see above)."""
    macs: list[int] = []

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            macs.append(out.numel() // out.shape[0] * mod.in_features)
        elif isinstance(mod, nn.Conv2d):
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
            macs.append(out.numel() // out.shape[0] * k)

    hs = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    with torch.no_grad():
        model(torch.zeros((1, *sample_shape)))
    for h in hs:
        h.remove()
    return sum(2 * m + 2 * m + (2 * m if i > 0 else 0) for i, m in enumerate(macs))


def load_data(path: str, scale: float = 1.0 / 255.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 [N, 1, 28, 28] scaled, y as int64 (the preprocessing lca does at load)."""
    d = load_file(path)
    x = torch.from_numpy(d["x"].astype(np.float32) * np.float32(scale))
    if x.dim() == 2:
        x = x.reshape(-1, 1, 28, 28)
    return x.contiguous(), torch.from_numpy(d["y"].astype(np.int64))


def full_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int) -> float:
    """Mean loss over all samples and its gradient (left in p.grad), chunk by chunk: each
    chunk's summed loss is back-propagated, gradients accumulate in p.grad, no input gradient."""
    for p in model.parameters():
        p.grad = None
    total = 0.0
    n = x.shape[0]
    for a in range(0, n, chunk):
        loss = F.cross_entropy(model(x[a : a + chunk]), y[a : a + chunk], reduction="sum")
        loss.backward()
        total += loss.item()
    for p in model.parameters():
        p.grad /= n
    return total / n


def timed(fn: Callable[[], object], reps: int) -> list[float]:
    """Run fn once to warm up, then reps times; return the list of wall times."""
    fn()
    out: list[float] = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out
