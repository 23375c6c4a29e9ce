"""Derive lca's model spec (docs/spec.md) from a PyTorch module by tracing it.

`trace_spec(model, example_input)` traces the module with `torch.fx` (leaf modules are the
`torch.nn` layers and nanoGPT-style attention modules), runs the traced graph on the example
input to learn every intermediate value, and maps each module call and functional call to one of
lca's layer types with the hyperparameters read from the module or the graph. Nothing is
guessed: a call that has no exact equivalent in lca is reported as unsupported, with its
module path and source line, and no spec is produced. The traced graph's output is checked
against the module's own output on the example input.
"""

from __future__ import annotations

import copy
import dis
import inspect
import math
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import _toml

__all__ = ["SpecResult", "UnsupportedOp", "trace_spec", "LOSSES", "BATCH_NORM_MODES"]

LOSSES = ("cross_entropy", "mse")
BATCH_NORM_MODES = ("running-stats", "batch-stats")


@dataclass
class UnsupportedOp:
    """An operation of the model that lca cannot evaluate."""

    op: str
    """What it is: `torch.sin`, `Tensor.mean`, `module RMSNorm`, ..."""
    where: str
    """The module path it belongs to (`""` for the top-level module)."""
    source: str | None
    """`file:line: code` of the call in the model's source, when known."""
    reason: str
    """Why lca cannot evaluate it."""

    def __str__(self) -> str:
        where = f"in `{self.where}`" if self.where else "in the top-level module"
        src = f" ({self.source})" if self.source else ""
        return f"{self.op} {where}{src}: {self.reason}"

    def to_json(self) -> dict[str, str | None]:
        return {"op": self.op, "where": self.where, "source": self.source, "reason": self.reason}


@dataclass
class SpecResult:
    """What tracing found: the spec (or why there is none) and the names of its tensors."""

    layers: list[dict[str, Any]]
    """The `[[layers]]` tables in evaluation order (also when some ops are unsupported)."""
    unsupported: list[UnsupportedOp]
    params: dict[str, str]
    """Spec tensor name (`<layer>.<suffix>`) -> the `state_dict` name lca reads it from."""
    aliases: dict[str, str]
    """Tied weights: a `state_dict` name -> the name of the one tensor it shares (the name lca
    reports it under, which is the name checkpoints store it under)."""
    loss: str
    batch_norm: str | None
    """The `[model] batch_norm` mode when the model has batch norm, else None."""
    chunk_size: int
    input_shape: list[int]
    """Per-sample input shape of the example."""
    data: dict[str, Any] | None = None
    """The `[data]` table written into the spec (set by the Recorder)."""
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unsupported

    @property
    def spec(self) -> str | None:
        """The spec TOML text, or None when the model has an op lca cannot evaluate."""
        if self.unsupported:
            return None
        return self.toml()

    @property
    def message(self) -> str:
        """One line per unsupported op (empty when the spec is complete)."""
        if not self.unsupported:
            return ""
        lines = [f"lca cannot evaluate {len(self.unsupported)} op(s) of this model, so no spec:"]
        lines += [f"  - {u}" for u in self.unsupported]
        return "\n".join(lines)

    def toml(self) -> str:
        """The spec text (the layers found so far even when some ops are unsupported)."""
        parts = ["# Written by lca.trace_spec from the traced module; see docs/spec.md.\n"]
        model: dict[str, Any] = {"prefix": ""}
        if self.batch_norm is not None:
            model["batch_norm"] = self.batch_norm
        parts.append(_toml.table("model", model))
        for layer in self.layers:
            parts.append(_toml.table("layers", layer, array=True))
        parts.append(_toml.table("loss", {"type": self.loss}))
        if self.data is not None:
            parts.append(_toml.table("data", self.data))
        parts.append(_toml.table("eval", {"chunk_size": self.chunk_size}))
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Tracing


def _is_assert(frame: Any) -> bool:
    """Whether `frame` is at the conditional jump of an `assert` statement."""
    insts = list(dis.get_instructions(frame.f_code))
    for i, inst in enumerate(insts):
        if inst.offset == frame.f_lasti or (
            inst.offset > frame.f_lasti and i > 0 and insts[i - 1].offset < frame.f_lasti
        ):
            break
    else:
        return False
    # The jump comes at or right after f_lasti (3.11+ points at the last executed instruction).
    for j in range(i, min(i + 4, len(insts))):
        if "JUMP" in insts[j].opname and "IF_TRUE" in insts[j].opname:
            nxt = insts[j + 1] if j + 1 < len(insts) else None
            return nxt is not None and (
                nxt.opname == "LOAD_ASSERTION_ERROR"
                or (nxt.opname == "LOAD_GLOBAL" and nxt.argval == "AssertionError")
            )
    return False


def _attention_heads_attr(mod: nn.Module) -> int | None:
    for name in ("n_head", "num_heads", "n_heads"):
        v = getattr(mod, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _looks_like_causal_attention(mod: nn.Module) -> bool:
    """nanoGPT's CausalSelfAttention structure: `c_attn` Linear(C, 3C), `c_proj` Linear(C, C)."""
    ca, cp = getattr(mod, "c_attn", None), getattr(mod, "c_proj", None)
    if not isinstance(ca, nn.Linear) or not isinstance(cp, nn.Linear):
        return False
    c = ca.in_features
    return ca.out_features == 3 * c and cp.in_features == c and cp.out_features == c


class _Tracer(fx.Tracer):
    """fx tracer: torch.nn layers and attention modules are leaves; asserts are skipped."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if _looks_like_causal_attention(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        # `assert t <= block_size` (nanoGPT) is a check on the traced sizes, not control flow:
        # the example run checks it, so tracing goes on as if it held.
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame and frame.f_back else None  # type: ignore[union-attr]
        if caller is not None and _is_assert(caller):
            return True
        return super().to_bool(obj)


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        self.values[n] = v
        return v


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    sig = inspect.signature(model.forward)
    concrete: dict[str, Any] = {}
    for i, (name, p) in enumerate(sig.parameters.items()):
        if i > 0 and p.default is not inspect.Parameter.empty:
            concrete[name] = p.default  # e.g. nanoGPT's `targets=None`
    graph = tracer.trace(model, concrete_args=concrete or None)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# ---------------------------------------------------------------------------------------------
# Mapping


def _pair(v: Any) -> Any:
    """An int or a list of two ints, as the spec writes sizes."""
    if isinstance(v, (tuple, list)):
        vals = [int(x) for x in v]
        if len(vals) == 2 and vals[0] == vals[1]:
            return vals[0]
        return vals
    return int(v)


def _fn_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    if mod.startswith("torch.nn.functional"):
        return f"torch.nn.functional.{name}"
    if mod in ("_operator", "operator"):
        return f"operator.{name}"
    if mod.startswith("torch"):
        return f"torch.{name}"
    return f"{mod}.{name}" if mod else name


_RELU = {F.relu, torch.relu, "relu", "relu_"}
_TANH = {torch.tanh, F.tanh, "tanh"}
_SIGMOID = {torch.sigmoid, F.sigmoid, "sigmoid"}
_GELU = {F.gelu}
_LEAKY = {F.leaky_relu}
_DROPOUT = {F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout}
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__iadd__"}
_FLATTEN = {torch.flatten, "flatten"}
_RESHAPE = {"view", "reshape", torch.reshape}
_MEAN = {torch.mean, "mean"}
_SHAPE_FUNCS = {operator.getitem, getattr, "size", "dim"}

_SIMPLE_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.Tanh: "tanh",
    nn.Sigmoid: "sigmoid",
}
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


_POISON = "<unsupported "


class _Mapper:
    def __init__(self, model: nn.Module, gm: fx.GraphModule, values: dict[fx.Node, Any]) -> None:
        self.model = model
        self.gm = gm
        self.values = values
        self.layers: list[dict[str, Any]] = []
        self.names: set[str] = {"input"}
        self.ref: dict[fx.Node, str] = {}  # tensor node -> layer name (or "input")
        self.kind: dict[str, str] = {"input": "input"}  # layer name -> type
        self.unsupported: list[UnsupportedOp] = []
        self.params: dict[str, str] = {}
        self.owner: dict[int, str] = {}  # id(Parameter) -> the state_dict name that owns it
        self.aliases: dict[str, str] = {}
        self.has_bn = False
        self.notes: list[str] = []
        self.param_names: dict[int, list[str]] = {}
        for name, p in model.state_dict(keep_vars=True).items():
            self.param_names.setdefault(id(p), []).append(name)

    # -- helpers ---------------------------------------------------------------------------

    def where(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            last = list(stack.values())[-1]
            path = last[0] if isinstance(last, tuple) else str(last)
            return str(path)
        return ""

    def source(self, n: fx.Node) -> str | None:
        st = n.meta.get("stack_trace")
        if not st:
            return None
        lines = [ln.strip() for ln in str(st).strip().splitlines() if ln.strip()]
        torch_dir = str(Path(torch.__file__).parent)
        # The last "File ..., line ..., in ..." entry outside torch, and its code line.
        for i in range(len(lines) - 1, -1, -1):
            if lines[i].startswith("File "):
                parts = lines[i].split(",")
                file = parts[0][len("File ") :].strip().strip('"')
                if file.startswith(torch_dir):
                    continue
                line = parts[1].strip().replace("line ", "") if len(parts) > 1 else "?"
                code = lines[i + 1] if i + 1 < len(lines) else ""
                return f"{file}:{line}: {code}"
        return None

    def bad(self, n: fx.Node, op: str, reason: str) -> None:
        self.unsupported.append(UnsupportedOp(op, self.where(n), self.source(n), reason))
        if n.op != "output" and n not in self.ref:
            # What follows still maps (so each unsupported op is reported once, not again as
            # a missing input downstream); the spec is withheld anyway.
            self.ref[n] = f"{_POISON}{n.name}>"
            self.kind[self.ref[n]] = "unsupported"

    def unique(self, base: str) -> str:
        name = base
        i = 1
        while name in self.names:
            name = f"{base}_{i}"
            i += 1
        self.names.add(name)
        return name

    def fname(self, n: fx.Node) -> str:
        scope = self.where(n)
        return self.unique(f"{scope}.{n.name}" if scope else n.name)

    def is_tensor(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and isinstance(self.values.get(n), torch.Tensor)

    def tensor_inputs(self, n: fx.Node) -> list[fx.Node]:
        return [a for a in n.all_input_nodes if a in self.ref]

    def emit(self, n: fx.Node, name: str, ltype: str, inputs: list[str], **keys: Any) -> None:
        layer: dict[str, Any] = {"name": name, "type": ltype}
        prev = self.layers[-1]["name"] if self.layers else "input"
        if len(inputs) == 1:
            if inputs[0] != prev:
                layer["input"] = inputs[0]
        else:
            layer["input"] = inputs
        layer.update({k: v for k, v in keys.items() if v is not None})
        self.layers.append(layer)
        self.kind[name] = ltype
        self.ref[n] = name

    def own_params(
        self, layer: str, mod: nn.Module, suffixes: list[str], sub: str = ""
    ) -> dict[str, str]:
        """Record the layer's tensors; returns `tied` entries for ones already owned."""
        tied: dict[str, str] = {}
        for s in suffixes:
            p = getattr(mod, s, None)
            if p is None:
                continue
            key = f"{sub}{s}"
            if id(p) in self.owner:
                tied[key] = self.owner[id(p)]
                self.params[f"{layer}.{key}"] = self.owner[id(p)]
                continue
            own = f"{layer}.{key}"
            if own not in self.param_names.get(id(p), []):
                # A repeated call of a module: this layer's name is not a state_dict name.
                own = self.param_names.get(id(p), [own])[0]
                tied[key] = own
            self.owner[id(p)] = own
            self.params[f"{layer}.{key}"] = own
            for other in self.param_names.get(id(p), []):
                if other != own:
                    self.aliases[other] = own
        return tied

    def shape(self, n: fx.Node) -> tuple[int, ...]:
        return tuple(self.values[n].shape)

    # -- the walk --------------------------------------------------------------------------

    def run(self) -> None:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            if i == 0:
                self.ref[n] = "input"
            elif isinstance(self.values.get(n), torch.Tensor):
                self.bad(n, f"input `{n.target}`", "lca models take one input tensor")
        for n in self.gm.graph.nodes:
            if n.op in ("placeholder", "get_attr"):
                continue
            if n.op == "output":
                self.output(n)
                continue
            ins = self.tensor_inputs(n)
            poisoned = [a for a in ins if self.ref[a].startswith(_POISON)]
            if poisoned:
                self.ref[n] = self.ref[poisoned[0]]  # downstream of an unsupported op
                continue
            if n.op == "call_module" and self.is_tensor(n):
                mod = self.gm.get_submodule(str(n.target))
                first = n.args[0] if n.args else None
                if (
                    isinstance(mod, nn.Embedding)
                    and isinstance(first, fx.Node)
                    and first.op == "call_function"
                    and first.target is torch.arange
                ):
                    self.embedding(n, self.unique(str(n.target)), mod, first)
                    continue
            if not ins:
                continue  # a constant, or a size computation: no layer
            if not self.is_tensor(n):
                if n.target in _SHAPE_FUNCS or n.target in ("size", "dim") or n.target is getattr:
                    continue  # x.size(1), x.shape: sizes are read from the graph values
                self.bad(n, _fn_name(n.target), "gives a non-tensor value lca cannot represent")
                continue
            if n.op == "call_module":
                self.module(n, self.gm.get_submodule(str(n.target)), ins)
            else:
                self.function(n, ins)

    def output(self, n: fx.Node) -> None:
        out = n.args[0]
        if not self.is_tensor(out):
            self.bad(
                n,
                "output",
                f"the model returns {type(self.values.get(out, out)).__name__}; lca's loss "
                "reads one tensor of logits (or predictions)",
            )
            return
        if out not in self.ref:
            self.bad(n, "output", "the model's output does not depend on its input")
            return
        name = self.ref[out]
        if name.startswith(_POISON):
            return
        if not self.layers or self.layers[-1]["name"] != name:
            self.emit(n, self.unique("output"), "identity", [name])

    # -- modules ---------------------------------------------------------------------------

    def module(self, n: fx.Node, mod: nn.Module, ins: list[fx.Node]) -> None:
        path = str(n.target)
        first = ins[0]
        src = self.ref[first]
        if len(ins) > 1 and not isinstance(mod, nn.MultiheadAttention):
            self.bad(n, f"module {type(mod).__name__}", "called with several tensor inputs")
            return
        if isinstance(mod, _DROPOUT_MODULES) or isinstance(mod, nn.Identity):
            self.ref[n] = src  # dropout is the identity in evaluation
            return
        name = self.unique(path)
        t = type(mod)
        if t in _SIMPLE_MODULES:
            self.emit(n, name, _SIMPLE_MODULES[t], [src])
        elif t is nn.GELU:
            self.emit(n, name, "gelu", [src], approximate=mod.approximate)
        elif t is nn.LeakyReLU:
            self.emit(n, name, "leaky_relu", [src], negative_slope=float(mod.negative_slope))
        elif t is nn.Flatten:
            self.flatten(n, name, src, int(mod.start_dim), int(mod.end_dim))
        elif t is nn.Linear:
            tied = self.own_params(name, mod, ["weight", "bias"])
            self.emit(
                n,
                name,
                "linear",
                [src],
                in_features=mod.in_features,
                out_features=mod.out_features,
                bias=mod.bias is not None,
                tied=tied or None,
            )
        elif t is nn.Conv2d:
            if mod.padding_mode != "zeros":
                self.bad(n, "module Conv2d", f"padding_mode = {mod.padding_mode!r} (only zeros)")
                return
            pad = mod.padding if isinstance(mod.padding, str) else _pair(mod.padding)
            tied = self.own_params(name, mod, ["weight", "bias"])
            self.emit(
                n,
                name,
                "conv2d",
                [src],
                in_channels=mod.in_channels,
                out_channels=mod.out_channels,
                kernel_size=_pair(mod.kernel_size),
                stride=_pair(mod.stride),
                padding=pad,
                dilation=_pair(mod.dilation),
                groups=mod.groups,
                bias=mod.bias is not None,
                tied=tied or None,
            )
        elif t is nn.MaxPool2d:
            if mod.ceil_mode or mod.return_indices:
                self.bad(n, "module MaxPool2d", "ceil_mode/return_indices are not supported")
                return
            self.emit(
                n,
                name,
                "max_pool2d",
                [src],
                kernel_size=_pair(mod.kernel_size),
                stride=_pair(mod.stride if mod.stride is not None else mod.kernel_size),
                padding=_pair(mod.padding),
                dilation=_pair(mod.dilation),
            )
        elif t is nn.AvgPool2d:
            if mod.ceil_mode:
                self.bad(n, "module AvgPool2d", "ceil_mode = True is not supported")
                return
            self.emit(
                n,
                name,
                "avg_pool2d",
                [src],
                kernel_size=_pair(mod.kernel_size),
                stride=_pair(mod.stride if mod.stride is not None else mod.kernel_size),
                padding=_pair(mod.padding),
                count_include_pad=bool(mod.count_include_pad),
                divisor_override=mod.divisor_override,
            )
        elif t is nn.AdaptiveAvgPool2d:
            out = self.shape(n)
            if len(out) != 4:
                self.bad(n, "module AdaptiveAvgPool2d", "needs [N, C, H, W] inputs")
                return
            self.emit(n, name, "adaptive_avg_pool2d", [src], output_size=[out[2], out[3]])
        elif t in (nn.BatchNorm1d, nn.BatchNorm2d):
            self.has_bn = True
            tied = self.own_params(name, mod, ["weight", "bias"])
            self.emit(
                n,
                name,
                "batch_norm1d" if t is nn.BatchNorm1d else "batch_norm2d",
                [src],
                num_features=mod.num_features,
                eps=float(mod.eps),
                affine=bool(mod.affine),
                track_running_stats=bool(mod.track_running_stats),
                tied=tied or None,
            )
            if mod.track_running_stats:
                for b in ("running_mean", "running_var"):
                    self.params[f"{name}.{b}"] = f"{path}.{b}"
        elif t is nn.LayerNorm:
            if len(mod.normalized_shape) != 1:
                self.bad(
                    n,
                    "module LayerNorm",
                    f"normalized_shape = {tuple(mod.normalized_shape)}: lca normalises the "
                    "last axis only",
                )
                return
            tied = self.own_params(name, mod, ["weight", "bias"])
            self.emit(
                n,
                name,
                "layer_norm",
                [src],
                normalized_shape=int(mod.normalized_shape[0]),
                eps=float(mod.eps),
                elementwise_affine=bool(mod.elementwise_affine),
                bias=mod.bias is not None if mod.elementwise_affine else None,
                tied=tied or None,
            )
        elif t is nn.Embedding:
            self.embedding(n, name, mod, first)
        elif _looks_like_causal_attention(mod):
            self.attention(n, name, mod, first)
        else:
            self.bad(
                n,
                f"module {type(mod).__module__}.{type(mod).__name__}",
                "no lca layer type computes it (docs/spec.md lists the supported layers)",
            )

    def embedding(self, n: fx.Node, name: str, mod: nn.Embedding, first: fx.Node) -> None:
        if mod.max_norm is not None:
            self.bad(n, "module Embedding", "max_norm is not supported")
            return
        idx = self.values[first]
        if first.op == "call_function" and first.target is torch.arange:
            # wpe(torch.arange(0, t)): a learned position table read for positions 0..T-1.
            tlen = int(idx.numel())
            if idx.dim() != 1 or not torch.equal(idx.cpu(), torch.arange(tlen)):
                self.bad(n, "module Embedding", "positions other than arange(0, T)")
                return
            token = self.token_source(first, tlen)
            if token is None:
                self.bad(n, "module Embedding", "positions whose length is not the input's length")
                return
            tied = self.own_params(name, mod, ["weight"])
            self.emit(
                n,
                name,
                "positional_embedding",
                [token],
                num_embeddings=mod.num_embeddings,
                embedding_dim=mod.embedding_dim,
                tied=tied or None,
            )
            return
        if idx.dtype.is_floating_point:
            self.bad(n, "module Embedding", "float indices")
            return
        src = self.ref[first]
        tied = self.own_params(name, mod, ["weight"])
        self.emit(
            n,
            name,
            "embedding",
            [src],
            num_embeddings=mod.num_embeddings,
            embedding_dim=mod.embedding_dim,
            padding_idx=mod.padding_idx,
            tied=tied or None,
        )

    def token_source(self, arange: fx.Node, tlen: int) -> str | None:
        """The layer whose axis 1 gave the length of `arange` (through size()/shape reads)."""
        stack = list(arange.all_input_nodes)
        seen: set[fx.Node] = set()
        while stack:
            a = stack.pop()
            if a in seen:
                continue
            seen.add(a)
            if a in self.ref:
                v = self.values[a]
                if v.dim() >= 2 and v.shape[1] == tlen:
                    return self.ref[a]
                continue
            stack.extend(a.all_input_nodes)
        return None

    def attention(self, n: fx.Node, name: str, mod: nn.Module, first: fx.Node) -> None:
        c = mod.c_attn.in_features
        x = self.values[first]
        bias = mod.c_attn.bias is not None
        if bias != (mod.c_proj.bias is not None):
            self.bad(n, f"module {type(mod).__name__}", "c_attn and c_proj differ in bias")
            return
        if x.dim() != 3:
            self.bad(n, f"module {type(mod).__name__}", "attention needs [N, T, C] inputs")
            return
        declared = _attention_heads_attr(mod)
        candidates = [declared] if declared else [h for h in range(1, c + 1) if c % h == 0]
        heads = [h for h in candidates if _attention_matches(mod, x, h)]
        if len(heads) != 1:
            what = (
                f"its n_head = {declared}" if declared else "any head count (no `n_head` attribute)"
            )
            self.bad(
                n,
                f"module {type(mod).__name__}",
                f"looks like nanoGPT's CausalSelfAttention (c_attn, c_proj) but does not compute "
                f"causal self-attention with {what}",
            )
            return
        tied = self.own_params(name, mod.c_attn, ["weight", "bias"], sub="c_attn.")
        tied.update(self.own_params(name, mod.c_proj, ["weight", "bias"], sub="c_proj."))
        if tied:
            self.bad(n, f"module {type(mod).__name__}", "attention weights shared with a layer")
            return
        self.emit(n, name, "causal_self_attention", [self.ref[first]], n_embd=c, n_head=heads[0])
        self.layers[-1]["bias"] = bias

    # -- functions -------------------------------------------------------------------------

    def arg(self, n: fx.Node, i: int, kw: str, default: Any) -> Any:
        if len(n.args) > i:
            v = n.args[i]
        else:
            v = n.kwargs.get(kw, default)
        if isinstance(v, fx.Node):
            return self.values[v]
        if isinstance(v, (list, tuple)):
            return type(v)(self.values[x] if isinstance(x, fx.Node) else x for x in v)
        return v

    def function(self, n: fx.Node, ins: list[fx.Node]) -> None:
        tgt = n.target
        op = _fn_name(tgt)
        first = n.args[0] if n.args else None
        if tgt in _ADD:
            self.add(n, op)
            return
        if not isinstance(first, fx.Node) or first not in self.ref or len(ins) != 1:
            if tgt is F.layer_norm and isinstance(first, fx.Node) and first in self.ref:
                self.layer_norm(n)
                return
            self.bad(n, op, "no lca layer type computes it with these inputs")
            return
        src = self.ref[first]
        if tgt in _DROPOUT or tgt in _IDENTITY_METHODS:
            self.ref[n] = src
        elif tgt in _RELU:
            self.emit(n, self.fname(n), "relu", [src])
        elif tgt in _TANH:
            self.emit(n, self.fname(n), "tanh", [src])
        elif tgt in _SIGMOID:
            self.emit(n, self.fname(n), "sigmoid", [src])
        elif tgt in _GELU:
            self.emit(
                n, self.fname(n), "gelu", [src], approximate=self.arg(n, 1, "approximate", "none")
            )
        elif tgt in _LEAKY:
            slope = float(self.arg(n, 1, "negative_slope", 0.01))
            self.emit(n, self.fname(n), "leaky_relu", [src], negative_slope=slope)
        elif tgt in _FLATTEN:
            start = self.arg(n, 1, "start_dim", 0 if tgt is torch.flatten else 0)
            end = self.arg(n, 2, "end_dim", -1)
            self.flatten(n, self.fname(n), src, int(start), int(end))
        elif tgt in _RESHAPE:
            self.reshape(n, src, op)
        elif tgt in _MEAN:
            self.mean(n, src, op)
        elif tgt is F.layer_norm:
            self.layer_norm(n)
        elif tgt in (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d):
            self.pool(n, src, op)
        else:
            self.bad(n, op, "no lca layer type computes it")

    def add(self, n: fx.Node, op: str) -> None:
        if n.kwargs.get("alpha", 1) != 1:
            self.bad(n, op, "add with alpha")
            return
        args = [a for a in n.args if not (isinstance(a, (int, float)) and a == 0)]
        if len(args) != 2 or not all(isinstance(a, fx.Node) and a in self.ref for a in args):
            self.bad(n, op, "adds something that is not the output of a layer (a constant?)")
            return
        out = self.shape(n)
        shapes = [self.shape(a) for a in args]
        kinds = [self.kind[self.ref[a]] for a in args]
        for s, k in zip(shapes, kinds):
            if s != out and not (k == "positional_embedding" and s == out[1:]):
                self.bad(n, op, f"broadcasting add of shapes {shapes[0]} and {shapes[1]}")
                return
        self.emit(n, self.fname(n), "add", [self.ref[a] for a in args])

    def flatten(self, n: fx.Node, name: str, src: str, start: int, end: int) -> None:
        ndim = self.values[n.args[0] if n.args else n].dim() if n.op != "call_module" else None
        if ndim is None:
            inp = n.args[0]
            ndim = self.values[inp].dim() if isinstance(inp, fx.Node) else 2
        if start < 0:
            start += ndim
        if start == 0:
            self.bad(n, _fn_name(n.target), "flattening the batch axis (start_dim = 0)")
            return
        self.emit(n, name, "flatten", [src], start_dim=start, end_dim=end)

    def reshape(self, n: fx.Node, src: str, op: str) -> None:
        inp = self.values[n.args[0]]
        out = self.values[n]
        if tuple(out.shape) == tuple(inp.shape):
            self.ref[n] = src
            return
        if out.dim() == 2 and out.shape[0] == inp.shape[0] and inp.dim() > 2:
            self.emit(n, self.fname(n), "flatten", [src], start_dim=1, end_dim=-1)
            return
        self.bad(
            n, op, f"reshape {tuple(inp.shape)} -> {tuple(out.shape)} (lca has flatten(1) only)"
        )

    def mean(self, n: fx.Node, src: str, op: str) -> None:
        inp = self.values[n.args[0]]
        dim = self.arg(n, 1, "dim", None)
        keep = bool(self.arg(n, 2, "keepdim", False))
        dims = sorted(d % inp.dim() for d in ((dim,) if isinstance(dim, int) else dim or ()))
        if inp.dim() == 4 and dims == [2, 3] and not keep:
            self.emit(n, self.fname(n), "global_avg_pool", [src])
            return
        self.bad(n, op, f"mean over dims {dim} (lca has the spatial mean of [N, C, H, W] only)")

    def pool(self, n: fx.Node, src: str, op: str) -> None:
        name = self.fname(n)
        if n.target is F.adaptive_avg_pool2d:
            out = self.shape(n)
            self.emit(n, name, "adaptive_avg_pool2d", [src], output_size=[out[2], out[3]])
            return
        k = self.arg(n, 1, "kernel_size", None)
        stride = self.arg(n, 2, "stride", None) or k
        pad = self.arg(n, 3, "padding", 0)
        if n.target is F.max_pool2d:
            dil = self.arg(n, 4, "dilation", 1)
            if self.arg(n, 5, "ceil_mode", False) or self.arg(n, 6, "return_indices", False):
                self.bad(n, op, "ceil_mode/return_indices are not supported")
                return
            self.emit(
                n,
                name,
                "max_pool2d",
                [src],
                kernel_size=_pair(k),
                stride=_pair(stride),
                padding=_pair(pad),
                dilation=_pair(dil),
            )
        else:
            if self.arg(n, 4, "ceil_mode", False):
                self.bad(n, op, "ceil_mode = True is not supported")
                return
            self.emit(
                n,
                name,
                "avg_pool2d",
                [src],
                kernel_size=_pair(k),
                stride=_pair(stride),
                padding=_pair(pad),
                count_include_pad=bool(self.arg(n, 5, "count_include_pad", True)),
                divisor_override=self.arg(n, 6, "divisor_override", None),
            )

    def layer_norm(self, n: fx.Node) -> None:
        """F.layer_norm(x, shape, weight, bias, eps) with the weights of one module (nanoGPT)."""
        op = "torch.nn.functional.layer_norm"
        first = n.args[0]
        shape = self.arg(n, 1, "normalized_shape", None)
        w_node = n.args[2] if len(n.args) > 2 else n.kwargs.get("weight")
        b_node = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
        eps = float(self.arg(n, 4, "eps", 1e-5))
        shape = [int(s) for s in (shape if isinstance(shape, (list, tuple)) else [shape])]
        if len(shape) != 1:
            self.bad(n, op, f"normalized_shape = {shape}: lca normalises the last axis only")
            return
        names = []
        for node in (w_node, b_node):
            if node is None:
                names.append(None)
            elif isinstance(node, fx.Node) and node.op == "get_attr":
                names.append(str(node.target))
            else:
                self.bad(n, op, "weight/bias that are not parameters of a module")
                return
        w, b = names
        if w is None:
            self.bad(n, op, "layer norm without a weight (elementwise_affine = False) via F")
            return
        owner = w.rsplit(".", 1)[0] if "." in w else ""
        if not w.endswith(".weight") or (b is not None and b != f"{owner}.bias") or not owner:
            self.bad(n, op, f"weight `{w}` and bias `{b}` are not `<module>.weight/.bias`")
            return
        mod = self.gm.get_submodule(owner)
        name = self.unique(owner)
        tied = self.own_params(name, mod, ["weight"] + (["bias"] if b else []))
        self.emit(
            n,
            name,
            "layer_norm",
            [self.ref[first]],
            normalized_shape=shape[0],
            eps=eps,
            bias=b is not None,
            tied=tied or None,
        )


def _attention_matches(mod: nn.Module, x: torch.Tensor, heads: int) -> bool:
    """Whether `mod` computes nanoGPT's causal self-attention with `heads` heads.

    Checked on a copy whose projections get large random weights (at initialisation attention
    is nearly uniform, and every head count gives almost the same output)."""
    probe = copy.deepcopy(mod).double().eval()
    gen = torch.Generator().manual_seed(1234)
    c = probe.c_attn.in_features
    with torch.no_grad():
        for lin in (probe.c_attn, probe.c_proj):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen, dtype=torch.float64))
            if lin.bias is not None:
                lin.bias.copy_(torch.randn(lin.bias.shape, generator=gen, dtype=torch.float64))
        t = min(int(x.shape[1]), 16)
        xi = torch.randn(2, t, c, generator=gen, dtype=torch.float64).to(
            next(probe.parameters()).device
        )
        try:
            got = probe(xi)
        except Exception:
            return False
        if not isinstance(got, torch.Tensor) or got.shape != xi.shape:
            return False
        q, k, v = probe.c_attn(xi).split(c, dim=2)
        d = c // heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(2, t, heads, d).transpose(1, 2)

        att = (split(q) @ split(k).transpose(-2, -1)) / math.sqrt(d)
        mask = torch.ones(t, t, dtype=torch.bool, device=xi.device).tril()
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        ref = probe.c_proj((att @ split(v)).transpose(1, 2).reshape(2, t, c))
        scale = float(ref.abs().max()) + 1e-12
        return float((got - ref).abs().max()) <= 1e-9 * scale * c


# ---------------------------------------------------------------------------------------------


def trace_spec(
    model: nn.Module,
    example_input: torch.Tensor,
    loss: str = "cross_entropy",
    batch_norm: str = "running-stats",
    chunk_size: int = 256,
    data: Mapping[str, Any] | None = None,
) -> SpecResult:
    """Trace `model` on `example_input` (a batch, `[n, ...]`) into lca's model spec.

    `loss` is `"cross_entropy"` or `"mse"`; `batch_norm` the `[model] batch_norm` mode written
    when the model has batch norm (`"running-stats"` is PyTorch's `model.eval()`); `data` the
    `[data]` table to write (optional). Returns a `SpecResult`: `.spec` is the TOML text, or
    None when some op has no lca equivalent (then `.unsupported` lists each one with its module
    path and source line, and `.message` says so in words).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if batch_norm not in BATCH_NORM_MODES:
        raise ValueError(f"batch_norm must be one of {', '.join(BATCH_NORM_MODES)}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError("example_input must be one tensor (a batch of inputs)")
    result = SpecResult(
        layers=[],
        unsupported=[],
        params={},
        aliases={},
        loss=loss,
        batch_norm=None,
        chunk_size=chunk_size,
        input_shape=list(example_input.shape[1:]),
        data=dict(data) if data is not None else None,
    )
    was_training = model.training
    model.eval()
    try:
        try:
            gm = _trace(model)
        except Exception as e:  # fx cannot trace it (data-dependent control flow, ...)
            result.unsupported.append(
                UnsupportedOp(
                    "torch.fx.symbolic_trace",
                    "",
                    None,
                    f"the module could not be traced: {type(e).__name__}: {e}",
                )
            )
            return result
        with torch.no_grad():
            rec = _Recorder(gm)
            traced_out = rec.run(example_input)
            real_out = model(example_input)
        mapper = _Mapper(model, gm, rec.values)
        mapper.run()
        if (
            isinstance(traced_out, torch.Tensor)
            and isinstance(real_out, torch.Tensor)
            and (
                traced_out.shape != real_out.shape
                or not torch.allclose(traced_out, real_out, rtol=1e-5, atol=1e-6)
            )
        ):
            mapper.unsupported.append(
                UnsupportedOp(
                    "torch.fx trace",
                    "",
                    None,
                    "the traced graph does not compute what the module computes on the "
                    "example input (data-dependent Python control flow?)",
                )
            )
        result.layers = mapper.layers
        result.unsupported = mapper.unsupported
        result.params = mapper.params
        result.aliases = mapper.aliases
        result.batch_norm = batch_norm if mapper.has_bn else None
        result.notes = mapper.notes
        if loss == "cross_entropy" and isinstance(real_out, torch.Tensor):
            if real_out.dim() not in (2, 3):
                result.unsupported.append(
                    UnsupportedOp(
                        "loss",
                        "",
                        None,
                        f"cross_entropy needs logits [N, classes] or [N, T, vocab], the model "
                        f"gives {list(real_out.shape)}",
                    )
                )
        return result
    finally:
        model.train(was_training)
