"""PyTorch Lightning: record a `Trainer.fit` run for `lca analyze`.

    from lca.callbacks.lightning import LCACallback

    cb = LCACallback("run/", data=(x, y), loss="cross_entropy", module="net")
    trainer = lightning.Trainer(max_epochs=3, callbacks=[cb])
    trainer.fit(model, train_loader)
    res = cb.analyze()            # lca.analyze("run/")

`module` names the attribute of the LightningModule holding the network to record (its
`forward(x)` gives the logits); without it the LightningModule itself is recorded. θ_0 is
written when training starts, then a checkpoint after every optimizer step (every `every`-th).
Only the global-rank-0 process records. Works with `lightning` (`lightning.pytorch`) or, when
that is not installed, the older `pytorch_lightning` package.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._common import RecorderOwner, missing_framework

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer  # type: ignore[no-redef]
    except ImportError as e:
        raise missing_framework("lightning", "PyTorch Lightning", "pip install lightning") from e

if TYPE_CHECKING:
    from ..results import Results

__all__ = ["LCACallback"]


class LCACallback(Callback):
    """Records the training run with `lca.Recorder`: checkpoints, the model spec, the
    training set and PyTorch's own loss at θ_0, into `run_dir`.

    `data` is the training set as the loss sees it (a pair of tensors `(x, y)`, or a
    Dataset / DataLoader read once, in order, with the evaluation transform); `loss`,
    `every`, `torch_loss_every` and any other keyword go to `lca.Recorder`.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        data: Any,
        loss: Any = "cross_entropy",
        every: int = 1,
        torch_loss_every: int | None = None,
        module: str | None = None,
        **recorder_kwargs: Any,
    ) -> None:
        super().__init__()
        self._owner = RecorderOwner(
            run_dir, data, loss, every, torch_loss_every, module, recorder_kwargs
        )
        self._last_global_step: int | None = None

    @property
    def run_dir(self) -> os.PathLike[str]:
        return self._owner.run_dir

    @property
    def recorder(self) -> Any:
        """The `lca.Recorder` while training runs (None before and after)."""
        return self._owner.recorder

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_global_step = trainer.global_step
        if self._owner.module is None and type(pl_module).forward is LightningModule.forward:
            children = ", ".join(repr(name) for name, _ in pl_module.named_children())
            raise ValueError(
                f"LCACallback: {type(pl_module).__name__} defines no forward(), so it cannot be "
                f"recorded itself: pass module=NAME, the attribute holding the network "
                f"(its children: {children or 'none'})"
            )
        if trainer.is_global_zero:
            self._owner.start(pl_module)

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # `global_step` counts optimizer steps: it does not move on a batch that only
        # accumulates gradients.
        step = trainer.global_step
        if self._last_global_step is not None and step != self._last_global_step:
            self._last_global_step = step
            if trainer.is_global_zero:
                self._owner.step()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._owner.close()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self._owner.close()

    def analyze(self, out: str | os.PathLike[str] | None = None, **options: Any) -> Results:
        """`lca.analyze` on the recorded run (RUN_DIR/lca-out unless `out` is given)."""
        return self._owner.analyze(out, **options)
