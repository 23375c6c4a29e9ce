"""PyTorch modules for `lca analyze --engine torch` tests: the fixtures that
`engine_models.py` does not cover (cnn_strided, mlp_tanh_adam, deep40, resnet20) and a model
with a custom autograd op (no spec can express it)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from engine_models import _example
from torch import nn


class CNNStrided(nn.Module):
    """fixtures/cnn_strided: conv 3×3 pad 1, ReLU, conv 3×3 stride 2 pad 1, ReLU, avg-pool 2,
    flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(F.avg_pool2d(x, 2), 1))


class MLPTanh(nn.Module):
    """fixtures/mlp_tanh_adam: 64-32-32-10, tanh then ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(torch.tanh(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x))) + x


class Deep40(nn.Module):
    """fixtures/deep40: stem 64→16 + ReLU, 20 residual blocks (fc1, ReLU, fc2, add), head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(64, 16)
        self.blocks = nn.ModuleList(Block() for _ in range(20))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class _Squareplus(torch.autograd.Function):
    """A custom op with a hand-written backward: (x + sqrt(x² + 4)) / 2."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return (x + torch.sqrt(x * x + 4)) / 2

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return g * (1 + x / torch.sqrt(x * x + 4)) / 2


class CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 24)
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_Squareplus.apply(self.fc1(x)))


def cnn_strided() -> nn.Module:
    return CNNStrided()


def mlp_tanh() -> nn.Module:
    return MLPTanh()


def deep40() -> nn.Module:
    return Deep40()


def resnet20() -> nn.Module:
    return _example("resnet20").resnet20()


def custom_op() -> nn.Module:
    return CustomOp()


def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(num_classes=10)
