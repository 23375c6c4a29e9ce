"""What the framework callbacks share: making the Recorder, and analysing its run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..recorder import Recorder
    from ..results import Results


def missing_framework(module: str, framework: str, install: str) -> ImportError:
    return ImportError(
        f"lca.callbacks.{module} needs {framework}, which is not installed: {install} "
        "(the rest of lca works without it)"
    )


def resolve_module(root: Any, path: str | None) -> Any:
    """`root`, or its submodule at the dotted attribute path `path` (e.g. "model")."""
    if not path:
        return root
    module = root
    for part in path.split("."):
        if not hasattr(module, part):
            raise AttributeError(
                f"module={path!r}: {type(module).__name__} has no attribute {part!r}"
            )
        module = getattr(module, part)
    return module


class RecorderOwner:
    """Holds the Recorder of one training run, created when training starts."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        data: Any,
        loss: Any,
        every: int,
        torch_loss_every: int | None,
        module: str | None,
        recorder_kwargs: dict[str, Any],
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, not {every}")
        self.run_dir = Path(run_dir)
        self.data = data
        self.loss = loss
        self.every = every
        self.torch_loss_every = torch_loss_every
        self.module = module
        self.recorder_kwargs = recorder_kwargs
        self.recorder: Recorder | None = None

    def start(self, model: Any) -> None:
        """Write θ_0 (the Recorder writes its first checkpoint when it is made)."""
        from ..recorder import Recorder

        if self.recorder is not None:
            self.recorder.close()
        self.recorder = Recorder(
            resolve_module(model, self.module),
            self.run_dir,
            data=self.data,
            loss=self.loss,
            every=self.every,
            torch_loss_every=self.torch_loss_every,
            **self.recorder_kwargs,
        )

    def step(self) -> None:
        if self.recorder is not None:
            self.recorder.step()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
            self.recorder = None

    def analyze(self, out: str | os.PathLike[str] | None = None, **options: Any) -> Results:
        """`lca.analyze` on the recorded run (output in RUN_DIR/lca-out unless `out` is given)."""
        from ..results import analyze

        return analyze(self.run_dir, out=out, **options)
