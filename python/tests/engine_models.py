"""PyTorch modules equivalent to the shipped fixtures' specs (fixtures/README.md), as factories
for the engine worker (`--model python/tests/engine_models.py:mlp`)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"lca_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


class MLP(nn.Module):
    """fixtures/mlp: 64-32-32-10 ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """fixtures/cnn: conv 3×3 pad 1, ReLU, max-pool 2, grouped strided conv, ReLU, avg-pool,
    flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.avg_pool2d(x, 2, stride=1, padding=1)
        return self.fc(torch.flatten(x, 1))


def mlp() -> nn.Module:
    return MLP()


def cnn() -> nn.Module:
    return CNN()


def resnet() -> nn.Module:
    """fixtures/resnet: ResNet(num_blocks=(1, 1), widths=(8, 16), in_channels=1)."""
    rn = _example("resnet20")
    return rn.ResNet(num_blocks=(1, 1), widths=(8, 16), in_channels=1, num_classes=10)


def gpt() -> nn.Module:
    """fixtures/gpt: docs/examples/nanogpt.py's GPT (2 blocks, 4 heads, 16 channels, context 32,
    82 characters, tied head)."""
    ng = _example("nanogpt")
    cfg = ng.GPTConfig(
        block_size=32, vocab_size=82, n_layer=2, n_head=4, n_embd=16, dropout=0.0, bias=True
    )
    return ng.GPT(cfg)


def mlp_with_dropout(p: float = 0.5) -> nn.Module:
    """fixtures/mlp with dropout between the layers: evaluation semantics turn it off."""
    m = MLP()
    return nn.Sequential(m.fc1, nn.ReLU(), nn.Dropout(p), m.fc2, nn.ReLU(), nn.Dropout(p), m.fc3)


def chatty_mlp() -> nn.Module:
    """An MLP whose construction prints to stdout: the protocol stream must stay clean."""
    print("hello from the model's code on stdout")
    return MLP()


def broken() -> nn.Module:
    raise RuntimeError("this factory fails on purpose")
