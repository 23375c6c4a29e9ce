"""The engine's evaluator in process (no worker): models beyond the spec's layer types, MSE,
batch norm on [N, C] features in both modes, against plain autograd in f64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import torch.nn.functional as F  # noqa: E402

from lca.engine import evaluator, loading  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"


def make(
    module, data, *, loss="cross_entropy", bn_mode=None, chunk=100, precision="f64", order=None
):
    extra = {} if order is None else {"data_order": order}
    return evaluator.Evaluator(
        module,
        data,
        loss=loss,
        bn_mode=bn_mode,
        device=torch.device("cpu"),
        precision=precision,
        chunk_size=chunk,
        exported=False,
        **extra,
    )


def theta(ev: evaluator.Evaluator, seed: int = 0) -> torch.Tensor:
    """The module's own values, perturbed (so that no entry sits at its initial value)."""
    sd = ev.module.state_dict()
    flat = torch.cat([sd[c.name].reshape(-1).double() for c in ev.coords])
    g = torch.Generator().manual_seed(seed)
    return flat + 0.05 * torch.randn(flat.shape, generator=g, dtype=torch.float64)


def named(ev: evaluator.Evaluator, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        c.name: flat[c.offset : c.offset + c.numel].view(c.shape).clone().requires_grad_(True)
        for c in ev.coords
    }


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_a_llama_style_model_the_spec_cannot_express() -> None:
    from engine_models import LlamaLM

    data = loading.load_data(
        loading.DataConfig(train=FIX / "gpt/data/train.safetensors", tokens="tokens"),
        "cross_entropy",
    )
    torch.manual_seed(3)
    ev = make(LlamaLM(), data, chunk=100)
    assert ev.count == 256 * 32 and ev.held == []  # rotary tables are non-persistent
    th = theta(ev)
    loss, grad = ev.evaluate(th, want_grad=True)
    ref = LlamaLM().double().eval()
    ts = named(ev, th)
    out = torch.func.functional_call(ref, ts, (data.x,))
    want = F.cross_entropy(out.reshape(-1, out.shape[-1]), data.y.reshape(-1))
    want.backward()
    g = torch.cat([ts[c.name].grad.reshape(-1) for c in ev.coords]).numpy()
    assert abs(loss - want.item()) < 1e-13
    assert grad is not None and rel_err(grad, g) < 1e-12
    assert ev.evaluate(th, want_grad=False)[0] == loss


def test_mse_is_the_mean_over_every_element(tmp_path: Path) -> None:
    from engine_models import Regressor
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    x = rng.normal(size=(301, 5)).astype(np.float32)
    y = rng.normal(size=(301, 2)).astype(np.float64)
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    data = loading.load_data(loading.DataConfig(train=tmp_path / "d.safetensors"), "mse")
    assert data.y.dtype == torch.float32  # targets rounded to f32, as the built-in engine
    ev = make(Regressor(), data, loss="mse", chunk=64)
    assert ev.count == 602
    th = theta(ev)
    loss, grad = ev.evaluate(th, want_grad=True)
    ts = named(ev, th)
    out = torch.func.functional_call(Regressor().double(), ts, (data.x.double(),))
    want = F.mse_loss(out, data.y.double())
    want.backward()
    g = torch.cat([ts[c.name].grad.reshape(-1) for c in ev.coords]).numpy()
    assert abs(loss - want.item()) < 1e-14
    assert grad is not None and rel_err(grad, g) < 1e-12


def mlp_data():
    return loading.load_data(
        loading.DataConfig(train=FIX / "mlp/data/train.safetensors", scale=0.0625),
        "cross_entropy",
    )


def test_batch_stats_normalise_each_chunk() -> None:
    from engine_models import BN1d

    from lca import _order

    data = mlp_data()
    losses = {}
    for order in ["shuffled", "file"]:
        ev = make(BN1d(), data, bn_mode="batch-stats", chunk=500, order=order)
        assert [c.kind for c in ev.coords] == ["parameter"] * 6
        th = theta(ev)
        loss, grad = ev.evaluate(th, want_grad=True)
        # The chunks: rows in lca's permutation of seed 0 by default, else in file order.
        rows = _order.permutation(1797, 0) if order == "shuffled" else list(range(1797))
        x, y = data.x[rows].double(), data.y[rows]
        ref = BN1d().double().train()
        ts = named(ev, th)
        total = torch.zeros((), dtype=torch.float64)
        for a in range(0, 1797, 500):  # chunks 500, 500, 500, 297
            out = torch.func.functional_call(ref, ts, (x[a : a + 500],))
            total = total + F.cross_entropy(out, y[a : a + 500], reduction="sum")
        (total / 1797).backward()
        g = torch.cat([ts[c.name].grad.reshape(-1) for c in ev.coords]).numpy()
        assert abs(loss - total.item() / 1797) < 1e-13
        assert grad is not None and rel_err(grad, g) < 1e-12
        assert (ev.data_order, ev.data_seed) == (order, 0 if order == "shuffled" else None)
        losses[order] = loss
    # The row order is part of the loss with batch statistics.
    assert abs(losses["shuffled"] - losses["file"]) > 1e-6
    # Another chunk size is another loss.
    other = make(BN1d(), data, bn_mode="batch-stats", chunk=256).evaluate(th, want_grad=False)[0]
    assert abs(other - loss) > 1e-6


def test_running_stats_are_coordinates_with_gradients() -> None:
    from engine_models import BN1d

    data = mlp_data()
    ev = make(BN1d(), data, bn_mode="running-stats", chunk=500)
    kinds = {c.name: c.kind for c in ev.coords}
    assert kinds["bn.running_mean"] == "buffer" and kinds["bn.running_var"] == "buffer"
    assert [h[0] for h in ev.held] == ["bn.num_batches_tracked"]
    th = theta(ev)
    var = next(c for c in ev.coords if c.name == "bn.running_var")
    th[var.offset : var.offset + var.numel] = th[var.offset : var.offset + var.numel].abs() + 0.5
    loss, grad = ev.evaluate(th, want_grad=True)
    # The loss is PyTorch's native eval-mode batch norm.
    ref = BN1d().double().eval()
    with torch.no_grad():
        out = torch.func.functional_call(ref, named(ev, th), (data.x.double(),))
        assert abs(loss - F.cross_entropy(out, data.y).item()) < 1e-13
    # The running statistics' gradients match central differences.
    assert grad is not None
    for name in ("bn.running_mean", "bn.running_var"):
        c = next(c for c in ev.coords if c.name == name)
        for i in (0, 7, 15):
            k = c.offset + i
            h = 1e-6
            up, down = th.clone(), th.clone()
            up[k] += h
            down[k] -= h
            fd = (ev.evaluate(up, False)[0] - ev.evaluate(down, False)[0]) / (2 * h)
            assert abs(fd - grad[k]) < 1e-7 + 1e-5 * abs(fd), (name, i, fd, grad[k])


def test_f32_evaluation_rounds_only() -> None:
    from engine_models import BN1d

    data = mlp_data()
    e64 = make(BN1d(), data, bn_mode="running-stats", chunk=256)
    th = theta(e64)
    var = next(c for c in e64.coords if c.name == "bn.running_var")
    th[var.offset : var.offset + var.numel] = th[var.offset : var.offset + var.numel].abs() + 0.5
    l64, g64 = e64.evaluate(th, True)
    e32 = make(BN1d(), data, bn_mode="running-stats", chunk=256, precision="f32")
    l32, g32 = e32.evaluate(th.float(), True)
    assert g64 is not None and g32 is not None and g32.dtype == np.float64
    assert abs(l32 - l64) < 1e-6 * abs(l64) and rel_err(g32, g64) < 1e-5


def test_missing_bn_mode_and_non_finite_results_are_errors() -> None:
    from engine_models import BN1d

    data = mlp_data()
    with pytest.raises(ValueError, match="--bn-mode"):
        make(BN1d(), data)
    ev = make(BN1d(), data, bn_mode="batch-stats")
    th = theta(ev)
    th[3] = float("nan")
    with pytest.raises(evaluator.NumericError, match="loss is nan"):
        ev.evaluate(th, want_grad=True)


def test_torchvision_resnet18_in_running_stats_mode() -> None:
    """torchvision's resnet18, unchanged (in-place ReLUs, 20 batch norms): the loss is PyTorch's
    eval mode, the parameters' gradients are native autograd's, and the running statistics
    are coordinates of θ."""
    tv = pytest.importorskip("torchvision")
    g = torch.Generator().manual_seed(7)
    x = torch.rand(12, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (12,), generator=g)
    data = loading.Dataset(path=Path("random"), x=x, y=y, n=12)
    torch.manual_seed(0)
    ev = make(tv.models.resnet18(num_classes=10), data, bn_mode="running-stats", chunk=5)
    assert sum(c.kind == "buffer" for c in ev.coords) == 40
    th = theta(ev)
    for c in ev.coords:
        if c.name.endswith("running_var"):
            th[c.offset : c.offset + c.numel] = th[c.offset : c.offset + c.numel].abs() + 0.5
    loss, grad = ev.evaluate(th, want_grad=True)
    ref = tv.models.resnet18(num_classes=10).double().eval()
    ts = named(ev, th)
    for c in ev.coords:
        if c.kind == "buffer":
            ts[c.name] = ts[c.name].detach()
    want = F.cross_entropy(torch.func.functional_call(ref, ts, (x.double(),)), y)
    want.backward()
    assert abs(loss - want.item()) < 1e-12
    assert grad is not None
    params = [c for c in ev.coords if c.kind == "parameter"]
    got = np.concatenate([grad[c.offset : c.offset + c.numel] for c in params])
    g_ref = torch.cat([ts[c.name].grad.reshape(-1) for c in params]).numpy()
    assert rel_err(got, g_ref) < 1e-10
    bufs = [c for c in ev.coords if c.kind == "buffer"]
    assert all(np.abs(grad[c.offset : c.offset + c.numel]).max() > 0 for c in bufs)
