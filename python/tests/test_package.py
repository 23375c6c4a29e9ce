"""The package itself: import cost, version, the binary, the wheel's contents."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lca
from lca._binary import find_binary
from lca._version import _cargo_version, pep440


def _env_with_lca() -> dict[str, str]:
    """The environment for a Python subprocess that imports the same `lca` as this session."""
    env = dict(os.environ)
    pkg_parent = str(Path(lca.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, env.get("PYTHONPATH", "")])
    return env


def test_import_lca_pulls_in_neither_torch_nor_pandas() -> None:
    code = (
        "import sys, json, lca; "
        "lca.__version__; lca.LcaError; lca.analyze; lca.load; lca.Results; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'pandas', 'lightning', 'transformers', 'safetensors'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env_with_lca()
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lca.nonexistent  # noqa: B018


def test_version_agrees_with_the_binary_and_cargo_toml(lca_bin: Path, repo: Path) -> None:
    out = subprocess.run([str(lca_bin), "--version"], capture_output=True, text=True, check=True)
    name, binary_version = out.stdout.split()
    assert name == "lca"
    assert lca.__version__ == pep440(binary_version)
    cargo = _cargo_version(repo / "Cargo.toml")
    assert cargo is not None
    assert lca.__version__ == pep440(cargo)


@pytest.mark.parametrize(
    ("cargo", "python"),
    [
        ("0.1.0", "0.1.0"),
        ("1.2.3-alpha.1", "1.2.3a1"),
        ("1.2.3-beta.2", "1.2.3b2"),
        ("1.2.3-rc.1", "1.2.3rc1"),
        ("1.2.3-dev.4", "1.2.3.dev4"),
        ("1.2.3+build5", "1.2.3+build5"),
    ],
)
def test_pep440_matches_what_maturin_writes(cargo: str, python: str) -> None:
    assert pep440(cargo) == python


def test_find_binary_honours_lca_bin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lca_bin: Path
) -> None:
    monkeypatch.setenv("LCA_BIN", str(lca_bin))
    assert find_binary() == lca_bin
    monkeypatch.setenv("LCA_BIN", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="LCA_BIN="):
        find_binary()


def test_pyproject_builds_one_binary_wheel(repo: Path) -> None:
    text = (repo / "pyproject.toml").read_text()
    assert 'bindings = "bin"' in text
    assert 'python-source = "python"' in text
    assert 'name = "loss-change-allocation"' in text
    assert 'dynamic = ["version"]' in text


@pytest.mark.skipif(
    not os.environ.get("LCA_TEST_INSTALLED"),
    reason="set LCA_TEST_INSTALLED=1 when the package is installed (CI does)",
)
def test_installed_package_is_the_one_tested() -> None:
    """In CI: `import lca` is the installed wheel and its `lca` command is on the venv's PATH."""
    assert "site-packages" in Path(lca.__file__).parts
    binary = find_binary()
    assert binary.parent == Path(sys.executable).parent or "LCA_BIN" in os.environ
    out = subprocess.run(["lca", "--version"], capture_output=True, text=True, check=True)
    assert pep440(out.stdout.split()[1]) == lca.__version__


@pytest.mark.skipif(
    not os.environ.get("LCA_TEST_WHEEL"),
    reason="set LCA_TEST_WHEEL=path/to/wheel to check a built wheel (CI does)",
)
def test_wheel_holds_the_binary_and_the_package(repo: Path) -> None:
    wheel = Path(os.environ["LCA_TEST_WHEEL"])
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{dist}/METADATA").decode()
        script = next(n for n in names if n.endswith(".data/scripts/lca"))
        mode = (z.getinfo(script).external_attr >> 16) & 0o777
    assert mode & 0o111, "the lca script is not executable"
    for module in ("__init__.py", "_binary.py", "_version.py", "results.py"):
        assert f"lca/{module}" in names
    assert "lca/callbacks/lightning.py" in names
    assert "lca/callbacks/huggingface.py" in names
    assert not any(n.endswith(".rs") for n in names), "Rust sources in the wheel"
    assert "Name: loss-change-allocation\n" in metadata
    cargo = _cargo_version(repo / "Cargo.toml")
    assert cargo is not None
    assert f"Version: {pep440(cargo)}\n" in metadata


def _python_block_after(doc: str, heading: str) -> str:
    part = doc[doc.index(heading) :]
    start = part.index("```python\n") + len("```python\n")
    return part[start : part.index("```", start)]


def test_readme_quick_start_runs_as_shown(repo: Path, tmp_path: Path, lca_bin: Path) -> None:
    """The README's Python quick start: at most 20 lines, and it works as written."""
    pytest.importorskip("torch")
    pytest.importorskip("lca.recorder")
    script = _python_block_after((repo / "README.md").read_text(), "## Quick start in Python")
    assert len(script.splitlines()) <= 20
    env = _env_with_lca()
    env["LCA_BIN"] = str(lca_bin)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    assert "analysed 100 steps (0 → 100)" in done.stderr
    summary = json.loads((tmp_path / "run" / "lca-out" / "summary.json").read_text())
    assert [layer["name"] for layer in summary["layers"]] == ["0", "2"]
    # The printed per-layer sums are the run's totals, and they are negative (they helped).
    printed = {
        line.split()[0]: float(line.split()[1])
        for line in done.stdout.splitlines()
        if line.split() and line.split()[0] in ("0", "2")
    }
    for layer in summary["layers"]:
        assert printed[layer["name"]] == pytest.approx(layer["lca"], abs=1e-6)
        assert layer["lca"] < 0


def test_tutorial_python_sections_run_as_shown(repo: Path, tmp_path: Path, lca_bin: Path) -> None:
    """docs/tutorial.md sections 2 and 3 (record with the Recorder, analyse from Python), run
    from a directory that stands for the repository root."""
    pytest.importorskip("torch")
    pytest.importorskip("lca.recorder")
    doc = (repo / "docs" / "tutorial.md").read_text()
    part = doc[doc.index("## 2. Record the training run") : doc.index("## 4. ")]
    blocks = part.split("```python\n")[1:]
    assert len(blocks) == 2
    script = "\n".join(b[: b.index("```")] for b in blocks)
    (tmp_path / "fixtures").symlink_to(repo / "fixtures")
    env = _env_with_lca()
    env["LCA_BIN"] = str(lca_bin)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    assert len(list((run / "checkpoints").glob("step_*.safetensors"))) == 101
    spec = (run / "model.toml").read_text()
    # The spec excerpt the tutorial shows is what the Recorder wrote.
    excerpt = part[part.index("```toml\n") + len("```toml\n") :]
    excerpt = excerpt[: excerpt.index("```")]
    assert excerpt.strip() in spec
    assert "analysed 100 steps (0 → 100)" in done.stderr
    assert "(100, 32, 64)" in done.stdout
    assert (run / "layers.svg").stat().st_size > 1000
    summary = json.loads((run / "lca-out" / "summary.json").read_text())
    assert [layer["name"] for layer in summary["layers"]] == ["fc1", "fc2", "fc3"]
    assert all(layer["lca"] < 0 for layer in summary["layers"])
