"""The nanoGPT-style configurations of the benchmark and the lca spec of each (the layout of
docs/examples/nanogpt.toml), shared by bench/gpt_compare.py and bench/step_compare.py."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# (name, vocab, context, layers, heads, channels, sequences, chunk size). The chunk size is the
# spec's (lca's own choice, the gradient rows' lca chunk): for C=64, 8 sequences (512 rows, whose
# activations stay in L2) took 22 % less CPU than 32 in one-thread runs of bench_gpt (1.90 s
# against 2.44 s of user time for 4 gradients; 16: 2.10 s, 64: 2.69 s).
CONFIGS = [
    ("fixture gpt (C=16)", 82, 32, 2, 4, 16, 256, 32),
    ("tiny GPT (C=32)", 82, 32, 2, 4, 32, 256, 32),
    ("small GPT (C=64, T=64, 4 layers)", 82, 64, 4, 4, 64, 512, 8),
    ("nanoGPT char (C=128, T=128, 4 layers)", 65, 128, 4, 4, 128, 256, 16),
]

# Further chunk sizes (sequences) at which both sides are timed, beside the spec's and the whole
# set; each side is reported at its fastest. PyTorch's best is not the whole set on the larger
# models: one thread, CPU s per full-set gradient with SDPA, C=64 at 8 / 16 / 32 / 512 sequences
# 0.66 / 0.69 / 0.71 / 0.86 s, C=128 at 4 / 8 / 16 / 256 2.07 / 1.93 / 1.90 / 2.41 s. lca's
# C=128 at 4 took 2-6 % less CPU than at 16 in one-thread runs on the loaded machine (indicative).
EXTRA_CHUNKS = {2: [32], 3: [4]}


def chunk_candidates(i: int) -> list[int]:
    """Chunk sizes (sequences) at which configuration ``i`` is timed, on both sides: the spec's,
    EXTRA_CHUNKS' and the whole set, in increasing order."""
    n_seq, chunk = CONFIGS[i][6], CONFIGS[i][7]
    return sorted({chunk, n_seq, *EXTRA_CHUNKS.get(i, [])})


def build(nanogpt: Any, i: int) -> torch.nn.Module:
    """Configuration ``i`` of CONFIGS as a ``nanogpt.GPT`` (docs/examples/nanogpt.py, passed in
    as the loaded module), without dropout and with biases, as both benchmarks use it."""
    _, vocab, t, layers, heads, c, _, _ = CONFIGS[i]
    cfg = nanogpt.GPTConfig(
        block_size=t,
        vocab_size=vocab,
        n_layer=layers,
        n_head=heads,
        n_embd=c,
        dropout=0.0,
        bias=True,
    )
    return nanogpt.GPT(cfg)


def spec_toml(vocab: int, t: int, layers: int, heads: int, c: int, chunk: int) -> str:
    """The docs/examples/nanogpt.toml layout for another configuration."""
    out = [
        f'[[layers]]\nname = "transformer.wte"\ntype = "embedding"\nnum_embeddings = {vocab}\n'
        f'embedding_dim = {c}\ninput = "input"\n',
        f'[[layers]]\nname = "transformer.wpe"\ntype = "positional_embedding"\n'
        f'num_embeddings = {t}\nembedding_dim = {c}\ninput = "input"\n',
        '[[layers]]\nname = "transformer.drop"\ntype = "add"\n'
        'input = ["transformer.wte", "transformer.wpe"]\n',
    ]
    prev = "transformer.drop"
    for i in range(layers):
        p = f"transformer.h.{i}"
        out += [
            f'[[layers]]\nname = "{p}.ln_1"\ntype = "layer_norm"\nnormalized_shape = {c}\n',
            f'[[layers]]\nname = "{p}.attn"\ntype = "causal_self_attention"\nn_embd = {c}\n'
            f"n_head = {heads}\n",
            f'[[layers]]\nname = "{p}.res1"\ntype = "add"\ninput = ["{prev}", "{p}.attn"]\n',
            f'[[layers]]\nname = "{p}.ln_2"\ntype = "layer_norm"\nnormalized_shape = {c}\n',
            f'[[layers]]\nname = "{p}.mlp.c_fc"\ntype = "linear"\nin_features = {c}\n'
            f"out_features = {4 * c}\n",
            '[[layers]]\ntype = "gelu"\n',
            f'[[layers]]\nname = "{p}.mlp.c_proj"\ntype = "linear"\nin_features = {4 * c}\n'
            f"out_features = {c}\n",
            f'[[layers]]\nname = "{p}.res2"\ntype = "add"\ninput = ["{p}.res1", '
            f'"{p}.mlp.c_proj"]\n',
        ]
        prev = f"{p}.res2"
    out += [
        f'[[layers]]\nname = "transformer.ln_f"\ntype = "layer_norm"\nnormalized_shape = {c}\n',
        f'[[layers]]\nname = "lm_head"\ntype = "linear"\nin_features = {c}\n'
        f'out_features = {vocab}\nbias = false\ntied = {{ weight = "transformer.wte.weight" }}\n',
        '[loss]\ntype = "cross_entropy"\n',
        '[data]\ntrain = "train.safetensors"\ntokens = "tokens"\n',
        f"[eval]\nchunk_size = {chunk}\n",
    ]
    return "\n".join(out)


def sdpa_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    B, T, C = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
    k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
    v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
