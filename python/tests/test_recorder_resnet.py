"""torchvision's resnet18, unchanged: record, analyse without editing the spec, compare losses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from _runs import analyze, close, edit_spec, lca_loss0, torch_loss_of, train


def test_resnet18_records_and_matches(tmp_path: Path, lca_bin: Path) -> None:
    torchvision = __import__("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    run = tmp_path / "run"
    rec = train(model, run, x, y, "cross_entropy", steps=2, lr=0.01, export=False)
    assert rec.message == ""
    spec = (run / "model.toml").read_text()
    # Hyperparameters from the modules: the 7x7/2 stem, the 3/2 max pool, the strided 1x1
    # shortcuts, the residual adds, the adaptive pool and the flatten before fc.
    assert (
        'name = "conv1"\ntype = "conv2d"' in spec
        and "kernel_size = 7\nstride = 2\npadding = 3" in spec
    )
    assert 'name = "maxpool"\ntype = "max_pool2d"\nkernel_size = 3\nstride = 2\npadding = 1' in spec
    assert 'name = "layer2.0.downsample.0"' in spec
    assert spec.count('type = "add"') == 8
    assert 'type = "adaptive_avg_pool2d"\noutput_size = [1, 1]' in spec
    assert 'type = "flatten"' in spec
    assert 'batch_norm = "running-stats"' in spec
    manifest = json.loads((run / "lca-run.json").read_text())
    assert manifest["model_has_batch_norm"] is True

    # The analysis runs on the recorded files as they are (plain Simpson keeps it short).
    out = tmp_path / "out"
    r = subprocess.run(
        [
            str(lca_bin),
            "analyze",
            str(run / "checkpoints"),
            "--spec",
            str(run / "model.toml"),
            "-o",
            str(out),
            "-q",
            "--no-adaptive",
            "--no-lca-tensors",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    rows = (out / "steps.csv").read_text().splitlines()
    assert len(rows) == 3
    loss0 = float(rows[1].split(",")[2])
    assert close(loss0, torch_loss_of(run)), (loss0, torch_loss_of(run))

    # The stem's ReLU drafted as Tanh: a different loss.
    wrong = edit_spec(
        run, run / "wrong.toml", 'name = "relu"\ntype = "relu"', 'name = "relu"\ntype = "tanh"'
    )
    bad = lca_loss0(analyze(lca_bin, run, tmp_path / "out_wrong", spec=wrong, quick=True))
    assert not close(bad, torch_loss_of(run)), (bad, torch_loss_of(run))
