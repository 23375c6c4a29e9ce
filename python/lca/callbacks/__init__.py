"""Training-framework callbacks that record a run with `lca.Recorder`.

- `lca.callbacks.lightning.LCACallback`: PyTorch Lightning (`pip install lightning`).
- `lca.callbacks.huggingface.LCACallback`: Hugging Face `transformers.Trainer`.

Each module imports its framework; importing `lca.callbacks` itself imports neither.
"""

from __future__ import annotations

__all__: list[str] = []
