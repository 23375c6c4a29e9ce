"""Verification against PyTorch: `lca analyze` compares its step-0 loss with the one the
Recorder stored (`lca.torch_loss`) and refuses a spec that does not describe the model."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import torch
from _runs import torch_loss_of, train
from models.gpt import GPT, GPTConfig


def _record_gpt(run: Path) -> None:
    torch.manual_seed(0)
    cfg = GPTConfig()
    model = GPT(cfg)
    with torch.no_grad():  # sharper attention than at initialisation: the head count shows
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(25.0)
    tokens = torch.randint(0, cfg.vocab_size, (96, cfg.block_size + 1))
    train(model, run, tokens[:, :-1], tokens[:, 1:], "cross_entropy", steps=2, export=False)


def _lca(lca_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(lca_bin), *args], capture_output=True, text=True)


def test_wrong_head_count_is_refused_with_both_losses(tmp_path: Path, lca_bin: Path) -> None:
    run = tmp_path / "run"
    _record_gpt(run)
    torch_loss = torch_loss_of(run)

    # The run directory analyses directly (its checkpoints and model.toml), and agrees.
    ok = _lca(lca_bin, "analyze", str(run), "-o", str(tmp_path / "ok"), "-q", "--last", "1")
    assert ok.returncode == 0, ok.stderr
    check = json.loads((tmp_path / "ok" / "summary.json").read_text())["loss_check"]
    assert check["agree"] and check["enforced"] and check["step"] == 0
    assert check["torch_loss"] == torch_loss
    assert abs(check["lca_loss"] - torch_loss) <= check["tolerance"] < 1e-5
    insp = _lca(lca_bin, "inspect", str(run), "--no-time")
    assert insp.returncode == 0, insp.stderr
    assert "loss check" in insp.stdout and "agree" in insp.stdout, insp.stdout
    assert "evaluated the loss" in insp.stdout

    # n_head 4 -> 1 in model.toml: the silent mistake of issue 17, now refused.
    spec = run / "model.toml"
    spec.write_text(spec.read_text().replace("n_head = 4", "n_head = 1"))
    out = tmp_path / "wrong"
    bad = _lca(lca_bin, "analyze", str(run), "-o", str(out), "-q", "--last", "1")
    assert bad.returncode == 2, bad.stderr
    numbers = [float(v) for v in re.findall(r"is (\d+\.\d+)", bad.stderr)]
    assert len(numbers) == 2, bad.stderr
    lca_loss, reported_torch = numbers
    assert abs(reported_torch - torch_loss) < 1e-9, bad.stderr
    assert abs(lca_loss - torch_loss) > 1e-5, bad.stderr
    for cause in ("n_head", "scale/mean/std", "batch-norm mode", "--no-verify-loss"):
        assert cause in bad.stderr, bad.stderr
    assert not (out / "summary.json").exists()
    insp = _lca(lca_bin, "inspect", str(run), "--no-time")
    assert insp.returncode == 0 and "DISAGREE" in insp.stdout, insp.stdout

    # --no-verify-loss analyses anyway, warns, and records the disagreement.
    forced = _lca(lca_bin, "analyze", str(run), "-o", str(out), "--last", "1", "--no-verify-loss")
    assert forced.returncode == 0, forced.stderr
    assert "warning: --no-verify-loss" in forced.stderr
    check = json.loads((out / "summary.json").read_text())["loss_check"]
    assert not check["agree"] and not check["enforced"]
    assert abs(check["lca_loss"] - lca_loss) < 1e-9
