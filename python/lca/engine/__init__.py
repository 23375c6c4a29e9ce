"""lca's PyTorch evaluation engine: a worker process that evaluates the user's own `nn.Module`
(full-training-set loss and gradient at θ) for the `lca` binary, over the binary protocol of
docs/engines.md.

- `lca.engine.protocol`: message framing (standard library only).
- `lca.engine.client`: a Python client that starts and drives a worker (numpy only).
- `lca.engine.worker`: the worker, `python -m lca.engine.worker --model ... --data ...` (torch).

Nothing here is imported by `import lca`, and this module imports no torch.
"""
