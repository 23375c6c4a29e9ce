"""Hugging Face `transformers`: record a `Trainer.train()` run for `lca analyze`.

    from lca.callbacks.huggingface import LCACallback

    cb = LCACallback("run/", data=(x, y), loss="cross_entropy")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    res = cb.analyze()            # lca.analyze("run/")

The model recorded is the one the Trainer trains (or its submodule named by `module`); its
`forward(x)` without labels must give the logits. θ_0 is written when training begins, then a
checkpoint after every optimizer step (`on_step_end`: after gradient accumulation), every
`every`-th. Only the main process records.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ._common import RecorderOwner, missing_framework

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as e:  # pragma: no cover - depends on what is installed
    raise missing_framework("huggingface", "transformers", "pip install transformers") from e

if TYPE_CHECKING:
    from ..results import Results

__all__ = ["LCACallback"]


class LCACallback(TrainerCallback):
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
        self._owner = RecorderOwner(
            run_dir, data, loss, every, torch_loss_every, module, recorder_kwargs
        )

    @property
    def run_dir(self) -> os.PathLike[str]:
        return self._owner.run_dir

    @property
    def recorder(self) -> Any:
        """The `lca.Recorder` while training runs (None before and after)."""
        return self._owner.recorder

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        if model is None:
            raise ValueError("LCACallback: the Trainer passed no model to on_train_begin")
        self._owner.start(model)

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if state.is_world_process_zero:
            self._owner.step()

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self._owner.close()

    def analyze(self, out: str | os.PathLike[str] | None = None, **options: Any) -> Results:
        """`lca.analyze` on the recorded run (RUN_DIR/lca-out unless `out` is given)."""
        return self._owner.analyze(out, **options)
