#!/usr/bin/env python3
"""ResNet-20 for CIFAR-10, as a PyTorch module, and the `lca` spec that matches it.

The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning for Image Recognition", §4.2):
a 3×3 convolution with 16 channels + BN + ReLU, three stages of n basic blocks with 16, 32 and
64 channels (n = 3 for ResNet-20), global average pooling and a linear layer to 10 logits.
The first block of stages 2 and 3 halves the resolution with stride 2; its shortcut is a 1×1
convolution with stride 2 followed by BN ("option B"; the paper's option A pads with zeros
instead and has no parameters). Convolutions have no bias (BN's shift replaces it).
ResNet-20 then has 272,474 parameters. The module and attribute names follow the widely used
CIFAR ResNet definitions, so the state_dict names are

    conv1.weight, bn1.{weight,bias,running_mean,running_var,num_batches_tracked},
    layer{1,2,3}.{0,1,2}.conv{1,2}.weight, layer{1,2,3}.{0,1,2}.bn{1,2}.*,
    layer{2,3}.0.shortcut.0.weight, layer{2,3}.0.shortcut.1.*, linear.{weight,bias}

Usage:

    python docs/examples/resnet20.py > docs/examples/resnet20.toml     # write the lca spec

    import resnet20; model = resnet20.resnet20()                         # the PyTorch model
    save_file(model.state_dict(), f"ckpts/ckpt_{t}.safetensors", metadata={"step": str(t)})

`lca_spec()` writes the spec of any `ResNet` built here (other depths, widths or input
channels): one `[[layers]]` table per module of the forward pass, in evaluation order, with the
skip connections written as `add` layers (see docs/spec.md, "Residual connections and batch
norm"). fixtures/make_fixtures.py uses it for the small ResNet fixture, whose PyTorch oracle
therefore also checks this generator.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    """conv 3×3 → BN → ReLU → conv 3×3 → BN, plus the shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()  # identity
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem, len(widths) stages of basic blocks, global average pool,
    linear. Stage i > 0 starts with a stride-2 block."""

    def __init__(self, num_blocks: Sequence[int] = (3, 3, 3),
                 widths: Sequence[int] = (16, 32, 64), in_channels: int = 3,
                 num_classes: int = 10) -> None:
        super().__init__()
        assert len(num_blocks) == len(widths) >= 1
        self.num_blocks, self.widths, self.in_channels = tuple(num_blocks), tuple(widths), in_channels
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, (n, w) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_planes, w, 2 if (i > 0 and j == 0) else 1))
                in_planes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        # He (Kaiming) normal initialisation of the convolution and linear weights, as in the
        # paper; BN starts at weight 1, bias 0; the linear bias keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def stages(self) -> list[nn.Sequential]:
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.widths))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for stage in self.stages():
            out = stage(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> ResNet:
    return ResNet((3, 3, 3), (16, 32, 64), 3, num_classes)


def _conv(name: str, cin: int, cout: int, k: int, stride: int, padding: int,
          input: str | None = None) -> str:
    s = f'[[layers]]\nname = "{name}"\ntype = "conv2d"\n'
    if input is not None:
        s += f'input = "{input}"\n'
    s += f"in_channels = {cin}\nout_channels = {cout}\nkernel_size = {k}\n"
    if stride != 1:
        s += f"stride = {stride}\n"
    if padding:
        s += f"padding = {padding}\n"
    return s + "bias = false\n"


def _layer(name: str, type_: str, **keys) -> str:
    s = f'[[layers]]\nname = "{name}"\ntype = "{type_}"\n'
    for k, v in keys.items():
        if isinstance(v, list):
            v = "[" + ", ".join(f'"{x}"' for x in v) + "]"
        elif isinstance(v, str):
            v = f'"{v}"'
        s += f"{k} = {v}\n"
    return s


def lca_spec(model: ResNet, *, header: str, model_keys: str, data: str, chunk_size: int) -> str:
    """The lca spec of `model` (layers named as its modules), with a header comment, the
    extra `[model]` keys (batch_norm, input_shape, ...), the `[data]` section's body and the
    evaluation chunk size."""
    parts = [header.rstrip("\n") + "\n", "[model]\n" + model_keys.rstrip("\n") + "\n"]
    w0 = model.widths[0]
    parts.append(_conv("conv1", model.in_channels, w0, 3, 1, 1))
    parts.append(_layer("bn1", "batch_norm2d", num_features=w0))
    parts.append(_layer("relu", "relu"))
    x = "relu"  # the layer whose output enters the next block
    for si, stage in enumerate(model.stages()):
        for bi, block in enumerate(stage):
            p = f"layer{si + 1}.{bi}"
            cin, cout = block.conv1.in_channels, block.conv1.out_channels
            stride = block.conv1.stride[0]
            parts.append(_conv(f"{p}.conv1", cin, cout, 3, stride, 1, input=x))
            parts.append(_layer(f"{p}.bn1", "batch_norm2d", num_features=cout))
            parts.append(_layer(f"{p}.relu1", "relu"))
            parts.append(_conv(f"{p}.conv2", cout, cout, 3, 1, 1))
            parts.append(_layer(f"{p}.bn2", "batch_norm2d", num_features=cout))
            if len(block.shortcut) == 0:
                short = x
            else:
                parts.append(_conv(f"{p}.shortcut.0", cin, cout, 1, stride, 0, input=x))
                parts.append(_layer(f"{p}.shortcut.1", "batch_norm2d", num_features=cout))
                short = f"{p}.shortcut.1"
            parts.append(_layer(f"{p}.add", "add", input=[f"{p}.bn2", short]))
            parts.append(_layer(f"{p}.relu2", "relu"))
            x = f"{p}.relu2"
    parts.append(_layer("avgpool", "global_avg_pool"))
    parts.append(_layer("linear", "linear", in_features=model.linear.in_features,
                        out_features=model.linear.out_features))
    parts.append('[loss]\ntype = "cross_entropy"\n')
    parts.append("[data]\n" + data.rstrip("\n") + "\n")
    parts.append(f"[eval]\nchunk_size = {chunk_size}\n")
    return "\n".join(parts)


RESNET20_HEADER = """\
# ResNet-20 for CIFAR-10 (He et al. 2016, §4.2; the LCA study's ResNet, §9 of the reference
# notes) with 1×1 conv + BN shortcuts on shape change ("option B"): 272,474 parameters.
# Generated by `python docs/examples/resnet20.py > docs/examples/resnet20.toml` from the
# PyTorch definition in resnet20.py, whose state_dict it reads as saved (conv1.weight,
# bn1.*, layer1.0.conv1.weight, ..., layer2.0.shortcut.0.weight, layer2.0.shortcut.1.*,
# linear.weight). Relu and add layers are the functional calls of BasicBlock.forward;
# `input` names a block's input on its first convolution and shortcut (see docs/spec.md,
# "Residual connections and batch norm").
"""

RESNET20_MODEL = """\
# The LCA study's choice: BN normalises with the statistics of each evaluation chunk, so the
# chunk size ([eval] below) is part of the loss. "running-stats" evaluates as model.eval()
# and reports the running statistics' share of the loss change as a "buffers" group.
batch_norm = "batch-stats"
input_shape = [3, 32, 32]
"""

RESNET20_DATA = """\
# x uint8 [N, 3, 32, 32], y int64 [N].
train = "data/cifar10_train.safetensors"
scale = 0.00392156862745098  # 1/255
# Per-channel normalisation after scaling, if the model was trained with it:
# mean = [0.4914, 0.4822, 0.4465]
# std = [0.2470, 0.2435, 0.2616]
"""


def resnet20_spec() -> str:
    return lca_spec(resnet20(), header=RESNET20_HEADER, model_keys=RESNET20_MODEL,
                    data=RESNET20_DATA, chunk_size=250)


if __name__ == "__main__":
    n = sum(p.numel() for p in resnet20().parameters())
    assert n == 272_474, n
    sys.stdout.write(resnet20_spec())
