"""What the worker evaluates: the model (a factory, a file, a Recorder run, an exported program),
the training set with lca's preprocessing, the loss and the batch-norm mode.

Imports torch; used by the worker only.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

LOSSES = ("cross_entropy", "mse")
BN_MODES = ("running-stats", "batch-stats")


class ConfigError(Exception):
    """A bad model reference, data file, spec key or option (error kind `config_error`)."""


class ModelImportError(Exception):
    """The model's module, file or factory cannot be imported or called (kind `import_error`)."""


@dataclass
class DataConfig:
    """Where the training set is and how lca preprocesses it (the spec's `[data]` keys)."""

    train: Path | None = None
    x: str = "x"
    y: str = "y"
    tokens: str | None = None
    scale: float | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    input_shape: list[int] | None = None


@dataclass
class ModelRef:
    """A model: `factory` ("pkg.module:fn" or "path/file.py:fn") with its arguments, and/or
    `exported` (a torch.export program saved with torch.export.save)."""

    factory: str | None = None
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    exported: Path | None = None
    sys_path: list[str] = field(default_factory=list)
    base: Path = field(default_factory=Path.cwd)

    def describe(self) -> str:
        if self.factory:
            return self.factory
        return str(self.exported)


@dataclass
class RunConfig:
    """Everything a worker needs besides the device and precision."""

    model: ModelRef
    data: DataConfig
    loss: str | None = None
    bn_mode: str | None = None
    chunk_size: int | None = None


def _as_floats(v: Any, key: str) -> list[float] | None:
    if v is None:
        return None
    if isinstance(v, (int, float)):
        return [float(v)]
    if isinstance(v, list) and all(isinstance(e, (int, float)) for e in v):
        return [float(e) for e in v]
    raise ConfigError(f"`data.{key}` must be a number or an array of numbers, found {v!r}")


def _data_from_table(t: dict[str, Any], base: Path, into: DataConfig, where: str) -> None:
    known = {"train", "path", "file", "x", "y", "tokens", "scale", "mean", "std", "validation"}
    known |= {"input_shape", "n_samples", "sha256", "format", "dtype", "shape", "shapes"}
    # What lca.Recorder writes about the stored tensors (docs/recorder.md), informative only.
    known |= {"samples", "x_shape", "x_dtype", "y_shape", "y_dtype"}
    for k in t:
        if k not in known:
            raise ConfigError(f"{where}: unknown data key `{k}`")
    for k in ("train", "path", "file"):
        if isinstance(t.get(k), str):
            into.train = (base / t[k]).resolve()
            break
    for k in ("x", "y"):
        if isinstance(t.get(k), str):
            setattr(into, k, t[k])
    if isinstance(t.get("tokens"), str):
        into.tokens = t["tokens"]
    if t.get("scale") is not None:
        if not isinstance(t["scale"], (int, float)):
            raise ConfigError(f"{where}: `data.scale` must be a number")
        into.scale = float(t["scale"])
    if t.get("mean") is not None:
        into.mean = _as_floats(t["mean"], "mean")
    if t.get("std") is not None:
        into.std = _as_floats(t["std"], "std")
    if t.get("input_shape") is not None:
        into.input_shape = [int(v) for v in t["input_shape"]]


def read_spec(path: Path, cfg: RunConfig) -> None:
    """Take the data, loss, batch-norm and chunk keys of an lca spec (model.toml); the layers
    are not needed (the model is the PyTorch module)."""
    try:
        import tomllib  # type: ignore[import-not-found]
    except ImportError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[import-not-found,no-redef]
    try:
        spec = tomllib.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the spec: {e}") from e
    base = path.resolve().parent
    if isinstance(spec.get("data"), dict):
        _data_from_table(spec["data"], base, cfg.data, str(path))
    model = spec.get("model") or {}
    if model.get("input_shape") is not None:
        cfg.data.input_shape = [int(v) for v in model["input_shape"]]
    if model.get("batch_norm") is not None:
        cfg.bn_mode = str(model["batch_norm"])
    loss = spec.get("loss") or {}
    if loss.get("type") is not None:
        cfg.loss = str(loss["type"])
    ev = spec.get("eval") or {}
    if ev.get("chunk_size") is not None:
        cfg.chunk_size = int(ev["chunk_size"])


def read_run(path: Path) -> RunConfig:
    """A Recorder run (`lca-run.json`): the model reference, the data, the loss, the batch-norm
    mode and the chunk size. Keys are described in docs/engines.md."""
    try:
        run = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the run file: {e}") from e
    if not isinstance(run, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    base = path.resolve().parent
    m = run.get("model") if isinstance(run.get("model"), dict) else run
    ref = ModelRef(base=base)
    if isinstance(m.get("factory"), str):
        ref.factory = m["factory"]
        ref.args = list(m.get("args") or [])
        ref.kwargs = dict(m.get("kwargs") or {})
    if isinstance(m.get("exported"), str):
        ref.exported = (base / m["exported"]).resolve()
    for k in ("sys_path", "python_path"):
        if isinstance(m.get(k), list):
            ref.sys_path = [str((base / p).resolve()) for p in m[k]]
    if ref.factory is None and ref.exported is None:
        raise ConfigError(
            f"{path}: the run names no model: expected `model.factory` "
            '("package.module:function" with `args`/`kwargs`) or `model.exported` (a .pt2 file)'
        )
    cfg = RunConfig(model=ref, data=DataConfig())
    data = run.get("data")
    if isinstance(data, str):
        cfg.data.train = (base / data).resolve()
    elif isinstance(data, dict):
        _data_from_table(data, base, cfg.data, str(path))
    loss = run.get("loss")
    if isinstance(loss, dict):
        loss = loss.get("type") or loss.get("name")
    if isinstance(loss, str):
        cfg.loss = loss
    bn = run.get("batch_norm", m.get("batch_norm"))
    if isinstance(bn, str):
        cfg.bn_mode = bn
    ev = run.get("eval") if isinstance(run.get("eval"), dict) else {}
    chunk = run.get("chunk_size", ev.get("chunk_size"))
    if chunk is not None:
        cfg.chunk_size = int(chunk)
    if isinstance(run.get("spec"), str) and (base / run["spec"]).is_file():
        read_spec(base / run["spec"], cfg)
    return cfg


def parse_model_arg(spec: str, kwargs: dict[str, Any]) -> RunConfig:
    """`--model`: a Recorder run (`lca-run.json` or its directory), an exported program
    (`.pt2`), `path/file.py:factory` or `package.module:factory`."""
    p = Path(spec)
    if p.is_dir() and (p / "lca-run.json").is_file():
        p = p / "lca-run.json"
    if p.suffix == ".json":
        if not p.is_file():
            raise ConfigError(f"--model {spec}: no such run file")
        cfg = read_run(p)
        cfg.model.kwargs.update(kwargs)
        return cfg
    if p.suffix in (".pt2", ".ep"):
        if not p.is_file():
            raise ConfigError(f"--model {spec}: no such exported program")
        return RunConfig(model=ModelRef(exported=p.resolve()), data=DataConfig())
    if ":" not in spec:
        raise ConfigError(
            f"--model {spec}: expected lca-run.json, a .pt2 exported program, "
            "path/to/file.py:factory or package.module:factory"
        )
    return RunConfig(model=ModelRef(factory=spec, kwargs=dict(kwargs)), data=DataConfig())


def _import_factory(ref: ModelRef) -> Callable[..., Any]:
    assert ref.factory is not None
    target, _, name = ref.factory.rpartition(":")
    for p in [*ref.sys_path, str(ref.base), str(Path.cwd())]:
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_absolute():
                path = (ref.base / path) if (ref.base / path).is_file() else path.resolve()
            if not path.is_file():
                raise ModelImportError(f"model file {path} does not exist")
            if str(path.parent) not in sys.path:
                sys.path.insert(0, str(path.parent))
            modname = f"lca_user_model_{path.stem}"
            spec = importlib.util.spec_from_file_location(modname, path)
            if spec is None or spec.loader is None:
                raise ModelImportError(f"cannot import {path} as a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[modname] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ModelImportError:
        raise
    except Exception as e:
        raise ModelImportError(
            f"cannot import the model's module '{target}': {type(e).__name__}: {e}"
        ) from e
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ModelImportError(f"'{target}' has no attribute '{name}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelImportError(f"'{ref.factory}' is not callable")
    return obj  # type: ignore[no-any-return]


def load_module(ref: ModelRef) -> tuple[nn.Module, bool]:
    """The model as an nn.Module, and whether it comes from an exported program."""
    if ref.factory is not None:
        fn = _import_factory(ref)
        try:
            obj = fn(*ref.args, **ref.kwargs)
        except Exception as e:
            raise ModelImportError(
                f"calling the model factory '{ref.factory}' failed: {type(e).__name__}: {e}"
            ) from e
        if isinstance(obj, torch.export.ExportedProgram):
            return obj.module(), True
        if not isinstance(obj, nn.Module):
            raise ModelImportError(
                f"the model factory '{ref.factory}' returned {type(obj).__name__}, "
                "not a torch.nn.Module"
            )
        return obj, False
    assert ref.exported is not None
    try:
        ep = torch.export.load(str(ref.exported))
    except Exception as e:
        raise ModelImportError(
            f"cannot load the exported program {ref.exported}: {type(e).__name__}: {e}"
        ) from e
    return ep.module(), True


@dataclass
class Dataset:
    """Inputs and targets as the model and the loss see them (on the CPU, full precision)."""

    path: Path
    x: torch.Tensor
    y: torch.Tensor
    n: int


def _read_tensors(path: Path, names: list[str]) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                have = list(z.keys())
                missing = [n for n in names if n not in have]
                if missing:
                    raise ConfigError(
                        f"{path} has no array '{missing[0]}' (it holds: {', '.join(sorted(have))})"
                    )
                return {n: np.asarray(z[n]) for n in names}
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: not a valid .npz file: {e}") from e
    try:
        from safetensors import safe_open
    except ImportError as e:
        raise ConfigError("reading .safetensors data needs the `safetensors` package") from e
    try:
        with safe_open(str(path), framework="pt") as f:
            have = list(f.keys())
            missing = [n for n in names if n not in have]
            if missing:
                raise ConfigError(
                    f"{path} has no tensor '{missing[0]}' (it holds: {', '.join(sorted(have))}); "
                    "set the data keys (--x/--y/--tokens or the spec's [data])"
                )
            out = {}
            for n in names:
                t = f.get_tensor(n)
                if t.dtype in (torch.uint16, torch.uint32, torch.uint64):
                    t = t.to(torch.int64)
                out[n] = t.numpy() if t.dtype != torch.bfloat16 else t.float().numpy()
            return out
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{path}: not a valid safetensors file: {e}") from e


def _per_channel(v: list[float] | None, default: float, channels: int, key: str) -> np.ndarray:
    if v is None:
        return np.full(channels, default)
    if len(v) == 1:
        return np.full(channels, v[0])
    if len(v) == channels:
        return np.asarray(v, dtype=np.float64)
    raise ConfigError(
        f"`data.{key}` has {len(v)} values but samples have {channels} features/channels "
        "along their first axis"
    )


def load_data(cfg: DataConfig, loss: str) -> Dataset:
    """Read and preprocess the training set exactly as lca's built-in engine does: inputs
    x·scale, minus mean, divided by std (per feature/channel along the first per-sample axis),
    computed in f64 and rounded to f32; token ids and class indices as int64."""
    if cfg.train is None:
        raise ConfigError("no training set: pass --data FILE (or --spec / a run that names it)")
    path = cfg.train
    if cfg.tokens is not None:
        if cfg.scale is not None or cfg.mean is not None or cfg.std is not None:
            raise ConfigError("`data.tokens` cannot be combined with scale, mean or std")
        tok = _read_tensors(path, [cfg.tokens])[cfg.tokens]
        if tok.ndim != 2 or tok.shape[1] < 2 or tok.dtype.kind not in "iu":
            raise ConfigError(
                f"{path}: '{cfg.tokens}' must be integer token ids [N, T+1], "
                f"found {tok.dtype} {list(tok.shape)}"
            )
        t = torch.from_numpy(tok.astype(np.int64))
        return Dataset(path, t[:, :-1].contiguous(), t[:, 1:].contiguous(), int(t.shape[0]))
    arrs = _read_tensors(path, [cfg.x, cfg.y])
    xa, ya = arrs[cfg.x], arrs[cfg.y]
    if xa.ndim == 0 or ya.ndim == 0:
        raise ConfigError(f"{path}: '{cfg.x}' and '{cfg.y}' must have a sample axis")
    n = int(xa.shape[0])
    if n == 0:
        raise ConfigError(f"{path}: '{cfg.x}' holds no samples")
    if ya.shape[0] != n:
        raise ConfigError(f"{path}: '{cfg.x}' has {n} samples but '{cfg.y}' has {ya.shape[0]}")
    sample = list(xa.shape[1:])
    if cfg.input_shape is not None:
        if int(np.prod(sample)) != int(np.prod(cfg.input_shape)):
            raise ConfigError(
                f"{path}: samples of '{cfg.x}' have shape {sample} but `model.input_shape` "
                f"is {cfg.input_shape}"
            )
        sample = list(cfg.input_shape)
    ids = (
        xa.dtype.kind in "iu"
        and cfg.scale is None
        and cfg.mean is None
        and cfg.std is None
        and loss == "cross_entropy"
        and xa.shape == ya.shape
        and xa.ndim == 2
    )
    if ids:  # separate token ids x, y [N, T]
        x = torch.from_numpy(xa.astype(np.int64))
    else:
        if not np.all(np.isfinite(xa.astype(np.float64))):
            bad = int(np.argwhere(~np.isfinite(xa.astype(np.float64)))[0][0])
            raise ConfigError(f"{path}: '{cfg.x}' holds a non-finite value in sample {bad}")
        channels = sample[0] if sample else 1
        xs = xa.astype(np.float64).reshape([n, channels, -1])
        mean = _per_channel(cfg.mean, 0.0, channels, "mean")
        std = _per_channel(cfg.std, 1.0, channels, "std")
        if np.any(std == 0):
            raise ConfigError("`data.std` must not be 0")
        scale = 1.0 if cfg.scale is None else cfg.scale
        xs = (xs * scale - mean[None, :, None]) / std[None, :, None]
        x = torch.from_numpy(xs.astype(np.float32).reshape([n, *sample]))
    if loss == "cross_entropy":
        yf = ya.astype(np.float64)
        if not np.all(np.isfinite(yf)) or np.any(yf < 0) or np.any(yf != np.floor(yf)):
            raise ConfigError(
                f"{path}: '{cfg.y}' must hold class indices (non-negative integers) "
                "for cross_entropy"
            )
        y = torch.from_numpy(ya.astype(np.int64))
    else:
        y = torch.from_numpy(ya.astype(np.float64).astype(np.float32))
    return Dataset(path, x, y, n)
