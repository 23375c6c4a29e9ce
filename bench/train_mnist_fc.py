"""Train the study's MNIST-FC on the benchmark's MNIST set and save a checkpoint at every step.

SGD, lr 0.01, momentum 0.9, minibatches of 250 from a seeded permutation per epoch (one epoch of
55,000 samples = 220 steps), cross-entropy on the logits, float32, one thread, fixed seeds.
ckpt_<t>.safetensors is the state_dict before iteration t (ckpt_0 = initialisation), with
safetensors metadata {"step": "<t>"}.

Usage: python train_mnist_fc.py DATA.safetensors OUTDIR STEPS
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from common import MnistFC, load_data

BATCH = 250


def main() -> None:
    data, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    torch.manual_seed(20190901)
    os.makedirs(out, exist_ok=True)
    x, y = load_data(data)
    model = MnistFC()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(1)

    def save(t: int) -> None:
        sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(sd, os.path.join(out, f"ckpt_{t}.safetensors"), metadata={"step": str(t)})

    save(0)
    perm, at = torch.randperm(len(x), generator=gen), 0
    for t in range(steps):
        if at + BATCH > len(x):
            perm, at = torch.randperm(len(x), generator=gen), 0
        idx = perm[at : at + BATCH]
        at += BATCH
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        save(t + 1)
        if (t + 1) % 50 == 0:
            print(f"step {t + 1}: minibatch loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
