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
    """fixtures/mlp with dropout between the layers (evaluation semantics turn it off); its
    construction prints to stdout, which must not reach the protocol stream."""
    print("hello from the model's code on stdout")
    m = MLP()
    return nn.Sequential(m.fc1, nn.ReLU(), nn.Dropout(p), m.fc2, nn.ReLU(), nn.Dropout(p), m.fc3)


def broken() -> nn.Module:
    raise RuntimeError("this factory fails on purpose")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class LlamaLM(nn.Module):
    """A Llama-style language model in plain PyTorch, beyond the spec's layer types: RMSNorm,
    rotary position embeddings (a held buffer), SwiGLU, no biases, untied head."""

    def __init__(self, vocab: int = 82, dim: int = 16, heads: int = 2, context: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1 = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = RMSNorm(dim)
        self.gate = nn.Linear(dim, 2 * dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)
        self.norm_f = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        d = dim // heads
        inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        ang = torch.outer(torch.arange(context, dtype=torch.float64), inv)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.embed(idx)
        q, k, v = self.qkv(self.norm1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        h = self.norm2(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return self.head(self.norm_f(x))


def llama(**kwargs: int) -> nn.Module:
    return LlamaLM(**kwargs)


class Regressor(nn.Module):
    """A small MLP with two outputs, for the MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class BN1d(nn.Module):
    """Linear, BatchNorm1d, ReLU, linear: batch norm on [N, C] features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x))))
