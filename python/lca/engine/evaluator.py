"""The full-training-set loss and gradient of a PyTorch module at a flat θ.

Semantics are those of lca's built-in engine (src/eval.rs): the set is cut into chunks of
`chunk_size` samples in order (the last one may be shorter: nothing is dropped); each chunk's
summed loss terms and their gradient are added in chunk order in f64; the result is divided by
the number of loss terms (samples, or sample × position for sequences, or elements for MSE).
Dropout is off. Batch norm follows the mode:

- `running-stats`: `model.eval()`, normalising with `running_mean`/`running_var`, which are
  coordinates of θ (they get gradients, like the parameters). PyTorch's native batch norm does
  not differentiate with respect to its running statistics, so every `_BatchNorm` module that
  tracks them computes the eval formula explicitly,
  (x − running_mean) / √(running_var + eps) · weight + bias.
- `batch-stats`: every batch-norm module normalises each chunk with the chunk's own mean and
  biased variance (PyTorch's train-mode batch norm); running statistics are ignored. The chunk
  size is then part of the definition of the loss, and so is the row order: by default the
  rows are evaluated in the order of lca's seeded permutation (`lca._order`,
  `data_order="shuffled"`, `data_seed`), as lca's built-in engine does; `data_order="file"`
  keeps the file's order. Without batch statistics the rows stay in file order.
"""

from __future__ import annotations

import os
import time
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _order
from .loading import Dataset

DTYPES = {"f32": torch.float32, "f64": torch.float64}


class NumericError(Exception):
    """The loss or gradient is not finite (error kind `numeric`)."""


@dataclass
class Coordinate:
    """One tensor of θ: a parameter, or (running-stats mode) a batch-norm running statistic."""

    name: str
    shape: list[int]
    kind: str  # "parameter" or "buffer"
    offset: int  # in elements, within the flat θ
    numel: int


def _explicit_eval_bn(self: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's eval-mode batch norm written out, differentiable in the running statistics."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    assert self.running_mean is not None and self.running_var is not None
    y = (x - self.running_mean.view(shape)) / torch.sqrt(self.running_var.view(shape) + self.eps)
    if self.weight is not None:
        y = y * self.weight.view(shape)
    if self.bias is not None:
        y = y + self.bias.view(shape)
    return y


def set_training(module: nn.Module, training: bool) -> None:
    """`module.train(training)`, also for exported programs' modules, which refuse train() and
    eval() (their graph is fixed in the mode it was exported in)."""
    for m in module.modules():
        m.training = training


def batch_norm_modules(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, _BatchNorm)]


def graph_has_batch_norm(module: nn.Module) -> bool:
    """Whether an exported program's graph calls a batch-norm op."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return False
    return any("batch_norm" in str(node.target) for node in graph.nodes)


def model_output(out: Any) -> torch.Tensor:
    """The logits or predictions of a forward's result: a tensor, the first element of a tuple
    (nanoGPT returns (logits, loss)), or the `logits` of a dict / model-output object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits  # type: ignore[no-any-return]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"the model's forward returned {type(out).__name__}; expected a tensor of logits "
        "(or a tuple whose first element is one, or an object with `.logits`)"
    )


class Evaluator:
    """Loss and gradient of `module` over `data` at flat parameter vectors."""

    def __init__(
        self,
        module: nn.Module,
        data: Dataset,
        *,
        loss: str,
        bn_mode: str | None,
        device: torch.device,
        precision: str,
        chunk_size: int,
        exported: bool,
        data_order: str = "shuffled",
        data_seed: int | None = None,
    ) -> None:
        self.dtype = DTYPES[precision]
        self.device = device
        self.exported = exported
        self.loss = loss
        self.chunk_size = chunk_size
        self.n = data.n
        bns = batch_norm_modules(module)
        has_bn = bool(bns) or (exported and graph_has_batch_norm(module))
        if has_bn and bn_mode is None:
            raise ValueError(
                "the model has batch norm: choose how it normalises with --bn-mode "
                "batch-stats (statistics of each evaluation chunk, as the LCA study) or "
                "running-stats (the running_mean/running_var of θ, as model.eval())"
            )
        self.bn_mode = bn_mode if has_bn else None
        set_training(module, False)
        path_buffers: set[str] = set()
        for name, m in bns:
            if self.bn_mode == "batch-stats":
                set_training(m, True)
            elif m.track_running_stats and m.running_mean is not None:
                m.forward = types.MethodType(_explicit_eval_bn, m)  # type: ignore[method-assign]
                prefix = f"{name}." if name else ""
                path_buffers.add(prefix + "running_mean")
                path_buffers.add(prefix + "running_var")
        if exported and self.bn_mode == "running-stats" and not bns:
            raise ValueError(
                "running-stats batch norm needs gradients with respect to the running "
                "statistics, which an exported program's batch-norm op does not give: pass "
                "the model as a factory (package.module:function or file.py:function)"
            )
        module.to(device=device, dtype=self.dtype)
        for p in module.parameters():
            p.requires_grad_(False)
        self.module = module

        # θ's layout: parameters (tied ones once, under their first name) and, in
        # running-stats mode, the running statistics, in state_dict order.
        self.coords: list[Coordinate] = []
        self.aliases: dict[str, str] = {}
        self.held: list[tuple[str, list[int], str]] = []
        first_name: dict[int, str] = {}
        offset = 0
        for name, t in module.state_dict(keep_vars=True).items():
            if isinstance(t, nn.Parameter):
                if id(t) in first_name:
                    self.aliases[name] = first_name[id(t)]
                    continue
                first_name[id(t)] = name
                kind = "parameter"
            elif name in path_buffers:
                kind = "buffer"
            else:
                self.held.append((name, list(t.shape), str(t.dtype).replace("torch.", "")))
                continue
            if not t.is_floating_point():
                raise ValueError(f"tensor '{name}' of θ is not floating point ({t.dtype})")
            self.coords.append(Coordinate(name, list(t.shape), kind, offset, t.numel()))
            offset += t.numel()
        self.numel = offset

        x = data.x if not data.x.is_floating_point() else data.x.to(self.dtype)
        y = data.y if not data.y.is_floating_point() else data.y.to(self.dtype)
        # The row order of the chunks matters only with batch statistics; there the rows are
        # evaluated in lca's order (`lca._order`: the same permutation as lca's built-in
        # engine), elsewhere in file order.
        self.data_order = data_order if self.bn_mode == "batch-stats" else "file"
        order = _order.row_order(self.n, self.data_order, data_seed)
        self.data_seed: int | None = None
        if order is not None:
            self.data_seed = _order.DEFAULT_SEED if data_seed is None else data_seed
            index = torch.tensor(order, dtype=torch.int64)
            x = x.index_select(0, index)
            y = y.index_select(0, index)
        self.x = x.to(device)
        self.y = y.to(device)
        self.count = self._check_shapes()
        self.fail_oom = os.environ.get("LCA_ENGINE_TEST_OOM") == "1"
        self.delay = float(os.environ.get("LCA_ENGINE_TEST_DELAY_S", "0") or 0)

    def _terms(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The chunk's loss terms, one per sample/position (cross-entropy) or element (MSE)."""
        if self.loss == "cross_entropy":
            k = out.shape[-1]
            return F.cross_entropy(out.reshape(-1, k), y.reshape(-1), reduction="none")
        return (out - y.reshape(out.shape)) ** 2

    def _check_shapes(self) -> int:
        """Run the model on the first samples (its own parameters) to check the output against
        the targets; the number of loss terms over the whole set."""
        m = min(self.n, max(2, min(self.chunk_size, 8)))
        training = [(mod, mod.training) for mod in self.module.modules()]
        set_training(self.module, False)
        try:
            with torch.no_grad():
                out = model_output(self.module(self.x[:m]))
        except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as e:
            if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e):
                raise
            hint = ""
            if self.exported and "Guard failed" in str(e):
                hint = (
                    " (an exported program must be exported with a dynamic batch dimension: "
                    'torch.export.export(model, (x,), dynamic_shapes={"x": {0: Dim("batch")}}))'
                )
            raise ValueError(
                f"the model cannot evaluate the training set's inputs "
                f"{list(self.x.shape[1:])} (dtype {self.x.dtype}) per sample: "
                f"{type(e).__name__}: {e}{hint}"
            ) from e
        finally:
            for mod, tr in training:
                mod.training = tr
        y = self.y[:m]
        if self.loss == "cross_entropy":
            rows = out.numel() // max(out.shape[-1], 1)
            if out.dim() < 2 or rows != y.numel():
                raise ValueError(
                    f"the model gives output {list(out.shape)} for {m} samples, which does not "
                    f"fit class-index targets {list(y.shape)} (one row of logits per target)"
                )
            if int(self.y.max()) >= out.shape[-1]:
                raise ValueError(
                    f"label {int(self.y.max())} is out of range: the model has "
                    f"{out.shape[-1]} classes"
                )
            return int(self.y.numel())
        if out.numel() != y.numel():
            raise ValueError(
                f"MSE targets have {y.numel() // m} values per sample but the model output has "
                f"{out.numel() // m} (shape {list(out.shape[1:])})"
            )
        return int(self.y.numel())

    def probe_chunk_size(self, fraction: float = 0.25) -> int:
        """A chunk size for a CUDA device: one forward and backward of 8 samples (the module's
        own parameters) measures the peak memory per sample; the chunk fills `fraction` of the
        device's total memory (not its free memory: the same model on the same kind of GPU
        always gets the same chunks, so the same bits), a multiple of 64 when above 64."""
        dev = self.device
        k = min(self.n, 8)
        sd = self.module.state_dict()
        leaves = [sd[c.name].detach().clone().requires_grad_(True) for c in self.coords]
        tensors = {c.name: t for c, t in zip(self.coords, leaves)}
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        out = model_output(functional_call(self.module, tensors, (self.x[:k],)))
        terms = self._terms(out, self.y[:k])
        torch.autograd.grad(terms.sum(), leaves, allow_unused=True)
        del out, terms
        torch.cuda.synchronize(dev)
        per = max((torch.cuda.max_memory_allocated(dev) - base) / k, 1.0)
        total = torch.cuda.get_device_properties(dev).total_memory
        c = int(fraction * total / per)
        if c > 64:
            c -= c % 64
        return max(1, min(self.n, c))

    def theta_from_bytes(self, payload: bytearray, dtype: str) -> torch.Tensor:
        flat = torch.frombuffer(payload, dtype=DTYPES[dtype]) if len(payload) else None
        if flat is None:
            flat = torch.zeros(0, dtype=self.dtype)
        return flat.to(device=self.device, dtype=self.dtype)

    def evaluate(self, flat: torch.Tensor, want_grad: bool) -> tuple[float, np.ndarray | None]:
        """Mean loss over the whole set (f64) and its gradient (f64, θ's layout)."""
        if self.fail_oom:
            raise torch.OutOfMemoryError("simulated out of memory (LCA_ENGINE_TEST_OOM=1)")
        if self.delay:
            time.sleep(self.delay)
        flat = flat.detach()
        # One leaf per tensor of θ (views of the flat buffer, no copies): autograd then gives
        # one gradient per tensor, and nothing proportional to θ's size per tensor.
        leaves = [
            flat[c.offset : c.offset + c.numel].view(c.shape).requires_grad_(want_grad)
            for c in self.coords
        ]
        tensors = {c.name: t for c, t in zip(self.coords, leaves)}
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_acc = (
            torch.zeros(self.numel, dtype=torch.float64, device=self.device) if want_grad else None
        )
        ctx = torch.enable_grad() if want_grad else torch.no_grad()
        with ctx:
            for a in range(0, self.n, self.chunk_size):
                b = min(a + self.chunk_size, self.n)
                out = model_output(functional_call(self.module, tensors, (self.x[a:b],)))
                terms = self._terms(out, self.y[a:b])
                loss_acc += terms.detach().to(torch.float64).sum()
                if grad_acc is not None:
                    gs = torch.autograd.grad(terms.sum(), leaves, allow_unused=True)
                    for c, g in zip(self.coords, gs):
                        if g is not None:
                            grad_acc[c.offset : c.offset + c.numel] += g.reshape(-1)
        inv = 1.0 / self.count
        loss = float(loss_acc) * inv
        if not np.isfinite(loss):
            raise NumericError(f"the full-set loss is {loss} (overflow or NaN in the forward pass)")
        if grad_acc is None:
            return loss, None
        grad = (grad_acc * inv).cpu().numpy()
        bad = np.flatnonzero(~np.isfinite(grad))
        if bad.size:
            i = int(bad[0])
            c = next(c for c in self.coords if c.offset <= i < c.offset + c.numel)
            raise NumericError(
                f"the gradient of '{c.name}' is {grad[i]} at flat index {i - c.offset}"
            )
        return loss, grad
