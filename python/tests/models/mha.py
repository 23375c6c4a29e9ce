"""A small decoder built on `nn.MultiheadAttention` with a causal mask (PyTorch's own layers)."""

from __future__ import annotations

import torch
import torch.nn as nn


class MHADecoder(nn.Module):
    def __init__(
        self, vocab: int = 30, block: int = 12, dim: int = 16, heads: int = 4, causal: bool = True
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.ln = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.causal = causal
        self.register_buffer(
            "mask", torch.triu(torch.ones(block, block, dtype=torch.bool), 1), persistent=False
        )

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        h = self.ln(x)
        mask = self.mask[:t, :t]
        a, _ = self.attn(h, h, h, attn_mask=mask if self.causal else None, need_weights=False)
        return self.head(x + a)
