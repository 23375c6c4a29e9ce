"""Small models for the Recorder tests: a custom CNN with nested modules, and models with ops
lca cannot evaluate."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CustomCNN(nn.Module):
    """A CNN written the usual way: `self.features` and `self.classifier` Sequentials, a
    functional flatten in `forward`, strided and padded convolutions, both pool kinds."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, kernel_size=3, padding=1),
            nn.BatchNorm2d(8),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=(1, 0), groups=2),
            nn.GELU(approximate="tanh"),
            nn.AvgPool2d(kernel_size=2, stride=1, padding=1, count_include_pad=False),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.2),
            nn.Linear(16 * 4 * 3, 32),
            nn.Sigmoid(),
            nn.Linear(32, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class SinMLP(nn.Module):
    """An MLP with a `torch.sin` activation (no lca layer type computes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.sin(self.fc1(x))
        return self.fc2(F.relu(h))


class RMSNormNet(nn.Module):
    """A net with `nn.RMSNorm` inside a nested block (no lca layer type computes it)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))
