"""The PyTorch engine's worker, driven through its binary protocol as the `lca` binary drives it
(lca.engine.client): agreement with the fixtures' float64 PyTorch oracles, determinism, and
the failures (import error, dead worker, out of memory, bad requests)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_numpy = pytest.importorskip("safetensors.numpy")
load_file = safetensors_numpy.load_file

from lca.engine import protocol  # noqa: E402
from lca.engine.client import EngineClient, WorkerError  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
MODELS = Path(__file__).resolve().parent / "engine_models.py"


def model(name: str) -> str:
    return f"{MODELS}:{name}"


def ckpt(fixture: str, t: int) -> dict[str, np.ndarray]:
    return load_file(str(FIX / fixture / "ckpts" / f"ckpt_{t}.safetensors"))


def point(c: EngineClient, fixture: str, t: int, s: str) -> np.ndarray:
    """θ_t + s·Δθ_t in f64 as the oracle forms it (the end point is checkpoint t+1 itself)."""
    a = c.flatten(ckpt(fixture, t)).astype(np.float64)
    if s == "0":
        return a
    b = c.flatten(ckpt(fixture, t + 1)).astype(np.float64)
    if s == "1":
        return b
    return a + 0.5 * (b - a)


def oracle(grads: dict[str, np.ndarray], c: EngineClient, t: int, s: str):
    """The oracle's loss and gradient at (t, s), in the worker's layout."""
    g = np.concatenate([grads[f"step{t}/s{s}/{x['name']}"].reshape(-1) for x in c.hello["tensors"]])
    return float(grads[f"step{t}/s{s}/loss"][0]), g


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = {
    # name: (worker args, golden dir, checkpoint fixture, points)
    "mlp": (
        ["--model", model("mlp"), "--spec", str(FIX / "mlp/model.toml")],
        FIX / "mlp/golden",
        "mlp",
        [(0, "0"), (1, "0.5"), (50, "1"), (99, "0.5")],
    ),
    "cnn": (
        ["--model", model("cnn"), "--spec", str(FIX / "cnn/model.toml")],
        FIX / "cnn/golden",
        "cnn",
        [(0, "0"), (30, "0.5"), (59, "1")],
    ),
    "gpt": (
        ["--model", model("gpt"), "--spec", str(FIX / "gpt/model.toml")],
        FIX / "gpt/golden",
        "gpt",
        [(0, "0.5"), (30, "1")],
    ),
    "resnet-batch-stats": (
        # The oracle evaluated the rows in file order.
        [
            "--model",
            model("resnet"),
            "--spec",
            str(FIX / "resnet/model_batch_stats.toml"),
            "--data-order",
            "file",
        ],
        FIX / "resnet/golden/batch_stats",
        "resnet",
        [(0, "0"), (39, "0.5")],
    ),
    "resnet-running-stats": (
        ["--model", model("resnet"), "--spec", str(FIX / "resnet/model_running_stats.toml")],
        FIX / "resnet/golden/running_stats",
        "resnet",
        [(0, "0.5"), (39, "1")],
    ),
}


# The oracles' inputs are the preprocessed data in f64; lca (both engines) rounds preprocessed
# inputs to f32, as its built-in engine does. That is exact for every fixture but cnn, whose
# (x/16 - 0.3)/0.45 is not: there the oracle agrees to the input rounding only (loss 1.6e-10,
# gradient 2.2e-8 relative), and
# test_f64_cnn_agrees_with_direct_autograd_on_lcas_inputs checks the worker to 1e-12.
TOL = {"cnn": (1e-9, 1e-7)}


# The oracles' inputs are the preprocessed data in f64; lca (both engines) rounds preprocessed
# inputs to f32, as its built-in engine does. That is exact for every fixture but cnn, whose
# (x/16 - 0.3)/0.45 is not: there the oracle agrees to the input rounding only (loss ~3e-9,
# gradient ~2e-8 relative), and test_f64_cnn_agrees_with_direct_autograd_on_lcas_inputs checks
# the worker to 1e-12.
TOL = {"cnn": (1e-8, 1e-7)}


def check_layout(case: str, h: dict) -> None:
    """What the hello announces: θ's layout in state_dict order, with offsets."""
    assert h["protocol"] == protocol.PROTOCOL_VERSION
    assert h["tf32"] is False and h["deterministic"] is True
    assert sum(t["numel"] for t in h["tensors"]) == h["numel"]
    offsets = [t["offset"] for t in h["tensors"]]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    names = [(t["name"], t["kind"]) for t in h["tensors"]]
    if case == "resnet-running-stats":
        assert names[:5] == [
            ("conv1.weight", "parameter"),
            ("bn1.weight", "parameter"),
            ("bn1.bias", "parameter"),
            ("bn1.running_mean", "buffer"),
            ("bn1.running_var", "buffer"),
        ]
        assert h["batch_norm"] == "running-stats"
        assert "bn1.num_batches_tracked" in [b["name"] for b in h["held_buffers"]]
    elif case == "resnet-batch-stats":
        assert all(k == "parameter" for _, k in names)
        assert h["batch_norm"] == "batch-stats" and h["chunk_size"] == 512
        assert h["n_chunks"] == 4
        assert h["data_order"] == "file" and h["data_seed"] is None
    elif case == "gpt":
        assert h["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
        assert h["n_samples"] == 256 and h["n_terms"] == 256 * 32
        assert names[0] == ("transformer.wte.weight", "parameter")
    else:
        assert h["batch_norm"] is None and h["aliases"] == {}
    if h["batch_norm"] != "batch-stats":
        # Without batch statistics the order does not matter: file order, whatever was asked.
        assert h["data_order"] == "file" and h["data_seed"] is None


@pytest.mark.parametrize("case", list(CASES))
def test_f64_agrees_with_the_pytorch_oracle(case: str) -> None:
    args, golden, fixture, points = CASES[case]
    tol, gtol = TOL.get(case, (1e-10, 1e-10))
    grads = load_file(str(golden / "grads.safetensors"))
    with EngineClient([*args, "--precision", "f64"]) as c:
        assert c.hello["precision"] == "f64" and c.hello["theta_dtype"] == "f64"
        check_layout(case, c.hello)
        for i, (t, s) in enumerate(points):
            want_loss, want = oracle(grads, c, t, s)
            th = point(c, fixture, t, s)
            if i == 0:
                assert abs(c.loss(th) - want_loss) < tol
            r = c.loss_grad(th)
            assert abs(r.loss - want_loss) < tol, (t, s, r.loss, want_loss)
            assert r.grad is not None
            assert rel_err(r.grad, want) < gtol, (t, s, rel_err(r.grad, want))


def test_f64_cnn_agrees_with_direct_autograd_on_lcas_inputs() -> None:
    """The CNN in f64 on lca's inputs (preprocessed in f64, rounded to f32), in one pass with
    plain autograd, against the worker's chunked evaluation."""
    from engine_models import CNN

    d = load_file(str(FIX / "cnn/data/train.safetensors"))
    x = torch.from_numpy(((d["x"].astype(np.float64) * 0.0625 - 0.3) / 0.45).astype(np.float32))
    y = torch.from_numpy(d["y"].astype(np.int64))
    net = CNN().double()
    net.load_state_dict({k: torch.from_numpy(v).double() for k, v in ckpt("cnn", 30).items()})
    loss = torch.nn.functional.cross_entropy(net(x.double()), y)
    loss.backward()
    want = np.concatenate([p.grad.numpy().reshape(-1) for p in net.parameters()])
    with EngineClient([*CASES["cnn"][0], "--precision", "f64"]) as c:
        assert [t["name"] for t in c.hello["tensors"]] == [n for n, _ in net.named_parameters()]
        r = c.loss_grad(c.flatten(ckpt("cnn", 30)))
    assert abs(r.loss - loss.item()) < 1e-13
    assert r.grad is not None and rel_err(r.grad, want) < 1e-12


@pytest.mark.parametrize("case", ["gpt", "resnet-running-stats"])
def test_f32_agrees_within_f32_rounding(case: str) -> None:
    args, golden, fixture, points = CASES[case]
    grads = load_file(str(golden / "grads.safetensors"))
    with EngineClient([*args, "--precision", "f32"]) as c:
        assert c.hello["theta_dtype"] == "f32"
        t, s = points[-1]
        th = point(c, fixture, t, s).astype(np.float32)
        want_loss, want = oracle(grads, c, t, s)
        r = c.loss_grad(th)
        assert r.grad is not None
        assert abs(r.loss - want_loss) < 1e-5 * abs(want_loss)
        assert rel_err(r.grad, want) < 1e-5


MLP_ARGS = ["--model", model("mlp"), "--spec", str(FIX / "mlp/model.toml")]


@pytest.fixture(scope="module")
def mlp32():
    """One f32 MLP worker shared by the tests that do not end it."""
    with EngineClient([*MLP_ARGS, "--chunk-size", "100"]) as c:
        yield c


def test_f32_mlp_and_same_theta_gives_the_same_bits(mlp32: EngineClient) -> None:
    c = mlp32
    grads = load_file(str(FIX / "mlp/golden/grads.safetensors"))
    th = c.flatten(ckpt("mlp", 50))
    a, b = c.loss_grad(th), c.loss_grad(th)
    want_loss, want = oracle(grads, c, 50, "0")
    assert a.grad is not None and b.grad is not None
    assert abs(a.loss - want_loss) < 1e-6 and rel_err(a.grad, want) < 1e-5
    assert a.loss == b.loss and a.grad.tobytes() == b.grad.tobytes()
    assert c.hello["chunk_size"] == 100 and c.hello["n_chunks"] == 18
    # Another worker, the same chunks: the same bits; other chunks: only rounding differs.
    d = EngineClient([*MLP_ARGS, "--chunk-size", "100"])
    e = d.loss_grad(th)
    assert e.loss == a.loss and e.grad is not None and e.grad.tobytes() == a.grad.tobytes()
    assert d.close() == 0  # shutdown: `bye`, exit status 0
    with EngineClient([*MLP_ARGS, "--chunk-size", "1797"]) as d:
        e = d.loss_grad(th)
        assert e.grad is not None and abs(e.loss - a.loss) < 1e-6
        assert rel_err(e.grad, a.grad) < 1e-5


def test_dropout_is_off_and_model_prints_do_not_reach_the_protocol() -> None:
    """nn.Sequential with Dropout (module names 0, 3, 6), whose factory prints to stdout."""
    grads = load_file(str(FIX / "mlp/golden/grads.safetensors"))
    spec = ["--spec", str(FIX / "mlp/model.toml"), "--precision", "f64"]
    with EngineClient(["--model", model("mlp_with_dropout"), *spec], stderr=subprocess.PIPE) as c:
        assert [t["name"] for t in c.hello["tensors"]][:2] == ["0.weight", "0.bias"]
        for t, s in [(1, "0"), (99, "1")]:
            ck = ckpt("mlp", t + (s == "1"))
            ren = {
                k.replace("fc1", "0").replace("fc2", "3").replace("fc3", "6"): v
                for k, v in ck.items()
            }
            r = c.loss_grad(c.flatten(ren))
            want_loss = float(grads[f"step{t}/s{s}/loss"][0])
            want = np.concatenate(
                [
                    grads[f"step{t}/s{s}/fc{i}.{p}"].reshape(-1)
                    for i in (1, 2, 3)
                    for p in ("weight", "bias")
                ]
            )
            assert abs(r.loss - want_loss) < 1e-10
            assert r.grad is not None and rel_err(r.grad, want) < 1e-10
        assert c.close() == 0
        assert c.proc.stderr is not None
        assert b"hello from the model's code on stdout" in c.proc.stderr.read()


def test_a_recorder_run_and_an_exported_program(tmp_path: Path) -> None:
    from engine_models import MLP

    data = FIX / "mlp/data/train.safetensors"
    run = {
        "model": {"factory": f"{MODELS}:mlp", "args": [], "kwargs": {}},
        "data": {"train": str(data), "x": "x", "y": "y", "scale": 0.0625},
        "loss": "cross_entropy",
    }
    (tmp_path / "lca-run.json").write_text(json.dumps(run))
    ck = ckpt("mlp", 0)
    grads = load_file(str(FIX / "mlp/golden/grads.safetensors"))
    want = float(grads["step0/s0/loss"][0])
    with EngineClient(["--model", str(tmp_path), "--precision", "f64"]) as c:
        assert abs(c.loss(c.flatten(ck)) - want) < 1e-12
    batch = torch.export.Dim("batch")
    ep = torch.export.export(
        MLP().double(),
        (torch.zeros(2, 64, dtype=torch.float64),),
        dynamic_shapes={"x": {0: batch}},
    )
    torch.export.save(ep, str(tmp_path / "model.pt2"))
    run = {"model": {"exported": "model.pt2"}, "data": run["data"], "loss": "cross_entropy"}
    (tmp_path / "lca-run.json").write_text(json.dumps(run))
    with EngineClient(["--model", str(tmp_path / "lca-run.json"), "--precision", "f64"]) as c:
        assert c.hello["exported"] is True
        assert [t["name"] for t in c.hello["tensors"]][:2] == ["fc1.weight", "fc1.bias"]
        r = c.loss_grad(c.flatten(ck))
        _, g = oracle(grads, c, 0, "0")
        assert abs(r.loss - want) < 1e-12 and r.grad is not None and rel_err(r.grad, g) < 1e-12


# ---------------------------------------------------------------------------------- failures


def test_import_errors_are_reported_with_their_cause() -> None:
    spec = ["--spec", str(FIX / "mlp/model.toml")]
    cases = [
        (model("broken"), "this factory fails on purpose"),
        ("no_such_package_xyz.models:net", "No module named 'no_such_package_xyz'"),
    ]
    for ref, text in cases:
        with pytest.raises(WorkerError) as e:
            EngineClient(["--model", ref, *spec], stderr=subprocess.DEVNULL)
        assert e.value.kind == "import_error", e.value
        assert text in e.value.message
        assert e.value.returncode == 2


def test_model_references_resolve_or_say_why(tmp_path: Path) -> None:
    """In process: what the worker does with --model before it answers hello."""
    from lca.engine import loading

    ref = loading.parse_model_arg(model("mlp"), {}).model
    assert isinstance(loading.load_module(ref)[0], torch.nn.Module)
    for spec, text in [
        (model("no_such_factory"), "has no attribute 'no_such_factory'"),
        (str(ROOT / "nowhere.py") + ":f", "does not exist"),
    ]:
        with pytest.raises(loading.ModelImportError, match=text):
            loading.load_module(loading.parse_model_arg(spec, {}).model)
    for spec, text in [
        ("resnet18", "expected lca-run.json"),
        (str(tmp_path / "lca-run.json"), "no such run file"),
    ]:
        with pytest.raises(loading.ConfigError, match=text):
            loading.parse_model_arg(spec, {})
    (tmp_path / "lca-run.json").write_text('{"loss": "mse"}')
    with pytest.raises(loading.ConfigError, match="names no model"):
        loading.parse_model_arg(str(tmp_path), {})


def test_config_errors_name_the_problem() -> None:
    from lca.engine import evaluator, loading

    with pytest.raises(WorkerError) as e:
        EngineClient(
            ["--model", model("resnet"), "--data", str(FIX / "resnet/data/train.safetensors")]
            + ["--loss", "cross_entropy"],
            stderr=subprocess.DEVNULL,
        )
    assert e.value.kind == "config_error" and "--bn-mode" in e.value.message
    assert e.value.returncode == 2
    cfg = loading.DataConfig(train=FIX / "mlp/data/train.safetensors", x="pixels")
    with pytest.raises(loading.ConfigError, match="no tensor 'pixels'"):
        loading.load_data(cfg, "cross_entropy")
    cfg = loading.DataConfig(train=FIX / "cnn/data/train.safetensors", scale=0.0625)
    data = loading.load_data(cfg, "cross_entropy")
    with pytest.raises(ValueError, match=r"cannot evaluate the training set's inputs \[1, 8, 8\]"):
        evaluator.Evaluator(
            loading.load_module(loading.parse_model_arg(model("mlp"), {}).model)[0],
            data,
            loss="cross_entropy",
            bn_mode=None,
            device=torch.device("cpu"),
            precision="f32",
            chunk_size=256,
            exported=False,
        )
    cfg = loading.DataConfig(train=FIX / "cnn/data/train.safetensors", mean=[0.1, 0.2])
    with pytest.raises(loading.ConfigError, match="`data.mean` has 2 values"):
        loading.load_data(cfg, "cross_entropy")


def test_preprocessing_is_lcas() -> None:
    """scale, then mean and std per channel (axis 1), in f64, rounded to f32; input_shape
    reshapes; tokens split into inputs and next-token targets."""
    from lca.engine import loading

    cfg = loading.DataConfig(
        train=FIX / "mlp/data/train.safetensors", scale=0.0625, mean=[0.3], std=[0.45]
    )
    cfg.input_shape = [1, 8, 8]
    d = loading.load_data(cfg, "cross_entropy")
    raw = load_file(str(FIX / "mlp/data/train.safetensors"))
    want = ((raw["x"].astype(np.float64) * 0.0625 - 0.3) / 0.45).astype(np.float32)
    assert d.x.dtype == torch.float32 and list(d.x.shape) == [1797, 1, 8, 8]
    assert np.array_equal(d.x.numpy().reshape(1797, 64), want)
    assert d.y.dtype == torch.int64
    g = loading.load_data(
        loading.DataConfig(train=FIX / "gpt/data/train.safetensors", tokens="tokens"),
        "cross_entropy",
    )
    tok = load_file(str(FIX / "gpt/data/train.safetensors"))["tokens"].astype(np.int64)
    assert np.array_equal(g.x.numpy(), tok[:, :-1]) and np.array_equal(g.y.numpy(), tok[:, 1:])


def test_out_of_memory_ends_with_a_hint() -> None:
    env = dict(os.environ, LCA_ENGINE_TEST_OOM="1")
    c = EngineClient([*MLP_ARGS, "--chunk-size", "200"], env=env, stderr=subprocess.DEVNULL)
    with pytest.raises(WorkerError) as e:
        c.loss_grad(c.flatten(ckpt("mlp", 0)))
    assert e.value.kind == "out_of_memory"
    assert e.value.hint is not None and "--chunk-size 100" in e.value.hint
    assert e.value.returncode == 3


def test_a_worker_killed_mid_request_is_reported() -> None:
    env = dict(os.environ, LCA_ENGINE_TEST_DELAY_S="30")
    c = EngineClient(MLP_ARGS, env=env, stderr=subprocess.DEVNULL)
    th = c.flatten(ckpt("mlp", 0))
    c._send({"cmd": "loss_grad", "id": 1, "dtype": "f32", "numel": c.numel}, th.tobytes())
    time.sleep(0.3)
    os.kill(c.proc.pid, signal.SIGKILL)
    with pytest.raises(WorkerError) as e:
        c._read()
    assert e.value.kind == "died" and e.value.returncode == -signal.SIGKILL
    with pytest.raises(WorkerError) as e:  # and a request to a dead worker
        c.loss(th)
    assert e.value.kind == "died"


def test_bad_requests_get_an_error_and_the_worker_goes_on(mlp32: EngineClient) -> None:
    c = mlp32
    th = c.flatten(ckpt("mlp", 0))
    c._send({"cmd": "loss", "id": 5, "dtype": "f32", "numel": 3}, b"\0" * 12)
    with pytest.raises(WorkerError) as e:
        c._read()
    assert e.value.kind == "bad_request" and "3466" in e.value.message
    c._send({"cmd": "frobnicate", "id": 6})
    with pytest.raises(WorkerError) as e:
        c._read()
    assert e.value.kind == "bad_request" and "frobnicate" in e.value.message
    assert c.loss(th) == pytest.approx(2.3045090391, abs=1e-6)
    # A non-finite θ gives a `numeric` error, not a crash.
    bad = th.copy()
    bad[0] = np.inf
    with pytest.raises(WorkerError) as e:
        c.loss_grad(bad)
    assert e.value.kind == "numeric"
    # θ may also come as f64 to an f32 worker (rounded there).
    c._send({"cmd": "loss", "id": 7, "dtype": "f64", "numel": c.numel}, th.astype("<f8").tobytes())
    h, p = c._read()
    assert h["cmd"] == "result" and h["id"] == 7 and h["numel"] == 0 and len(p) == 8
    assert struct.unpack("<d", bytes(p))[0] == c.loss(th)


def test_a_broken_frame_ends_the_worker_and_eof_ends_it_cleanly() -> None:
    c = EngineClient(MLP_ARGS, stderr=subprocess.DEVNULL)
    assert c.proc.stdin is not None
    c.proc.stdin.write(b"XXXX" + struct.pack("<IIQ", 1, 2, 0) + b"{}")
    c.proc.stdin.flush()
    with pytest.raises(WorkerError) as e:
        c._read()
    assert e.value.kind == "bad_request" and "magic" in e.value.message
    assert c.proc.wait(timeout=30) == 2
    c = EngineClient(MLP_ARGS)
    assert c.proc.stdin is not None
    c.proc.stdin.close()
    assert c.proc.wait(timeout=30) == 0


def test_import_lca_imports_neither_torch_nor_the_engine() -> None:
    code = (
        "import sys, lca; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert 'lca.engine' not in sys.modules, 'lca.engine'"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    code = "import sys, lca.engine.client; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_protocol_round_trip_and_limits() -> None:
    import io

    msg = protocol.encode({"cmd": "loss", "numel": 2}, struct.pack("<2f", 1.0, 2.0))
    assert msg[:4] == b"LCAW" and struct.unpack("<IIQ", msg[4:20])[0] == 1
    h, p = protocol.read_message(io.BytesIO(msg))
    assert h == {"cmd": "loss", "numel": 2} and bytes(p) == struct.pack("<2f", 1.0, 2.0)
    with pytest.raises(protocol.EndOfStream):
        protocol.read_message(io.BytesIO(b""))
    with pytest.raises(protocol.ProtocolError, match="ended"):
        protocol.read_message(io.BytesIO(msg[:-1]))
    with pytest.raises(protocol.ProtocolError, match="exceeds"):
        protocol.read_message(io.BytesIO(msg), max_payload=4)
    bad = msg[:4] + struct.pack("<I", 9) + msg[8:]
    with pytest.raises(protocol.ProtocolError, match="version 9"):
        protocol.read_message(io.BytesIO(bad))
