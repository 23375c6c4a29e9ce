"""lca.Recorder on real models: record while training, then `lca analyze` the run unedited.

For each model lca's step-0 loss must equal PyTorch's (stored by the Recorder in checkpoint 0)
within float32 rounding (`_runs.REL_TOL`), and a deliberately wrong spec must change the loss by
more than that tolerance, so that a comparison of the two catches it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _runs import REL_TOL, analyze, close, edit_spec, lca_loss0, torch_loss_of, train
from models.cnn import CustomCNN, RMSNormNet, SinMLP
from models.gpt import GPT, GPTConfig
from safetensors import safe_open
from safetensors.torch import load_file

import lca.recorder
from lca.recorder import Recorder


def _checkpoint_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    )


def test_mlp_tanh_records_and_matches(tmp_path: Path, lca_bin: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(300, 10), torch.randint(0, 4, (300,))
    run = tmp_path / "run"
    rec = train(model, run, x, y, "cross_entropy", steps=3, lr=0.1)
    assert rec.message == ""

    # Layout: data once, spec, manifest, one checkpoint per step (0..3), model.pt2.
    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert files == [f"step_{t:06d}.safetensors" for t in range(4)]
    assert not [p for p in run.rglob(".*partial*")], "temporary files left behind"
    data = load_file(str(run / "data" / "train.safetensors"))
    assert torch.equal(data["x"], x) and torch.equal(data["y"], y)
    for t in range(4):
        meta = _checkpoint_meta(run / "checkpoints" / f"step_{t:06d}.safetensors")
        assert meta["step"] == str(t)
        assert ("lca.torch_loss" in meta) == (t == 0)
    final = load_file(str(run / "checkpoints" / "step_000003.safetensors"))
    for k, v in model.state_dict().items():
        assert torch.equal(final[k], v), k

    spec = (run / "model.toml").read_text()
    assert spec.count('type = "tanh"') == 2 and 'type = "relu"' not in spec
    manifest = json.loads((run / "lca-run.json").read_text())
    assert manifest["format_version"] == lca.recorder.FORMAT_VERSION
    assert manifest["spec"] == "model.toml" and manifest["unsupported"] == []
    assert manifest["data"]["file"] == "data/train.safetensors"
    assert manifest["data"]["samples"] == 300
    assert manifest["checkpoints"] == "checkpoints"
    assert manifest["loss"] == "cross_entropy"
    assert manifest["torch_version"] == torch.__version__
    assert manifest["steps_recorded"] == 3 and manifest["closed"] is True

    # PyTorch's loss at θ_0, recomputed here from the stored checkpoint.
    theta0 = load_file(str(run / "checkpoints" / "step_000000.safetensors"))
    fresh = _mlp()
    fresh.load_state_dict(theta0)
    with torch.no_grad():
        expect = float(nn.functional.cross_entropy(fresh(x), y, reduction="sum").double() / 300)
    assert math.isclose(torch_loss_of(run), expect, rel_tol=1e-6)

    # lca reads the run as recorded.
    res = analyze(lca_bin, run, tmp_path / "out")
    assert len(res["steps"]) == 3
    assert close(lca_loss0(res), torch_loss_of(run)), (lca_loss0(res), torch_loss_of(run))

    # Tanh drafted as ReLU (the case): the loss moves by far more than the tolerance.
    wrong = edit_spec(run, run / "wrong.toml", 'type = "tanh"', 'type = "relu"')
    bad = lca_loss0(analyze(lca_bin, run, tmp_path / "out_wrong", spec=wrong, quick=True))
    assert not close(bad, torch_loss_of(run)), (bad, torch_loss_of(run))

    # The exported program rebuilds the module without the user's code.
    assert manifest["model"]["exported"] == "model.pt2"
    ep = torch.export.load(str(run / "model.pt2"))
    with torch.no_grad():
        out = ep.module()(x[:50])
        fresh.eval()
        assert torch.allclose(out, fresh(x[:50]), atol=1e-6)


def test_gpt_tied_head_records_and_matches(tmp_path: Path, lca_bin: Path) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = GPT(cfg)
    # Sharper attention than at initialisation, so the head count shows in the loss.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(25.0)
    tokens = torch.randint(0, cfg.vocab_size, (96, cfg.block_size + 1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    run = tmp_path / "run"
    rec = train(
        model, run, x, y, "cross_entropy", steps=2, lr=0.05, factory="models.gpt:GPT", export=False
    )
    assert rec.message == ""
    spec = (run / "model.toml").read_text()
    assert spec.count('type = "causal_self_attention"') == 2
    assert spec.count("n_head = 4") == 2
    assert 'tied = { weight = "transformer.wte.weight" }' in spec
    assert 'type = "positional_embedding"' in spec

    # The tied tensor is stored once, under the name the spec owns it by.
    with safe_open(str(run / "checkpoints" / "step_000002.safetensors"), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        wte = f.get_tensor("transformer.wte.weight")
    assert "transformer.wte.weight" in keys and "lm_head.weight" not in keys
    assert meta["lm_head.weight"] == "transformer.wte.weight"
    assert torch.equal(wte, model.lm_head.weight.detach())
    manifest = json.loads((run / "lca-run.json").read_text())
    assert manifest["model"]["factory"] == "models.gpt:GPT"
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}

    res = analyze(lca_bin, run, tmp_path / "out")
    assert close(lca_loss0(res), torch_loss_of(run)), (lca_loss0(res), torch_loss_of(run))
    assert res["summary"]["model"]["params"][0]["name"] == "transformer.wte.weight"

    # n_head 4 -> 1: the silent mistake of issue 17.
    wrong = edit_spec(run, run / "wrong.toml", "n_head = 4", "n_head = 1", count=2)
    bad = lca_loss0(analyze(lca_bin, run, tmp_path / "out_wrong", spec=wrong, quick=True))
    assert abs(bad - torch_loss_of(run)) > 10 * REL_TOL * torch_loss_of(run), bad


def test_custom_cnn_nested_records_and_matches(tmp_path: Path, lca_bin: Path) -> None:
    torch.manual_seed(0)
    model = CustomCNN()
    x, y = torch.randn(200, 1, 12, 12), torch.randint(0, 10, (200,))
    run = tmp_path / "run"
    train(model, run, x, y, "cross_entropy", steps=2, lr=0.05, export=False)
    spec = (run / "model.toml").read_text()
    assert 'batch_norm = "running-stats"' in spec
    assert "negative_slope = 0.1" in spec and 'approximate = "tanh"' in spec
    res = analyze(lca_bin, run, tmp_path / "out")
    assert close(lca_loss0(res), torch_loss_of(run)), (lca_loss0(res), torch_loss_of(run))
    # (GELU's tanh form for its exact form moves this loss by only ~1e-7: below float rounding
    # of the comparison, which is why the spec must come from the module, not from a check.)
    wrong = edit_spec(run, run / "wrong.toml", "negative_slope = 0.1", "negative_slope = 0.01")
    bad = lca_loss0(analyze(lca_bin, run, tmp_path / "out_wrong", spec=wrong, quick=True))
    assert not close(bad, torch_loss_of(run)), (bad, torch_loss_of(run))
    wrong = edit_spec(
        run, run / "wrong2.toml", "count_include_pad = false", "count_include_pad = true"
    )
    bad = lca_loss0(analyze(lca_bin, run, tmp_path / "out_wrong2", spec=wrong, quick=True))
    assert not close(bad, torch_loss_of(run)), (bad, torch_loss_of(run))


def test_batch_stats_mode_matches(tmp_path: Path, lca_bin: Path) -> None:
    torch.manual_seed(1)
    model = CustomCNN()
    x, y = torch.randn(100, 1, 12, 12), torch.randint(0, 10, (100,))
    run = tmp_path / "run"
    train(
        model,
        run,
        x,
        y,
        "cross_entropy",
        steps=1,
        export=False,
        batch_norm="batch-stats",
        chunk_size=40,
    )
    spec = (run / "model.toml").read_text()
    assert 'batch_norm = "batch-stats"' in spec and "chunk_size = 40" in spec
    assert _checkpoint_meta(run / "checkpoints" / "step_000000.safetensors")["lca.batch_norm"] == (
        "batch-stats"
    )
    res = analyze(lca_bin, run, tmp_path / "out", quick=True)
    assert close(lca_loss0(res), torch_loss_of(run)), (lca_loss0(res), torch_loss_of(run))


@pytest.mark.parametrize("model_cls", [SinMLP, RMSNormNet])
def test_unsupported_model_still_records(tmp_path: Path, model_cls: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = model_cls()
    x, y = torch.randn(50, 8), torch.randint(0, 3, (50,))
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="lca cannot evaluate"):
        rec = train(model, run, x, y, "cross_entropy", steps=2, export=False)
    assert not (run / "model.toml").exists()
    assert rec.spec_path is None
    manifest = json.loads((run / "lca-run.json").read_text())
    assert manifest["spec"] is None
    [op] = manifest["unsupported"]
    if model_cls is SinMLP:
        assert op["op"] == "torch.sin" and op["where"] == ""
        assert "cnn.py" in op["source"] and "torch.sin(self.fc1(x))" in op["source"]
        assert "torch.sin" in rec.message and "cnn.py" in rec.message
    else:
        assert op["op"].endswith("RMSNorm") and op["where"] == "block.1"
        assert "block.1" in rec.message
    assert len(list((run / "checkpoints").iterdir())) == 3
    assert (
        float(_checkpoint_meta(run / "checkpoints" / "step_000000.safetensors")["lca.torch_loss"])
        > 0
    )


def test_every_and_torch_loss_every(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(40, 10), torch.randn(40, 4)
    run = tmp_path / "run"
    train(model, run, x, y, "mse", steps=5, every=2, torch_loss_every=4, export=False)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    # 0, 2, 4 by `every`, and 5 written by close() so the last state is kept.
    assert names == [f"step_{t:06d}.safetensors" for t in (0, 2, 4, 5)]
    metas = {
        t: _checkpoint_meta(run / "checkpoints" / f"step_{t:06d}.safetensors") for t in (0, 2, 4, 5)
    }
    assert [t for t, m in metas.items() if "lca.torch_loss" in m] == [0, 4]
    with torch.no_grad():
        model.eval()
        expect = float(((model(x) - y) ** 2).double().mean())
    assert math.isclose(
        lca.recorder.torch_loss(model, x, y, "mse", chunk_size=7)[0], expect, rel_tol=1e-6
    )
    assert 'type = "mse"' in (run / "model.toml").read_text()


def test_dataset_and_dataloader_are_read_in_order(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader, Dataset

    class Squares(Dataset[tuple[torch.Tensor, int]]):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
            return torch.full((10,), float(i)) * 0.5, i % 4  # the transform: * 0.5

    model = _mlp()
    for name, data in (
        ("ds", Squares()),
        ("dl", DataLoader(Squares(), batch_size=3, shuffle=True)),
    ):
        Recorder(model, tmp_path / name, data=data, export=False).close()
        stored = load_file(str(tmp_path / name / "data" / "train.safetensors"))
        assert torch.equal(stored["x"][:, 0], torch.arange(20, dtype=torch.float32) * 0.5)
        assert stored["y"].tolist() == [i % 4 for i in range(20)]


def test_bad_arguments(tmp_path: Path) -> None:
    model = _mlp()
    data = (torch.randn(4, 10), torch.randint(0, 4, (4,)))
    with pytest.raises(ValueError, match="loss must be one of"):
        Recorder(model, tmp_path / "a", data=data, loss="hinge")
    with pytest.raises(ValueError, match="every must be"):
        Recorder(model, tmp_path / "a", data=data, every=0)
    with pytest.raises(ValueError, match="x has 4 samples but y has 3"):
        Recorder(model, tmp_path / "b", data=(torch.randn(4, 10), torch.zeros(3)))
