"""`lca.Recorder`: record a PyTorch training run in the layout `lca analyze` reads.

    rec = lca.Recorder(model, "run/", data=(x, y), loss="cross_entropy")
    for batch in loader:
        ...
        optimizer.step()
        rec.step()
    rec.close()
    # lca analyze run/checkpoints --spec run/model.toml -o run/lca-out

The run directory layout and every file's keys are documented in docs/recorder.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _order
from ._version import __version__
from .trace import BATCH_NORM_MODES, LOSSES, SpecResult, trace_spec

__all__ = ["Recorder", "FORMAT_VERSION", "torch_loss"]

FORMAT_VERSION = 1
"""Version of the run directory layout (`lca-run.json` key `format_version`)."""

DATA_FILE = "data/train.safetensors"
CHECKPOINTS = "checkpoints"
SPEC_FILE = "model.toml"
MANIFEST = "lca-run.json"
EXPORTED = "model.pt2"


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write `path` through a temporary file in the same directory, then rename it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".partial{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _MODE)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_text(path: Path, text: str) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, w)


def _as_tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu()
    try:
        return torch.as_tensor(v)
    except Exception as e:
        raise TypeError(f"data: {what} is a {type(v).__name__}, not a tensor or array") from e


def _read_data(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole training set as two tensors (x, y), read once and in order."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = _as_tensor(data[0], "x"), _as_tensor(data[1], "y")
    else:
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                batches = list(data)
                xs = [_as_tensor(b[0], "x") for b in batches]
                ys = [_as_tensor(b[1], "y") for b in batches]
                x, y = torch.cat(xs), torch.cat(ys)
                return _check_data(x, y)
            data = data.dataset  # its samples in index order, whatever the loader's sampler
        if not isinstance(data, Dataset) or not hasattr(data, "__len__"):
            raise TypeError(
                "data must be (x, y) tensors, a map-style Dataset or a DataLoader, "
                f"not {type(data).__name__}"
            )
        items = [data[i] for i in range(len(data))]
        if not items:
            raise ValueError("data: the dataset is empty")
        x = torch.stack([_as_tensor(it[0], "x") for it in items])
        y = torch.stack([_as_tensor(it[1], "y") for it in items])
    return _check_data(x, y)


def _check_data(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"data: x has {x.shape[0]} samples but y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise ValueError("data: no samples")
    if x.dtype in (torch.float16, torch.bfloat16):
        raise ValueError(f"data: x is {x.dtype}; lca reads float32/float64/integer inputs")
    return x.contiguous(), y.contiguous()


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside `torch.compile`, `nn.DataParallel` and DistributedDataParallel
    wrappers: it holds the same parameters, under the names its own code gives them."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile's OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
            continue
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
            continue
        return model


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _loss_terms(loss: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The per-term losses whose mean is the loss (one per sample, position or element)."""
    if loss == "cross_entropy":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")
    return F.mse_loss(out, y.to(out.dtype), reduction="none")


def row_order_for(
    model: nn.Module, n: int, data_order: str, data_seed: int | None
) -> list[int] | None:
    """The evaluation order of `n` rows in batch-stats mode: lca's permutation when the model
    has batch norm and `data_order` is `"shuffled"`; `None` (file order) otherwise."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    return _order.row_order(n, data_order, data_seed)


def torch_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    chunk_size: int = 256,
    batch_norm: str = "running-stats",
    data_order: str = "shuffled",
    data_seed: int | None = None,
) -> tuple[float, str]:
    """PyTorch's full-training-set loss of `model` and the dtype it was computed in.

    The mean over every sample (position, element) of the whole set, evaluated in chunks of
    `chunk_size` with gradients off and the terms summed in float64. The model is in
    evaluation mode (dropout off, batch norm with running statistics); with
    `batch_norm="batch-stats"` its batch-norm layers normalise each chunk with the chunk's own
    statistics, as lca's `batch-stats` mode does (running statistics are left untouched), and
    the chunks are drawn in lca's row order (`data_order="shuffled"`: the permutation of
    `data_seed`, default 0, as `lca analyze --data-order shuffled --data-seed N`; `"file"`:
    consecutive rows). The model's train/eval mode is restored afterwards.
    """
    import copy

    was_training = model.training
    net = model
    if batch_norm == "batch-stats":
        net = copy.deepcopy(model)
    net.eval()
    if batch_norm == "batch-stats":
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        rows = row_order_for(net, x.shape[0], data_order, data_seed)
        if rows is not None:
            index = torch.tensor(rows, dtype=torch.int64, device=x.device)
            x, y = x.index_select(0, index), y.index_select(0, index)
    device = _model_device(net)
    total = 0.0
    count = 0
    dtype = "float32"
    try:
        with torch.no_grad():
            for i in range(0, x.shape[0], chunk_size):
                xb = x[i : i + chunk_size].to(device)
                yb = y[i : i + chunk_size].to(device)
                out = net(xb)
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"the model returns {type(out).__name__}; the loss needs one tensor"
                    )
                dtype = str(out.dtype).replace("torch.", "")
                terms = _loss_terms(loss, out, yb)
                total += float(terms.double().sum())
                count += terms.numel()
    finally:
        model.train(was_training)
    return total / count, dtype


class Recorder:
    """Records a training run for `lca analyze`: data, spec, checkpoints, PyTorch's loss.

    On creation it writes the training set file, the spec traced from the module
    (`model.toml`; none when the model has an op lca cannot evaluate), the manifest
    `lca-run.json`, optionally the exported program `model.pt2`, and checkpoint 0 (θ_0, before
    any update) with PyTorch's own full-training-set loss in its metadata. Call `step()` after
    every `optimizer.step()`; checkpoint t is written when t is a multiple of `every`.

    Args:
        model: the module being trained.
        run_dir: the run directory (created; files already there are replaced).
        data: the training set exactly as the loss sees it (no augmentation): `(x, y)`
            tensors or arrays, a map-style Dataset (read once, in index order, with its
            transform), or a DataLoader (its dataset, in index order).
        loss: `"cross_entropy"` (logits against class indices, per position for sequence
            outputs) or `"mse"`.
        every: write a checkpoint every `every` steps (1: every step, what LCA assumes).
        torch_loss_every: also store PyTorch's loss in every checkpoint whose step is a
            multiple of this (checkpoint 0 always has it).
        factory: how to rebuild the module without pickles: `"pkg.module:function"` or the
            function itself, called with `factory_args` / `factory_kwargs` (JSON values).
        batch_norm: `"running-stats"` (PyTorch's `model.eval()`, default) or `"batch-stats"`.
        chunk_size: samples per evaluation chunk, for lca's `[eval] chunk_size` and PyTorch's
            loss.
        data_order, data_seed: with `batch_norm="batch-stats"`, the row order of PyTorch's
            loss chunks: `"shuffled"` (lca's default: the permutation of `data_seed`, default
            0) or `"file"`; recorded as `lca.data_order`/`lca.data_seed` so that `lca analyze`
            compares its loss only when it evaluates in the same order.
        export: try `torch.export` and write `model.pt2` (a PyTorch engine can rebuild the
            module from it).
        example_size: how many samples the module is traced and exported with.
    """

    def __init__(
        self,
        model: nn.Module,
        run_dir: str | os.PathLike[str],
        data: Any,
        loss: str = "cross_entropy",
        every: int = 1,
        torch_loss_every: int | None = None,
        factory: str | Callable[..., nn.Module] | None = None,
        factory_args: Sequence[Any] = (),
        factory_kwargs: Mapping[str, Any] | None = None,
        batch_norm: str = "running-stats",
        chunk_size: int = 256,
        export: bool = True,
        example_size: int = 2,
        data_order: str = "shuffled",
        data_seed: int | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(map(repr, LOSSES))}, not {loss!r}")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(
                f"batch_norm must be one of {', '.join(map(repr, BATCH_NORM_MODES))}, "
                f"not {batch_norm!r}"
            )
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        if torch_loss_every is not None and torch_loss_every < 1:
            raise ValueError(f"torch_loss_every must be >= 1, not {torch_loss_every}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, not {chunk_size}")
        if data_order not in ("shuffled", "file"):
            raise ValueError(f"data_order must be 'shuffled' or 'file', not {data_order!r}")
        if data_seed is not None and (data_order == "file" or not 0 <= data_seed < 1 << 64):
            raise ValueError(
                f"data_seed must be an integer in [0, 2^64) with data_order='shuffled', "
                f"not {data_seed!r}"
            )
        self.data_order = data_order
        self.data_seed = data_seed
        model = _unwrap(model)
        self.model = model
        self.run_dir = Path(run_dir)
        self.loss = loss
        self.every = every
        self.torch_loss_every = torch_loss_every
        self.batch_norm = batch_norm
        self.chunk_size = chunk_size
        self.t = 0
        self.last_written: int | None = None
        self.closed = False
        self.model_ref = self._model_ref(factory, factory_args, factory_kwargs or {})
        self.x, self.y = _read_data(data)

        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CHECKPOINTS).mkdir(exist_ok=True)
        # An earlier run's files must not mix with this one's (lca reads every checkpoint).
        for old in (self.run_dir / CHECKPOINTS).glob("step_*.safetensors"):
            old.unlink()
        for name in (EXPORTED, SPEC_FILE):
            if (self.run_dir / name).exists():
                (self.run_dir / name).unlink()
        self._write_data()

        example = self.x[:example_size].to(_model_device(model))
        data_table: dict[str, Any] = {"train": DATA_FILE, "x": "x", "y": "y"}
        self.spec: SpecResult = trace_spec(
            model,
            example,
            loss=loss,
            batch_norm=batch_norm,
            chunk_size=chunk_size,
            data=data_table,
        )
        spec_text = self.spec.spec
        spec_path = self.run_dir / SPEC_FILE
        if spec_text is not None:
            _write_text(spec_path, spec_text)
        self.message = self.spec.message
        if self.message:
            import warnings

            warnings.warn(f"lca.Recorder: {self.message}", stacklevel=2)

        if export:
            self._export(example)
        self._write_manifest()
        self._checkpoint(0)

    # -- public ----------------------------------------------------------------------------

    def step(self) -> Path | None:
        """Call after each `optimizer.step()`: step t+1 is done. Returns the checkpoint written
        (None when this step is not a multiple of `every`)."""
        if self.closed:
            raise RuntimeError("lca.Recorder: step() after close()")
        self.t += 1
        if self.t % self.every == 0:
            return self._checkpoint(self.t)
        return None

    def close(self) -> None:
        """Write the last state when `every` skipped it, and finish the manifest."""
        if self.closed:
            return
        if self.last_written != self.t:
            self._checkpoint(self.t)
        self.closed = True
        self._write_manifest()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def spec_path(self) -> Path | None:
        p = self.run_dir / SPEC_FILE
        return p if self.spec.spec is not None else None

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS

    # -- files -----------------------------------------------------------------------------

    def _write_data(self) -> None:
        from safetensors.torch import save_file

        tensors = {"x": self.x, "y": self.y}
        _atomic_write(self.run_dir / DATA_FILE, lambda tmp: save_file(tensors, tmp))

    def _state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The state_dict with each shared tensor stored once; metadata {alias: stored name}."""
        sd = self.model.state_dict()
        keep: dict[str, str] = {}  # alias -> stored name
        # Tied tensors: the name the spec uses (its first layer); else the first in order.
        by_storage: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], str] = {}
        preferred = set(self.spec.params.values())
        position = {k: i for i, k in enumerate(sd)}
        order = sorted(sd, key=lambda k: (k not in preferred, position[k]))
        for name in order:
            t = sd[name]
            if t.numel() == 0:
                continue
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
            if key in by_storage:
                keep[name] = by_storage[key]
            else:
                by_storage[key] = name
        out = {
            k: v.detach().to("cpu").contiguous().clone() if v.is_cuda else v.detach().contiguous()
            for k, v in sd.items()
            if k not in keep
        }
        return out, keep

    def _checkpoint(self, t: int) -> Path:
        from safetensors.torch import save_file

        tensors, aliases = self._state()
        meta = {"step": str(t), "order": json.dumps(list(self.model.state_dict().keys()))}
        meta.update(aliases)  # as safetensors.torch.save_model records a left-out name
        if t == 0 or (self.torch_loss_every is not None and t % self.torch_loss_every == 0):
            value, dtype = torch_loss(
                self.model,
                self.x,
                self.y,
                self.loss,
                self.chunk_size,
                self.batch_norm,
                self.data_order,
                self.data_seed,
            )
            meta["lca.torch_loss"] = repr(value)
            meta["lca.torch_loss_dtype"] = dtype
            meta["lca.batch_norm"] = self.batch_norm
            if self.batch_norm == "batch-stats":
                order = self.data_order
                if row_order_for(self.model, 1, order, self.data_seed) is None:
                    order = "file"
                meta["lca.data_order"] = order
                if order == "shuffled":
                    seed = _order.DEFAULT_SEED if self.data_seed is None else self.data_seed
                    meta["lca.data_seed"] = str(seed)
        path = self.checkpoints_dir / f"step_{t:06d}.safetensors"
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        self.last_written = t
        return path

    def _model_ref(
        self,
        factory: str | Callable[..., nn.Module] | None,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
    ) -> dict[str, Any]:
        cls = type(self.model)
        ref: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}"}
        if factory is not None:
            if callable(factory):
                mod = getattr(factory, "__module__", None)
                qn = getattr(factory, "__qualname__", None)
                if not mod or not qn or "<" in qn:
                    raise ValueError("factory must be a module-level function or class")
                factory = f"{mod}:{qn}"
            if ":" not in factory:
                raise ValueError(f"factory must be 'package.module:function', not {factory!r}")
            try:
                json.dumps([list(args), dict(kwargs)])
            except TypeError as e:
                raise ValueError(f"factory arguments must be JSON values: {e}") from e
            ref.update({"factory": factory, "args": list(args), "kwargs": dict(kwargs)})
        return ref

    def _export(self, example: torch.Tensor) -> None:
        was_training = self.model.training
        self.model.eval()
        try:
            from torch.export import Dim, export, save

            try:
                ep = export(
                    self.model,
                    (example,),
                    dynamic_shapes=({0: Dim("batch", min=1)},),  # type: ignore[attr-defined]
                )
                batch = "dynamic"
            except Exception:
                ep = export(self.model, (example,))
                batch = str(example.shape[0])
            _atomic_write(self.run_dir / EXPORTED, lambda tmp: save(ep, tmp))
            self.model_ref["exported"] = EXPORTED
            self.model_ref["exported_batch"] = batch
        except Exception as e:
            self.model_ref["export_error"] = f"{type(e).__name__}: {e}"[:2000]
        finally:
            self.model.train(was_training)

    def _write_manifest(self) -> None:
        x, y = self.x, self.y
        manifest = {
            "format": "lca-run",
            "format_version": FORMAT_VERSION,
            "lca_version": __version__,
            "torch_version": torch.__version__,
            "loss": self.loss,
            "data": {
                "file": DATA_FILE,
                "x": "x",
                "y": "y",
                "samples": int(x.shape[0]),
                "x_shape": list(x.shape),
                "x_dtype": str(x.dtype).replace("torch.", ""),
                "y_shape": list(y.shape),
                "y_dtype": str(y.dtype).replace("torch.", ""),
            },
            "checkpoints": CHECKPOINTS,
            "checkpoint_pattern": "step_{step:06d}.safetensors",
            "every": self.every,
            "torch_loss_every": self.torch_loss_every,
            "steps_recorded": self.t,
            "closed": self.closed,
            "spec": SPEC_FILE if self.spec.spec is not None else None,
            "unsupported": [u.to_json() for u in self.spec.unsupported],
            "batch_norm": self.batch_norm,
            "model_has_batch_norm": self.spec.batch_norm is not None,
            "chunk_size": self.chunk_size,
            "data_order": self.data_order,
            "data_seed": self.data_seed,
            "params": self.spec.params,
            "aliases": self.spec.aliases,
            "model": self.model_ref,
        }
        _write_text(self.run_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
