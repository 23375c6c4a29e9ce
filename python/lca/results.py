"""Running `lca analyze` from Python and reading its output directory.

    res = lca.analyze("run/")                  # a Recorder's run directory
    res = lca.analyze("ckpts/", spec="model.toml", out="lca-out", threads=2)
    res = lca.load("lca-out")
    res.layers                                 # pandas: one row per step x layer
    res.layer_totals                           # one row per layer, over the whole run
    res.lca["fc1.weight"]                      # numpy [steps, 32, 64], read lazily

pandas is imported when a table is first read, not by `import lca`.
"""

from __future__ import annotations

import html
import json
import os
import struct
from collections.abc import Iterator, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from . import _binary
from ._binary import LcaError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["analyze", "load", "Results", "LcaTensors", "LcaError", "option_flags"]

PathLike = Union[str, "os.PathLike[str]"]
OptionValue = Union[bool, int, float, str, "os.PathLike[str]", None, list[Any], tuple[Any, ...]]

#: The name of the file a Recorder writes into its run directory.
RUN_MANIFEST = "lca-run.json"


def option_flags(options: Mapping[str, OptionValue]) -> list[str]:
    """Keyword options as `lca` command-line flags: `threads=2` → `--threads 2`,
    `no_adaptive=True` → `--no-adaptive`, `False`/`None` → nothing, a list → the flag once
    per item."""
    flags: list[str] = []
    for key, value in options.items():
        if not key.replace("_", "").isalnum() or key.startswith("_"):
            raise ValueError(f"{key!r} is not an option name")
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, (list, tuple)):
            for item in value:
                flags += [flag, _option_value(key, item)]
        else:
            flags += [flag, _option_value(key, value)]
    return flags


def _option_value(key: str, value: object) -> str:
    if isinstance(value, bool) or value is None:
        raise ValueError(f"option {key}: {value!r} cannot be one of several values")
    if isinstance(value, (str, int, float, os.PathLike)):
        return os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    raise TypeError(f"option {key}: {type(value).__name__} is not a number, string or path")


def _run_dir_inputs(run_dir: Path, need_spec: bool = True) -> tuple[Path, Path]:
    """The checkpoint directory and spec of a Recorder's run directory (its lca-run.json says
    where they are; `checkpoints/` and `model.toml` otherwise)."""
    manifest = run_dir / RUN_MANIFEST
    try:
        info = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LcaError(f"{manifest}: cannot be read as JSON: {e}", 2) from e
    if not isinstance(info, dict):
        raise LcaError(f"{manifest}: expected a JSON object", 2)

    def entry(keys: tuple[str, ...], default: str) -> Path:
        for key in keys:
            value = info.get(key)
            if isinstance(value, dict):
                value = value.get("path") or value.get("dir")
            if isinstance(value, str) and value:
                p = Path(value)
                return p if p.is_absolute() else run_dir / p
        return run_dir / default

    ckpts = entry(("checkpoints", "checkpoint_dir", "ckpts"), "checkpoints")
    if need_spec and "spec" in info and info["spec"] is None:
        # The Recorder found ops lca cannot evaluate, and wrote no spec.
        ops = [u for u in info.get("unsupported", []) if isinstance(u, dict)]
        lines = [f"{run_dir}: the Recorder wrote no spec (model.toml)"]
        if ops:
            lines[0] += f": lca cannot evaluate {len(ops)} op(s) of this model:"
            for u in ops:
                where = f"in `{u.get('where')}`" if u.get("where") else "in the top-level module"
                src = f" ({u['source']})" if u.get("source") else ""
                lines.append(f"  - {u.get('op')} {where}{src}: {u.get('reason')}")
        lines.append("pass spec= to analyse with a spec written by hand (docs/spec.md)")
        raise LcaError("\n".join(lines), 2)
    spec = entry(("spec", "model_spec", "model"), "model.toml")
    return ckpts, spec


def analyze(
    ckpts: PathLike,
    spec: PathLike | None = None,
    out: PathLike | None = None,
    *,
    progress: bool | None = None,
    **options: OptionValue,
) -> Results:
    """Run `lca analyze` and load its output.

    `ckpts` is a directory of checkpoints (then `spec` is the model.toml), or a run directory
    written by `lca.Recorder` (holding lca-run.json; its checkpoints and spec are used, and the
    output goes to RUN_DIR/lca-out unless `out` says otherwise). Other keyword arguments are
    `lca analyze` options: `threads=2` is `--threads 2`, `no_adaptive=True` is
    `--no-adaptive`, `method="trapezoid"`, `first=10`, `every=5`, `lca_dtype="f64"`,
    `resume=True`, `quiet=True`... (`lca analyze --help` lists them all).

    Progress shows as lca draws it on a terminal, as a line every few seconds in Jupyter
    (`progress=False` turns it off, `progress=True` forces lines in a log). A failure raises
    `lca.LcaError` with lca's message and `returncode`.
    """
    ckpts_path = Path(ckpts)
    run_dir: Path | None = None
    if ckpts_path.name == RUN_MANIFEST and ckpts_path.is_file():
        run_dir = ckpts_path.parent
    elif (ckpts_path / RUN_MANIFEST).is_file():
        run_dir = ckpts_path
    if run_dir is not None and spec is not None:
        ckpts_path = _run_dir_inputs(run_dir, need_spec=False)[0]
        spec_path = Path(spec)
        out_path = Path(out) if out is not None else run_dir / "lca-out"
    elif run_dir is not None:
        ckpts_path, spec_path = _run_dir_inputs(run_dir)
        out_path = Path(out) if out is not None else run_dir / "lca-out"
    else:
        if spec is None:
            raise LcaError(
                f"{ckpts_path}: spec= is needed (the model.toml describing the model), unless "
                f"this is a run directory written by lca.Recorder (it has no {RUN_MANIFEST})",
                2,
            )
        spec_path = Path(spec)
        out_path = Path(out) if out is not None else Path("lca-out")
    for reserved in ("spec", "out", "o", "s"):
        if reserved in options:
            raise TypeError(f"analyze() got option {reserved!r}: pass spec= and out= instead")
    args = [
        "analyze",
        os.fspath(ckpts_path),
        "--spec",
        os.fspath(spec_path),
        "--out",
        os.fspath(out_path),
        *option_flags(options),
    ]
    _binary.run(args, progress=progress)
    return load(out_path)


def load(out: PathLike = "lca-out") -> Results:
    """The output directory of `lca analyze` (or `lca merge`) as a `Results`."""
    path = Path(out)
    if not (path / "summary.json").is_file():
        if (path / ".lca-resume").is_dir():
            raise LcaError(
                f"{path}: the run did not finish (no summary.json); continue it with "
                "lca.analyze(..., resume=True) or `lca analyze ... --resume`",
                2,
            )
        what = "does not exist" if not path.exists() else "holds no summary.json"
        raise LcaError(f"{path}: not an lca output directory ({what})", 2)
    try:
        import pandas  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "lca.load reads the tables with pandas: pip install pandas "
            "(or pip install 'loss-change-allocation[pandas]')"
        ) from e
    return Results(path)


class Results:
    """The output of one `lca analyze` run (docs/outputs.md), read on demand.

    Tables (pandas DataFrames, read on first use): `steps` (one row per step), `layers` and
    `tensors` (one row per step x layer / tensor), `params` (one row per parameter, its LCA
    summed over the run), `layer_totals` and `tensor_totals` (the run's totals from
    summary.json, with `share_of_abs_delta`). `summary` is summary.json as a dict. `lca` maps
    each parameter tensor's name to its per-step LCA, `[steps, *shape]`, as numpy arrays read
    from lca.safetensors when asked for (`validation_lca` likewise for the held-out set).
    """

    def __init__(self, out: PathLike) -> None:
        self.out = Path(out)
        with open(self.out / "summary.json", encoding="utf-8") as f:
            self.summary: dict[str, Any] = json.load(f)

    # -- tables -----------------------------------------------------------------------------

    def _csv(self, name: str) -> pd.DataFrame:
        import pandas as pd

        path = self.out / name
        if not path.is_file():
            hint = " (analyze was run with --no-lca-tensors?)" if name == "params.csv" else ""
            raise FileNotFoundError(f"{path}: not in this output{hint}")
        return pd.read_csv(path)

    @cached_property
    def steps(self) -> pd.DataFrame:
        """steps.csv: step, next_step, loss_before, loss_after, delta_loss, lca_sum, residual…"""
        return self._csv("steps.csv")

    @cached_property
    def layers(self) -> pd.DataFrame:
        """layers.csv: step, next_step, layer, lca, helped, zero, hurt (one row per step x
        layer). `layer_totals` has the whole run's."""
        return self._csv("layers.csv")

    @cached_property
    def tensors(self) -> pd.DataFrame:
        """tensors.csv: step, next_step, tensor, layer, lca, helped, zero, hurt."""
        return self._csv("tensors.csv")

    @cached_property
    def params(self) -> pd.DataFrame:
        """One row per parameter: tensor, layer, flat_index, index, lca, helped_steps,
        hurt_steps (large for large models). Read from params.csv when analyze wrote it
        (`--params-csv`), else built from totals.safetensors (always written)."""
        if (self.out / "params.csv").is_file() or not (self.out / "totals.safetensors").is_file():
            return self._csv("params.csv")
        return self._params_from_totals()

    def _params_from_totals(self) -> pd.DataFrame:
        import pandas as pd

        t = LcaTensors(self.out / "totals.safetensors")
        frames = []
        for p in self.summary["model"]["params"]:
            name = str(p["name"])
            shape = tuple(int(d) for d in p["shape"])
            lca = np.asarray(t[f"lca/{name}"], dtype=np.float64).reshape(-1)
            n = lca.size
            idx = np.unravel_index(np.arange(n), shape) if shape else ()
            index = ["[" + ", ".join(str(int(a[k])) for a in idx) + "]" for k in range(n)]
            cols: dict[str, Any] = {
                "tensor": [name] * n,
                "layer": [str(p["layer"])] * n,
                "flat_index": np.arange(n),
                "index": index,
                "lca": lca,
                "helped_steps": np.asarray(t[f"helped_steps/{name}"]).reshape(-1).astype(np.int64),
                "hurt_steps": np.asarray(t[f"hurt_steps/{name}"]).reshape(-1).astype(np.int64),
            }
            for extra in ("val_lca", "l2_lca"):
                if f"{extra}/{name}" in t:
                    cols[extra] = np.asarray(t[f"{extra}/{name}"]).reshape(-1)
            frames.append(pd.DataFrame(cols))
        return pd.concat(frames, ignore_index=True)

    def _totals(self, key: str) -> pd.DataFrame:
        import pandas as pd

        df = pd.DataFrame(self.summary.get(key, []))
        if not df.empty and "name" in df.columns:
            if key == "layers":
                df = df.drop(columns=["layer"], errors="ignore")
            df = df.rename(columns={"name": key[:-1]})
        delta = self.delta_loss
        if not df.empty and "lca" in df.columns:
            position = list(df.columns).index("lca") + 1
            share = df["lca"] / abs(delta) if delta else float("nan")
            df.insert(position, "share_of_abs_delta", share)
        return df

    @cached_property
    def layer_totals(self) -> pd.DataFrame:
        """One row per layer over the whole run: layer, params, lca, share_of_abs_delta,
        helped, zero, hurt, helped_fraction (as `lca summarize --by layer`)."""
        return self._totals("layers")

    @cached_property
    def tensor_totals(self) -> pd.DataFrame:
        """One row per parameter tensor over the whole run (as `lca summarize --by tensor`)."""
        return self._totals("tensors")

    # -- per-parameter values -----------------------------------------------------------------

    @cached_property
    def lca(self) -> LcaTensors:
        """Per-step, per-parameter LCA from lca.safetensors (numpy, read lazily)."""
        path = self.out / "lca.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not written (analyze ran with --no-lca-tensors)")
        return LcaTensors(path)

    @cached_property
    def validation_lca(self) -> LcaTensors:
        """Per-step, per-parameter LCA of the held-out loss (when the spec has one)."""
        path = self.out / "lca_validation.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not written (the spec has no held-out set)")
        return LcaTensors(path)

    # -- headline numbers ---------------------------------------------------------------------

    @property
    def run(self) -> dict[str, Any]:
        """Whole-run figures: loss_first, loss_last, delta_loss, lca_sum, residuals…"""
        run = self.summary.get("run", {})
        return run if isinstance(run, dict) else {}

    @property
    def loss_first(self) -> float:
        return float(self.run.get("loss_first", float("nan")))

    @property
    def loss_last(self) -> float:
        return float(self.run.get("loss_last", float("nan")))

    @property
    def delta_loss(self) -> float:
        return float(self.run.get("delta_loss", float("nan")))

    @property
    def lca_sum(self) -> float:
        return float(self.run.get("lca_sum", float("nan")))

    @property
    def warnings(self) -> list[str]:
        return [str(w) for w in self.summary.get("warnings", [])]

    # -- the other lca commands on this output -------------------------------------------------

    def summarize(
        self,
        by: str = "layer",
        top: int | None = None,
        sort: str | None = None,
    ) -> pd.DataFrame:
        """`lca summarize OUT --by BY` as a DataFrame: by layer, block, tensor, neuron, step,
        param or head; `top=N` keeps N rows; `sort` is order, helped, hurt or abs."""
        import io

        import pandas as pd

        args = ["summarize", os.fspath(self.out), "--by", by, "--format", "csv"]
        args += option_flags({"top": top, "sort": sort})
        done = _binary.run(args, echo_stdout=False, progress=False)
        return pd.read_csv(io.StringIO(done.stdout))

    def report(self, path: PathLike = "report.html") -> Path:
        """Write `lca report`'s self-contained HTML page; returns its path."""
        _binary.run(["report", os.fspath(self.out), "-o", os.fspath(path)], progress=False)
        return Path(path)

    def plot(self, kind: str, path: PathLike, layer: str | None = None) -> Path:
        """Write one of `lca plot`'s figures (loss, layers, helped, heatmap, peaks) as SVG or
        PNG (by the extension); `layer` for the heatmap."""
        args = ["plot", os.fspath(self.out), "--kind", kind, "-o", os.fspath(path)]
        _binary.run(args + option_flags({"layer": layer}), progress=False)
        return Path(path)

    # -- display ------------------------------------------------------------------------------

    def _headline(self) -> list[tuple[str, str]]:
        s = self.summary
        run = self.run
        steps = s.get("steps", [])
        rows: list[tuple[str, str]] = [("output", os.fspath(self.out))]
        if steps:
            first, last = steps[0].get("step"), steps[-1].get("next_step")
            rows.append(("steps", f"{len(steps)} ({first} → {last})"))
        data = s.get("data", {})
        if isinstance(data, dict) and "samples" in data:
            rows.append(("samples", str(data["samples"])))
        model = s.get("model", {})
        if isinstance(model, dict) and "num_params" in model:
            rows.append(("parameters", f"{model['num_params']:,}"))
        if run:
            rows.append(
                (
                    "loss",
                    f"{_g(run.get('loss_first'))} → {_g(run.get('loss_last'))} "
                    f"(ΔL {_g(run.get('delta_loss'))})",
                )
            )
            rows.append(("ΣLCA", _g(run.get("lca_sum"))))
            rel = run.get("rel_abs_residual")
            rel_s = "n/a (ΔL = 0)" if rel is None else f"{100 * float(rel):.4f}%"
            rows.append(("residual Σ|r|/|ΔL|", rel_s))
            rows.append(("max |r_t|", _g(run.get("max_abs_residual"))))
            if "evaluations" in run:
                rows.append(("gradient evaluations", str(run["evaluations"])))
        integ = s.get("integration", {})
        if isinstance(integ, dict) and "method" in integ:
            rows.append(("method", str(integ["method"])))
        return rows

    def _top_layers(self, n: int = 10) -> list[dict[str, Any]]:
        layers = [x for x in self.summary.get("layers", []) if isinstance(x, dict)]
        layers.sort(key=lambda x: abs(float(x.get("lca", 0.0))), reverse=True)
        return layers[:n]

    def __repr__(self) -> str:
        head = ", ".join(f"{k}={v}" for k, v in self._headline()[1:4])
        return f"<lca.Results {os.fspath(self.out)!r}: {head}>"

    def _repr_html_(self) -> str:
        e = html.escape
        parts = ["<div class='lca-results'>", "<strong>lca results</strong>"]
        parts.append("<table><tbody>")
        for k, v in self._headline():
            parts.append(f"<tr><th style='text-align:left'>{e(k)}</th><td>{e(v)}</td></tr>")
        parts.append("</tbody></table>")
        top = self._top_layers()
        if top:
            delta = self.delta_loss
            n_layers = len(self.summary.get("layers", []))
            parts.append(
                f"<p>Layers by |LCA| (top {len(top)} of {n_layers}; negative = lowered the loss)"
                "</p><table><thead><tr><th>layer</th><th>params</th><th>lca</th>"
                "<th>share of |ΔL|</th><th>helped fraction</th></tr></thead><tbody>"
            )
            for x in top:
                lca = float(x.get("lca", 0.0))
                share = f"{lca / abs(delta):+.3f}" if delta else ""
                helped = x.get("helped_fraction")
                parts.append(
                    f"<tr><td>{e(str(x.get('name', x.get('layer', ''))))}</td>"
                    f"<td>{e(str(x.get('params', '')))}</td><td>{lca:+.6g}</td>"
                    f"<td>{share}</td>"
                    f"<td>{'' if helped is None else f'{float(helped):.3f}'}</td></tr>"
                )
            parts.append("</tbody></table>")
        warnings = self.warnings
        if warnings:
            parts.append("<p>Warnings:</p><ul>")
            parts += [f"<li>{e(w)}</li>" for w in warnings]
            parts.append("</ul>")
        parts.append("</div>")
        return "".join(parts)


def _g(x: object) -> str:
    if x is None:
        return "n/a"
    try:
        return f"{float(x):.6g}"  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(x)


_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "U16": "<u2",
    "U32": "<u4",
    "BOOL": "?",
    "BF16": "<u2",
}


class LcaTensors(Mapping[str, np.ndarray]):
    """The tensors of a safetensors file (lca.safetensors), read when indexed, without loading
    the whole file: `t["fc1.weight"]` is a read-only numpy array `[steps, 32, 64]` mapped from
    the file. `steps` and `next_steps` say which step each leading row covers."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise LcaError(f"{self.path}: too short for a safetensors file", 2)
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise LcaError(f"{self.path}: header length {n} exceeds the file", 2)
            header = json.loads(f.read(n).decode("utf-8"))
        self._data_start = 8 + n
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()}
        self._entries: dict[str, dict[str, Any]] = header
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._cache:
            return self._cache[name]
        entry = self._entries[name]
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise LcaError(f"{self.path}: tensor {name}: dtype {dtype} is not supported", 2)
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
        if end == begin:
            arr: np.ndarray = np.zeros(shape, dtype=_DTYPES[dtype])
        else:
            arr = np.memmap(
                self.path,
                dtype=_DTYPES[dtype],
                mode="r",
                offset=self._data_start + begin,
                shape=shape,
            )
        if dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        self._cache[name] = arr
        return arr

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor, without reading it."""
        return tuple(int(d) for d in self._entries[name]["shape"])

    def _meta_list(self, key: str) -> list[int]:
        value = self.metadata.get(key)
        return [int(x) for x in json.loads(value)] if value else []

    @property
    def steps(self) -> list[int]:
        """The training step each leading row starts from."""
        return self._meta_list("steps")

    @property
    def next_steps(self) -> list[int]:
        """The training step each leading row ends at."""
        return self._meta_list("next_steps")

    def __repr__(self) -> str:
        return f"<lca.LcaTensors {os.fspath(self.path)!r}: {len(self)} tensors>"
