"""lca.trace_spec: the spec derived from a module (no lca binary needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models.cnn import CustomCNN, RMSNormNet, SinMLP
from models.gpt import GPT, GPTConfig

from lca import _toml
from lca.trace import trace_spec

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None  # type: ignore[assignment]


def _layers(model: nn.Module, x: torch.Tensor, **kw: Any) -> list[dict[str, Any]]:
    res = trace_spec(model, x, **kw)
    assert res.unsupported == [], res.message
    assert res.spec is not None
    if tomllib is not None:
        parsed = tomllib.loads(res.spec)
        assert parsed["layers"] == res.layers
    return res.layers


def test_import_lca_does_not_import_torch() -> None:
    code = "import sys, lca; lca.__version__; print('torch' in sys.modules)"
    src = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_sequential_mlp_with_tanh() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Dropout(0.5), nn.Linear(5, 3, bias=False))
    layers = _layers(model, torch.randn(2, 6))
    assert layers == [
        {"name": "0", "type": "linear", "in_features": 6, "out_features": 5, "bias": True},
        {"name": "1", "type": "tanh"},
        {"name": "3", "type": "linear", "in_features": 5, "out_features": 3, "bias": False},
    ]


def test_custom_cnn_hyperparameters() -> None:
    layers = _layers(CustomCNN(), torch.randn(2, 1, 12, 12))
    by_name = {layer["name"]: layer for layer in layers}
    assert [layer["type"] for layer in layers] == [
        "conv2d", "batch_norm2d", "leaky_relu", "max_pool2d", "conv2d", "gelu", "avg_pool2d",
        "flatten", "linear", "sigmoid", "linear",
    ]  # fmt: skip
    assert by_name["features.0"]["padding"] == 1
    assert by_name["features.1"]["eps"] == 1e-5
    assert by_name["features.2"]["negative_slope"] == pytest.approx(0.1)
    assert by_name["features.3"]["kernel_size"] == 2 and by_name["features.3"]["stride"] == 2
    conv = by_name["features.4"]
    assert (conv["stride"], conv["padding"], conv["groups"]) == (2, [1, 0], 2)
    assert by_name["features.5"]["approximate"] == "tanh"
    pool = by_name["features.6"]
    assert (pool["kernel_size"], pool["stride"], pool["padding"]) == (2, 1, 1)
    assert pool["count_include_pad"] is False
    flat = [layer for layer in layers if layer["type"] == "flatten"][0]
    assert flat["start_dim"] == 1 and flat["end_dim"] == -1
    assert by_name["classifier.1"]["in_features"] == 192


def test_functional_forward() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding="same")
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.max_pool2d(F.relu(self.conv(x)), 2)
            h = F.avg_pool2d(h, kernel_size=2, stride=1)
            h = torch.sigmoid(h) + h
            h = torch.mean(h, dim=(2, 3))
            return self.fc(F.leaky_relu(h, 0.2)).view(x.size(0), -1)

    layers = _layers(Net(), torch.randn(2, 3, 8, 8))
    types = [(layer["type"], layer.get("input")) for layer in layers]
    assert [t for t, _ in types] == [
        "conv2d", "relu", "max_pool2d", "avg_pool2d", "sigmoid", "add", "global_avg_pool",
        "leaky_relu", "linear",
    ]  # fmt: skip
    assert layers[0]["padding"] == "same"
    add = layers[5]
    assert add["input"] == [layers[4]["name"], layers[3]["name"]]
    assert layers[7]["negative_slope"] == pytest.approx(0.2)
    assert (layers[3]["kernel_size"], layers[3]["stride"]) == (2, 1)


@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_gpt_heads_tied_head_and_positions(flash: bool, n_head: int) -> None:
    cfg = GPTConfig(n_head=n_head)
    res = trace_spec(GPT(cfg, flash=flash), torch.randint(0, cfg.vocab_size, (2, 8)))
    assert res.unsupported == [], res.message
    layers = res.layers
    assert layers[0] == {
        "name": "transformer.wte",
        "type": "embedding",
        "num_embeddings": cfg.vocab_size,
        "embedding_dim": cfg.n_embd,
    }
    assert layers[1]["type"] == "positional_embedding" and layers[1]["input"] == "input"
    assert layers[1]["num_embeddings"] == cfg.block_size
    assert layers[2]["type"] == "add"
    assert layers[2]["input"] == ["transformer.wte", "transformer.wpe"]
    attn = [layer for layer in layers if layer["type"] == "causal_self_attention"]
    assert [a["name"] for a in attn] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert all(a["n_head"] == n_head and a["n_embd"] == cfg.n_embd for a in attn)
    norms = [layer for layer in layers if layer["type"] == "layer_norm"]
    assert [n["name"] for n in norms][-1] == "transformer.ln_f"
    assert all(n["eps"] == 1e-5 and n["normalized_shape"] == cfg.n_embd for n in norms)
    head = layers[-1]
    assert head["name"] == "lm_head" and head["tied"] == {"weight": "transformer.wte.weight"}
    assert res.aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert res.params["lm_head.weight"] == "transformer.wte.weight"
    assert res.params["transformer.h.0.attn.c_attn.weight"] == "transformer.h.0.attn.c_attn.weight"
    # The residual adds read the previous residual stream and the branch.
    adds = [layer for layer in layers if layer["type"] == "add"]
    assert adds[1]["input"] == [adds[0]["name"], "transformer.h.0.attn"]
    assert adds[2]["input"] == [adds[1]["name"], "transformer.h.0.mlp.c_proj"]


def test_attention_whose_head_attribute_lies_is_unsupported() -> None:
    class Lying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(8, 24)
            self.c_proj = nn.Linear(8, 8)
            self.n_head = 4  # but forward uses 2 heads

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, c))

    res = trace_spec(nn.Sequential(Lying()), torch.randn(2, 5, 8))
    assert res.spec is None
    [op] = res.unsupported
    assert "Lying" in op.op and "n_head = 4" in op.reason


def test_attention_without_causal_mask_is_unsupported() -> None:
    class Bidirectional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(8, 24)
            self.c_proj = nn.Linear(8, 8)
            self.n_head = 2

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, c = x.shape
            q, k, v = self.c_attn(x).split(c, dim=2)
            q, k, v = (z.view(b, t, 2, c // 2).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, c))

    res = trace_spec(nn.Sequential(Bidirectional()), torch.randn(2, 5, 8))
    assert res.spec is None and len(res.unsupported) == 1
    assert "does not compute causal self-attention" in res.unsupported[0].reason


def test_unsupported_ops_name_op_and_location() -> None:
    res = trace_spec(SinMLP(), torch.randn(2, 8))
    assert res.spec is None
    [op] = res.unsupported
    assert op.op == "torch.sin"
    assert op.source is not None and "cnn.py:" in op.source and "torch.sin" in op.source
    assert "torch.sin in the top-level module" in res.message

    res = trace_spec(RMSNormNet(), torch.randn(2, 8))
    [op] = res.unsupported
    assert op.op == "module torch.nn.modules.normalization.RMSNorm" and op.where == "block.1"
    assert "RMSNorm in `block.1`" in res.message


def test_shared_module_called_twice_is_tied() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.fc(torch.relu(self.fc(x)))))

    layers = _layers(Twice(), torch.randn(2, 4))
    assert layers[0]["name"] == "fc" and "tied" not in layers[0]
    assert layers[2]["name"] == "fc_1"
    assert layers[2]["tied"] == {"weight": "fc.weight", "bias": "fc.bias"}


def test_non_tensor_output_and_constant_add_are_reported() -> None:
    class TupleOut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.fc(x)
            return y, y

    res = trace_spec(TupleOut(), torch.randn(2, 3))
    assert res.spec is None and res.unsupported[0].op == "output"

    class AddConst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) + 1.0

    res = trace_spec(AddConst(), torch.randn(2, 3))
    assert res.spec is None and res.unsupported[0].op == "operator.add"


def test_toml_writer_values() -> None:
    assert _toml.value(1e-5) == "1e-05"
    assert _toml.value(0.1) == "0.1"
    assert _toml.value(2.0) == "2.0"
    assert _toml.value([1, 0]) == "[1, 0]"
    assert _toml.value({"weight": "a.b"}) == '{ weight = "a.b" }'
    assert _toml.value('q"x') == '"q\\"x"'
    with pytest.raises(ValueError):
        _toml.value(float("nan"))


def test_untraceable_control_flow_is_reported() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                return self.fc(x)
            return self.fc(-x)

    res = trace_spec(Branchy(), torch.randn(2, 3))
    assert res.spec is None
    [op] = res.unsupported
    assert op.op == "torch.fx.symbolic_trace" and "could not be traced" in op.reason
