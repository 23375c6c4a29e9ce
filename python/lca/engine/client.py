"""A Python client of the engine worker, doing exactly what the `lca` binary does: start
`python -m lca.engine.worker ...`, read its `hello`, send θ as raw little-endian numbers,
read back the loss and the gradient. Needs numpy, not torch (the worker imports torch).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import protocol


class WorkerError(RuntimeError):
    """The worker answered with an `error` message (kind, message, hint), or died."""

    def __init__(
        self, kind: str, message: str, hint: str | None = None, returncode: int | None = None
    ) -> None:
        text = f"{kind}: {message}" + (f" (hint: {hint})" if hint else "")
        if returncode is not None:
            text += f" [worker exit status {returncode}]"
        super().__init__(text)
        self.kind = kind
        self.message = message
        self.hint = hint
        self.returncode = returncode


@dataclass
class Result:
    loss: float
    grad: np.ndarray | None
    count: int
    seconds: float


class EngineClient:
    """One worker process. Use as a context manager, or call close()."""

    def __init__(
        self,
        args: list[str],
        *,
        python: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        stderr: Any = None,
    ) -> None:
        cmd = [python or sys.executable, "-m", "lca.engine.worker", *args]
        # The worker imports this very package (a source tree works without installing).
        env = dict(os.environ if env is None else env)
        here = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            cwd=cwd,
        )
        self._next_id = 0
        header, _ = self._read()
        if header["cmd"] != "hello":
            raise WorkerError("bad_request", f"expected hello, got {header['cmd']}")
        self.hello: dict[str, Any] = header
        self.numel: int = int(header["numel"])
        self.theta_dtype = np.dtype("<f4" if header["theta_dtype"] == "f32" else "<f8")

    # -- framing ---------------------------------------------------------------------------
    def _died(self, what: str) -> WorkerError:
        rc = self.proc.wait(timeout=30)
        return WorkerError("died", f"the worker ended {what}", returncode=rc)

    def _read(self) -> tuple[dict[str, Any], bytearray]:
        assert self.proc.stdout is not None
        try:
            header, payload = protocol.read_message(self.proc.stdout)  # type: ignore[arg-type]
        except protocol.ProtocolError as e:
            raise self._died(f"without a complete answer ({e})") from e
        if header["cmd"] == "error":
            rc = None
            if self.proc.poll() is not None or header["kind"] in (
                "import_error",
                "config_error",
                "out_of_memory",
                "internal",
            ):
                try:
                    rc = self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    rc = None
            raise WorkerError(header["kind"], header["message"], header.get("hint"), rc)
        return header, payload

    def _send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        assert self.proc.stdin is not None
        try:
            protocol.write_message(self.proc.stdin, header, payload)  # type: ignore[arg-type]
        except (BrokenPipeError, OSError) as e:
            raise self._died("before reading the request") from e

    # -- commands --------------------------------------------------------------------------
    def _evaluate(self, cmd: str, theta: np.ndarray) -> Result:
        flat = np.ascontiguousarray(theta, dtype=self.theta_dtype).reshape(-1)
        if flat.size != self.numel:
            raise ValueError(f"θ has {flat.size} values, the worker's layout {self.numel}")
        self._next_id += 1
        rid = self._next_id
        dtype = "f32" if self.theta_dtype == np.dtype("<f4") else "f64"
        self._send(
            {"cmd": cmd, "id": rid, "dtype": dtype, "numel": self.numel}, memoryview(flat).cast("B")
        )
        header, payload = self._read()
        if header["cmd"] != "result" or header.get("id") != rid:
            raise WorkerError("bad_request", f"unexpected answer {header}")
        body = np.frombuffer(payload, dtype="<f8")
        grad = body[1:].copy() if cmd == "loss_grad" else None
        return Result(float(body[0]), grad, int(header["count"]), float(header["seconds"]))

    def loss_grad(self, theta: np.ndarray) -> Result:
        """Full-set mean loss and its gradient at θ (one flat vector, the hello's layout)."""
        return self._evaluate("loss_grad", theta)

    def loss(self, theta: np.ndarray) -> float:
        """Full-set mean loss at θ."""
        return self._evaluate("loss", theta).loss

    def flatten(self, tensors: dict[str, Any]) -> np.ndarray:
        """θ as one flat vector from named arrays, in the hello's layout (tied parameters may
        be given under any of their names)."""
        out = np.empty(self.numel, dtype=self.theta_dtype)
        inverse: dict[str, list[str]] = {}
        for alias, name in self.hello["aliases"].items():
            inverse.setdefault(name, []).append(alias)
        for t in self.hello["tensors"]:
            names = [t["name"], *inverse.get(t["name"], [])]
            key = next((n for n in names if n in tensors), None)
            if key is None:
                raise KeyError(f"θ needs tensor '{t['name']}'")
            v = np.asarray(tensors[key], dtype=np.float64).reshape(-1)
            if v.size != t["numel"]:
                raise ValueError(f"tensor '{key}' has {v.size} values, expected {t['numel']}")
            out[t["offset"] : t["offset"] + t["numel"]] = v
        return out

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """A flat vector (θ or a gradient) as named arrays."""
        return {
            t["name"]: flat[t["offset"] : t["offset"] + t["numel"]].reshape(t["shape"])
            for t in self.hello["tensors"]
        }

    def close(self) -> int:
        """Ask the worker to stop; its exit status."""
        if self.proc.poll() is None:
            try:
                self._send({"cmd": "shutdown"})
                header, _ = protocol.read_message(self.proc.stdout)  # type: ignore[arg-type]
            except (WorkerError, protocol.ProtocolError):
                pass
        for s in (self.proc.stdin, self.proc.stdout):
            if s is not None:
                s.close()
        return self.proc.wait(timeout=60)

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.close()
