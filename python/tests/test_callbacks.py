"""The Lightning and Hugging Face callbacks, each with the real framework: train a small model
three optimizer steps, then check the run directory and analyse it with the lca binary."""

from __future__ import annotations

import builtins
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import lca  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: Any, labels: Any = None) -> Any:
        logits = self.fc2(torch.tanh(self.fc1(x)))
        if labels is None:
            return logits
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def toy_data(n: int = 96) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def check_run(run: Path, lca_bin: Path, updates: int) -> None:
    ckpts = sorted((run / "checkpoints").glob("*.safetensors"))
    assert len(ckpts) == updates + 1, ckpts
    assert (run / "model.toml").is_file()
    assert (run / "lca-run.json").is_file()
    # The binary itself, on what the callback wrote.
    out = run / "cli-out"
    done = subprocess.run(
        [str(lca_bin), "analyze", str(run / "checkpoints"), "--spec", str(run / "model.toml"),
         "-o", str(out), "--threads", "1"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"analysed {updates} steps (0 → {updates})" in done.stderr
    # And through Python.
    res = lca.analyze(run, threads=1, progress=False)
    assert len(res.steps) == updates
    # The Recorder's checkpoints hold distinct states, one per optimizer step.
    first, last = res.lca.steps[0], res.lca.next_steps[-1]
    assert (first, last) == (0, updates)
    assert list(res.layer_totals["layer"]) == ["fc1", "fc2"]
    assert res.steps["loss_after"].iloc[-1] < res.steps["loss_before"].iloc[0]


def test_lightning_callback_records_every_optimizer_step(tmp_path: Path, lca_bin: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lca.callbacks.lightning import LCACallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    x, y = toy_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    run = tmp_path / "run"
    cb = LCACallback(run, data=(x, y), loss="cross_entropy", module="net")
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accumulate_grad_batches=2,  # 6 batches, 3 optimizer steps
        callbacks=[cb],
    )
    trainer.fit(Module(), loader)
    assert cb.recorder is None  # closed at the end of training
    check_run(run, lca_bin, updates=3)
    assert len(cb.analyze(out=tmp_path / "o", threads=1, progress=False).steps) == 3


def test_huggingface_callback_records_every_optimizer_step(tmp_path: Path, lca_bin: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from lca.callbacks.huggingface import LCACallback

    torch.manual_seed(0)
    x, y = toy_data()
    train = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    run = tmp_path / "run"
    cb = LCACallback(run, data=(x, y), loss="cross_entropy")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        max_steps=3,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        learning_rate=0.5,
        lr_scheduler_type="constant",
        optim="sgd",
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=Net(), args=args, train_dataset=train, callbacks=[cb])
    trainer.train()
    assert cb.recorder is None
    check_run(run, lca_bin, updates=3)


def test_lightning_module_without_forward_needs_module(tmp_path: Path) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from lca.callbacks.lightning import LCACallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    x, y = toy_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    cb = LCACallback(tmp_path / "run", data=(x, y))
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    with pytest.raises(ValueError, match="module=NAME.*'net'"):
        trainer.fit(Module(), loader)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_must_be_positive() -> None:
    pytest.importorskip("lightning.pytorch")
    from lca.callbacks.lightning import LCACallback

    with pytest.raises(ValueError, match="every"):
        LCACallback("run", data=None, every=0)


def test_module_path_is_checked() -> None:
    from lca.callbacks._common import resolve_module

    net = Net()
    assert resolve_module(net, None) is net
    assert resolve_module(net, "fc1") is net.fc1
    with pytest.raises(AttributeError, match="module='fc9'"):
        resolve_module(net, "fc9")


@pytest.mark.parametrize(
    ("module", "blocked", "hint"),
    [
        ("lightning", ("lightning", "pytorch_lightning"), "pip install lightning"),
        ("huggingface", ("transformers",), "pip install transformers"),
    ],
)
def test_missing_framework_gets_a_clear_message(
    monkeypatch: pytest.MonkeyPatch, module: str, blocked: tuple[str, ...], hint: str
) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in blocked:
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.delitem(sys.modules, f"lca.callbacks.{module}", raising=False)
    with pytest.raises(ImportError, match=hint):
        importlib.import_module(f"lca.callbacks.{module}")
    monkeypatch.delitem(sys.modules, f"lca.callbacks.{module}", raising=False)
