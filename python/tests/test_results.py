"""lca.analyze, lca.load and Results on the shipped example (fixtures/mlp)."""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lca
from lca import _binary
from lca._binary import LineSplitter, strip_ansi
from lca.results import LcaTensors, option_flags

pd = pytest.importorskip("pandas")


def analyze_mlp(mlp: Path, out: Path, **options: object) -> lca.Results:
    # The per-step policy: the example's figures as README and docs quote them.
    options.setdefault("policy", "tolerance")
    return lca.analyze(
        mlp / "ckpts", spec=mlp / "model.toml", out=out, threads=1, progress=False, **options
    )


# -- options ---------------------------------------------------------------------------------


def test_options_become_flags() -> None:
    assert option_flags(
        {
            "threads": 2,
            "no_adaptive": True,
            "no_lca_tensors": False,
            "first": None,
            "tolerance": 1e-4,
            "lca_dtype": "f64",
            "method": "trapezoid",
            "every": 5,
            "out_dir": Path("a/b"),
        }
    ) == [
        "--threads",
        "2",
        "--no-adaptive",
        "--tolerance",
        "0.0001",
        "--lca-dtype",
        "f64",
        "--method",
        "trapezoid",
        "--every",
        "5",
        "--out-dir",
        "a/b",
    ]
    assert option_flags({"layer": ["fc1", "fc2"]}) == ["--layer", "fc1", "--layer", "fc2"]
    with pytest.raises(ValueError, match="not an option name"):
        option_flags({"bad flag": 1})
    with pytest.raises(TypeError, match="dict"):
        option_flags({"x": {"a": 1}})  # type: ignore[dict-item]


# -- analyze and load ------------------------------------------------------------------------


def test_analyze_runs_the_binary_and_loads_every_table(mlp_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = analyze_mlp(mlp_run, out)
    assert isinstance(res, lca.Results)
    assert res.out == out
    assert res.summary["schema_version"] == 1
    assert res.summary["tool"]["version"].startswith(lca.__version__.split("+")[0][:3])

    steps = res.steps
    assert len(steps) == 100
    assert list(steps["step"][:3]) == [0, 1, 2]
    assert steps["loss_before"].iloc[0] == pytest.approx(2.304509, abs=1e-6)
    assert steps["loss_after"].iloc[-1] == pytest.approx(0.407603, abs=1e-6)
    assert res.loss_first == pytest.approx(2.304509, abs=1e-6)
    assert res.delta_loss == pytest.approx(res.loss_last - res.loss_first)
    assert (steps["residual"] == steps["delta_loss"] - steps["lca_sum"]).all() or np.allclose(
        steps["residual"], steps["delta_loss"] - steps["lca_sum"], atol=1e-12
    )

    # Per-step tables add up to the run's totals in summary.json.
    layers = res.layers
    assert set(layers.columns) >= {"step", "next_step", "layer", "lca", "helped", "zero", "hurt"}
    assert len(layers) == 300
    by_layer = layers.groupby("layer")["lca"].sum()
    totals = res.layer_totals.set_index("layer")
    assert list(res.layer_totals["layer"]) == ["fc1", "fc2", "fc3"]
    np.testing.assert_allclose(by_layer[totals.index], totals["lca"], rtol=1e-9)
    assert totals.loc["fc1", "lca"] == pytest.approx(-0.720161, abs=1e-6)
    np.testing.assert_allclose(
        totals["share_of_abs_delta"], totals["lca"] / abs(res.delta_loss), rtol=1e-12
    )
    assert totals["lca"].sum() == pytest.approx(res.lca_sum, rel=1e-9)

    tensors = res.tensors
    assert set(tensors["tensor"]) == {f"fc{i}.{r}" for i in (1, 2, 3) for r in ("weight", "bias")}
    assert len(res.tensor_totals) == 6
    assert len(res.params) == 3466

    # lca.safetensors: lazily mapped, per step and parameter, adding up to tensors.csv.
    t = res.lca
    assert isinstance(t, LcaTensors)
    assert set(t) == set(tensors["tensor"])
    assert t.shape("fc1.weight") == (100, 32, 64)
    w = t["fc1.weight"]
    assert w.shape == (100, 32, 64)
    assert w.dtype == np.float32
    assert t.steps == list(range(100))
    assert t.next_steps == list(range(1, 101))
    per_step = tensors[tensors["tensor"] == "fc1.weight"].sort_values("step")["lca"].to_numpy()
    np.testing.assert_allclose(w.sum(axis=(1, 2), dtype=np.float64), per_step, rtol=1e-4, atol=1e-9)

    # The same numbers as the Rust-side reader (safetensors' numpy API) when installed.
    st = pytest.importorskip("safetensors.numpy")
    ref = st.load_file(str(out / "lca.safetensors"))
    for name in ref:
        np.testing.assert_array_equal(t[name], ref[name])


def test_results_other_views_and_files(mlp_run: Path, tmp_path: Path) -> None:
    res = analyze_mlp(mlp_run, tmp_path / "out", every=10, lca_dtype="f64")
    assert len(res.steps) == 10
    assert res.lca["fc3.bias"].dtype == np.float64

    neurons = res.summarize("neuron", top=4)
    assert len(neurons) == 4
    assert {"layer", "neuron", "lca"} <= set(neurons.columns)
    layers = res.summarize("layer")
    np.testing.assert_allclose(
        layers.set_index("layer")["lca"], res.layer_totals.set_index("layer")["lca"], rtol=1e-5
    )

    page = res.report(tmp_path / "report.html")
    assert page.stat().st_size > 10_000
    svg = res.plot("loss", tmp_path / "loss.svg")
    assert svg.read_text().lstrip().startswith("<")
    heat = res.plot("heatmap", tmp_path / "heat.svg", layer="fc1")
    assert heat.stat().st_size > 1000


def test_repr_html_shows_headline_and_top_layers(mlp_run: Path, tmp_path: Path) -> None:
    res = analyze_mlp(mlp_run, tmp_path / "out")
    page = res._repr_html_()
    assert "2.30451 → 0.407603" in page
    assert "ΔL -1.89691" in page
    assert "0.0469%" in page  # residual Σ|r|/|ΔL|, as lca prints it
    # The layers, largest |LCA| first: fc1, fc3, fc2.
    assert page.index(">fc1<") < page.index(">fc3<") < page.index(">fc2<")
    assert "-0.720161" in page
    assert "100 (0 → 100)" in page
    text = repr(res)
    assert text.startswith("<lca.Results") and "steps=100" in text


def test_repr_html_escapes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    summary = {
        "run": {"loss_first": 1.0, "loss_last": 0.5, "delta_loss": -0.5, "lca_sum": -0.5},
        "layers": [{"name": "<script>", "params": 1, "lca": -0.5, "helped_fraction": 1.0}],
        "warnings": ["a & b"],
    }
    (out / "summary.json").write_text(json.dumps(summary))
    page = lca.load(out)._repr_html_()
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "a &amp; b" in page


def test_run_directory_is_accepted_in_place_of_ckpts_and_spec(
    mlp_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(mlp_run / "ckpts", run / "checkpoints")
    shutil.copytree(mlp_run / "data", run / "data")
    shutil.copy(mlp_run / "model.toml", run / "model.toml")
    (run / "lca-run.json").write_text(json.dumps({"checkpoints": "checkpoints"}))
    res = lca.analyze(run, threads=1, progress=False, last=20)
    assert res.out == run / "lca-out"
    assert len(res.steps) == 20
    # lca-run.json may name other places.
    (run / "checkpoints").rename(run / "ck")
    (run / "lca-run.json").write_text(
        json.dumps({"checkpoints": str(run / "ck"), "spec": "model.toml"})
    )
    res = lca.analyze(run / "lca-run.json", out=tmp_path / "o2", threads=1, progress=False)
    assert len(res.steps) == 100


def test_failures_raise_lca_error_with_lcas_message(mlp_run: Path, tmp_path: Path) -> None:
    with pytest.raises(lca.LcaError) as e:
        lca.analyze(tmp_path / "nowhere", spec=mlp_run / "model.toml", out=tmp_path / "o")
    assert e.value.returncode == 2
    assert "nowhere" in str(e.value)
    assert not str(e.value).startswith("error:")
    assert "nowhere" in e.value.stderr
    assert e.value.command[1] == "analyze"

    with pytest.raises(lca.LcaError, match="--bogus") as e:
        analyze_mlp(mlp_run, tmp_path / "o", bogus=3)
    assert e.value.returncode == 2

    bad = mlp_run / "bad.toml"
    bad.write_text(
        (mlp_run / "model.toml").read_text().replace("in_features = 64", "in_features = 65")
    )
    with pytest.raises(lca.LcaError, match="fc1") as e:
        lca.analyze(mlp_run / "ckpts", spec=bad, out=tmp_path / "o", progress=False)
    assert e.value.returncode == 2

    with pytest.raises(lca.LcaError, match="spec= is needed"):
        lca.analyze(mlp_run / "ckpts")
    with pytest.raises(TypeError, match="spec= and out="):
        lca.analyze(mlp_run / "ckpts", spec=mlp_run / "model.toml", o="x")  # type: ignore[arg-type]


def test_load_refuses_what_is_not_an_output(tmp_path: Path) -> None:
    with pytest.raises(lca.LcaError, match="does not exist"):
        lca.load(tmp_path / "missing")
    with pytest.raises(lca.LcaError, match="no summary.json"):
        lca.load(tmp_path)
    (tmp_path / ".lca-resume").mkdir()
    with pytest.raises(lca.LcaError, match="resume=True"):
        lca.load(tmp_path)


def test_missing_optional_outputs_are_named(mlp_run: Path, tmp_path: Path) -> None:
    res = analyze_mlp(mlp_run, tmp_path / "out", last=5, no_lca_tensors=True)
    assert not (tmp_path / "out" / "lca.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="no-lca-tensors"):
        res.lca  # noqa: B018
    with pytest.raises(FileNotFoundError, match="held-out"):
        res.validation_lca  # noqa: B018


# -- lca.safetensors reader ------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header: dict[str, object] = {"__metadata__": {"steps": "[3, 4]", "next_steps": "[4, 5]"}}
    blobs = b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(blobs), len(blobs) + len(data)],
        }
        blobs += data
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + blobs)


def test_lca_tensors_reads_each_dtype(tmp_path: Path) -> None:
    a = np.arange(6, dtype="<f8").reshape(2, 3) / 7
    b = np.array([[1.5, -2.0]], dtype="<f4")
    bf16 = np.array([1.0, -2.5, 3.0], dtype=np.float32).view(np.uint32) >> 16
    path = tmp_path / "t.safetensors"
    _write_safetensors(
        path,
        {
            "a": ("F64", [2, 3], a.tobytes()),
            "b": ("F32", [1, 2], b.tobytes()),
            "c": ("BF16", [3], bf16.astype("<u2").tobytes()),
            "empty": ("F32", [0, 4], b""),
        },
    )
    t = LcaTensors(path)
    assert list(t) == ["a", "b", "c", "empty"]
    assert len(t) == 4
    np.testing.assert_array_equal(t["a"], a)
    np.testing.assert_array_equal(t["b"], b)
    np.testing.assert_array_equal(t["c"], [1.0, -2.5, 3.0])
    assert t["empty"].shape == (0, 4)
    assert t.steps == [3, 4] and t.next_steps == [4, 5]
    assert t["a"] is t["a"]  # read once
    with pytest.raises(KeyError):
        t["nope"]
    with pytest.raises(ValueError):
        t["a"][0, 0] = 1.0  # read-only view of the file


def test_lca_tensors_rejects_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(lca.LcaError, match="too short"):
        LcaTensors(path)
    path.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(lca.LcaError, match="exceeds the file"):
        LcaTensors(path)


# -- progress --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_line_splitter_separates_lines_from_progress_frames() -> None:
    lines: list[str] = []
    frames: list[str] = []
    clock = FakeClock()
    s = LineSplitter(lines.append, frames.append, interval=5.0, clock=clock)
    s.feed("\r\x1b[2K\x1b[32m⠁\x1b[0m 1/10 evals")
    s.feed("\r\x1b[2K⠉ 2/10 evals\r")  # too soon after the start: not shown
    assert frames == [] and lines == []
    clock.t = 6.0
    s.feed("\x1b[2K⠚ 2/10 evals\r\x1b[2K⠚ 3/10 evals\r")  # the newest of a read is shown
    assert frames == ["⠚ 3/10 evals"]
    clock.t = 7.0
    s.feed("\x1b[2K⠚ 4/10 evals\r")  # within 5 s of the last one shown
    assert frames == ["⠚ 3/10 evals"]
    s.feed("\x1b[2Knote: a note\r")
    s.feed("\nanalysed 10 steps\r\n")  # "\r\n" split across two reads is one newline
    s.feed("residual: tiny")
    s.close()
    assert lines == ["note: a note", "analysed 10 steps", "residual: tiny"]


def test_strip_ansi() -> None:
    assert strip_ansi("\x1b[1A\x1b[2K\x1b[38;5;10mok\x1b[0m\x1b[?25h") == "ok"


def test_progress_as_lines_when_not_on_a_terminal(
    mlp_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if sys.platform == "win32":
        pytest.skip("no pseudo-terminals")
    monkeypatch.setattr(_binary, "PROGRESS_INTERVAL", 0.0)
    lca.analyze(
        mlp_run / "ckpts",
        spec=mlp_run / "model.toml",
        out=tmp_path / "out",
        threads=1,
        no_adaptive=True,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "\x1b[" not in err and "\r" not in err
    lines = err.splitlines()
    assert any("evals" in line for line in lines), err
    assert any(line.startswith("analysed 100 steps") for line in lines), err


def test_jupyter_gets_lines_and_a_log_gets_lca_plain(monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform == "win32":
        pytest.skip("no pseudo-terminals")
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    assert _binary._choose_mode(None) == "pipe"  # pytest's captured stderr is no terminal
    assert _binary._choose_mode(False) == "pipe"
    assert _binary._choose_mode(True) == "lines"
    monkeypatch.setitem(sys.modules, "ipykernel", sys)
    assert _binary._choose_mode(None) == "lines"


def test_quiet_pipe_mode_echoes_lcas_closing_lines(
    mlp_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    analyze_mlp(mlp_run, tmp_path / "out", last=3)
    err = capsys.readouterr().err
    assert "analysed 3 steps (0 → 3)" in err


def test_interrupt_stops_lca_with_sigint() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    _binary._interrupt(proc)
    assert proc.returncode == -signal.SIGINT


def test_on_a_terminal_lca_draws_its_own_bar(mlp_run: Path, tmp_path: Path) -> None:
    """With stderr on a terminal, lca's progress bar reaches it, and a failure still raises
    LcaError with lca's message."""
    if sys.platform == "win32":
        pytest.skip("no pseudo-terminals")
    import os
    import pty

    script = (
        "import sys, lca\n"
        "lca.analyze(sys.argv[1], spec=sys.argv[2], out=sys.argv[3], threads=1,\n"
        "            no_adaptive=True)\n"
        "try:\n"
        "    lca.analyze(sys.argv[1] + '-missing', spec=sys.argv[2], out=sys.argv[3])\n"
        "except lca.LcaError as e:\n"
        "    print('caught', e.returncode, e, file=sys.stdout)\n"
    )
    master, slave = pty.openpty()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(lca.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    env["LCA_BIN"] = str(_binary.find_binary())
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(mlp_run / "ckpts"), str(mlp_run / "model.toml"),
         str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=slave, env=env,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout, _ = proc.communicate(timeout=120)
    os.close(master)
    terminal = b"".join(chunks).decode("utf-8", errors="replace")
    assert proc.returncode == 0, terminal
    assert "evals" in terminal  # the bar was drawn
    assert "analysed 100 steps" in terminal
    assert "ckpts-missing" in terminal  # lca's error reached the terminal as it happened
    assert stdout.decode().startswith("caught 2 ")
    assert "ckpts-missing" in stdout.decode()


# -- with lca.Recorder -----------------------------------------------------------------------


def _record_sequential(run: Path, steps: int, act: Any = None) -> None:
    torch = pytest.importorskip("torch")
    from lca.recorder import Recorder

    nn = torch.nn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), act if act is not None else nn.Tanh(), nn.Linear(12, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    with pytest.warns(UserWarning) if act is not None else _no_warning():
        rec = Recorder(model, run, data=(x, y), loss="cross_entropy")
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        opt.step()
        rec.step()
    rec.close()


class _no_warning:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_analyze_a_recorded_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _record_sequential(run, steps=5)
    res = lca.analyze(run, threads=1, progress=False)
    assert res.out == run / "lca-out"
    assert len(res.steps) == 5
    assert list(res.layer_totals["layer"]) == ["0", "2"]
    assert res.lca["0.weight"].shape == (5, 12, 6)
    assert res.delta_loss < 0


def test_a_run_without_spec_names_the_unsupported_ops(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")

    class Sin(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return torch.sin(x)

    run = tmp_path / "run"
    _record_sequential(run, steps=2, act=Sin())
    assert not (run / "model.toml").exists()
    with pytest.raises(lca.LcaError, match="sin") as e:
        lca.analyze(run, progress=False)
    assert "pass spec=" in str(e.value)
    assert e.value.returncode == 2


def test_params_are_built_from_totals_without_params_csv(mlp_run: Path, tmp_path: Path) -> None:
    opts = {"last": 5, "no_lca_tensors": True}
    a = analyze_mlp(mlp_run, tmp_path / "csv", params_csv=True, **opts).params
    compact = analyze_mlp(mlp_run, tmp_path / "compact", **opts)
    assert not (tmp_path / "compact" / "params.csv").exists()
    b = compact.params
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b) == 3466
    assert (a["index"] == b["index"]).all()
    assert (a["helped_steps"].to_numpy() == b["helped_steps"].to_numpy()).all()
    np.testing.assert_array_equal(a["lca"].to_numpy(), b["lca"].to_numpy())
