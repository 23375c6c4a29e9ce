"""The PyTorch engine's worker: `python -m lca.engine.worker --model SPEC --data FILE ...`.

It loads the model and the training set, announces θ's layout in a `hello` message on stdout,
then answers `loss_grad` and `loss` requests read from stdin until `shutdown` or the end of
stdin. stdout carries only protocol messages (anything the model's code prints goes to
stderr); stderr is free for logs. The protocol is specified in docs/engines.md and framed by
lca.engine.protocol.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from . import protocol

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2  # import_error, config_error, protocol violations
EXIT_OOM = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lca.engine.worker",
        description="lca's PyTorch evaluation engine (a worker speaking the binary protocol "
        "of docs/engines.md on stdin/stdout)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="run_dir/lca-run.json (or run_dir), model.pt2, path/file.py:factory, "
        "or package.module:factory",
    )
    p.add_argument("--model-kwargs", default=None, help="JSON object of factory keyword args")
    p.add_argument("--data", default=None, help="training set (.safetensors or .npz)")
    p.add_argument(
        "--spec",
        default=None,
        help="an lca model.toml: its [data], [loss], "
        "[model] batch_norm/input_shape and [eval] chunk_size keys are used",
    )
    p.add_argument("--loss", choices=["cross_entropy", "mse"], default=None)
    p.add_argument("--x", default=None, help="input tensor name (default x)")
    p.add_argument("--y", default=None, help="target tensor name (default y)")
    p.add_argument("--tokens", default=None, help="token tensor [N, T+1] instead of x, y")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", choices=["f32", "f64"], default="f32")
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--bn-mode", choices=["running-stats", "batch-stats"], default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch)")
    p.add_argument(
        "--data-order",
        choices=["shuffled", "file"],
        default="shuffled",
        help="row order of the chunks with batch statistics (lca's --data-order)",
    )
    p.add_argument(
        "--data-seed", type=int, default=None, help="seed of the shuffled order (default 0)"
    )
    return p


class Worker:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        protocol.write_message(self.out, header, payload)

    def fail(self, kind: str, message: str, code: int, hint: str | None = None) -> NoReturn:
        header: dict[str, Any] = {"cmd": "error", "kind": kind, "message": message}
        if hint:
            header["hint"] = hint
        print(f"lca engine worker: {kind}: {message}", file=sys.stderr)
        try:
            self.send(header)
        except OSError:
            pass
        sys.exit(code)


def _oom_hint(chunk: int) -> str:
    return (
        f"lower the chunk size (--chunk-size {max(1, chunk // 2)}; it is {chunk}), use a "
        "device with more memory, or --precision f32"
    )


def _is_oom(e: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(e, oom) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def _default_chunk(device: Any, n: int) -> int | None:
    """256 samples (the built-in engine's default) on the CPU and MPS; None on a CUDA device,
    where the evaluator measures what fits (Evaluator.probe_chunk_size)."""
    if device.type == "cuda":
        return None
    return min(n, 256)


def main(argv: list[str] | None = None) -> None:
    # Deterministic cuBLAS needs this before CUDA is initialised.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # stdout carries only protocol messages: keep it for them, send fd 1 (prints of the
    # model's code, warnings of libraries) to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker(out)
    args = _parser().parse_args(argv)
    try:
        import torch
    except ImportError as e:
        worker.fail(
            "import_error",
            f"cannot import torch: {e}",
            EXIT_CONFIG,
            "install PyTorch in the Python that runs the worker (pip install torch)",
        )
    from . import evaluator, loading

    chunk: int | None = None
    try:
        kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
        if not isinstance(kwargs, dict):
            raise loading.ConfigError("--model-kwargs must be a JSON object")
        cfg = loading.parse_model_arg(args.model, kwargs)
        if args.spec:
            loading.read_spec(Path(args.spec), cfg)
        if args.data:
            cfg.data.train = Path(args.data).resolve()
        for k in ("x", "y", "tokens"):
            if getattr(args, k):
                setattr(cfg.data, k, getattr(args, k))
        cfg.loss = args.loss or cfg.loss
        cfg.bn_mode = args.bn_mode or cfg.bn_mode
        if args.data_seed is not None and not 0 <= args.data_seed < 1 << 64:
            raise loading.ConfigError(f"--data-seed must be in [0, 2^64), found {args.data_seed}")
        if args.data_seed is not None and args.data_order == "file":
            raise loading.ConfigError("--data-seed applies to --data-order shuffled, not file")
        if cfg.loss is None:
            raise loading.ConfigError("no loss: pass --loss cross_entropy|mse (or --spec)")
        if cfg.loss not in loading.LOSSES:
            raise loading.ConfigError(f"unknown loss '{cfg.loss}' (expected cross_entropy, mse)")
        if cfg.bn_mode is not None and cfg.bn_mode not in loading.BN_MODES:
            raise loading.ConfigError(
                f"unknown batch-norm mode '{cfg.bn_mode}' (expected running-stats, batch-stats)"
            )
        try:
            device = torch.device(args.device)
            if device.type == "cuda" and not torch.cuda.is_available():
                raise loading.ConfigError(f"--device {args.device}: CUDA is not available")
            if device.type == "mps" and not torch.backends.mps.is_available():
                raise loading.ConfigError(f"--device {args.device}: MPS is not available")
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
        except RuntimeError as e:
            raise loading.ConfigError(f"--device {args.device}: {e}") from e
        if args.precision == "f64" and device.type == "mps":
            raise loading.ConfigError("MPS has no float64: use --precision f32")
        if args.threads:
            torch.set_num_threads(args.threads)
        # Same θ, same bits: deterministic kernels where PyTorch has them, no TF32.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

        module, exported = loading.load_module(cfg.model)
        data = loading.load_data(cfg.data, cfg.loss)
        chunk = args.chunk_size or None
        has_bn = bool(evaluator.batch_norm_modules(module))
        if chunk is None and (cfg.bn_mode == "batch-stats" and has_bn):
            chunk = cfg.chunk_size or 256
        probe = False
        if chunk is None:
            chunk = cfg.chunk_size if device.type == "cpu" and cfg.chunk_size else None
            chunk = chunk or _default_chunk(device, data.n)
            probe = chunk is None
        if chunk is not None and chunk < 1:
            raise loading.ConfigError(f"--chunk-size must be at least 1, found {chunk}")
        ev = evaluator.Evaluator(
            module,
            data,
            loss=cfg.loss,
            bn_mode=cfg.bn_mode,
            device=device,
            precision=args.precision,
            chunk_size=chunk or min(data.n, 256),
            exported=exported,
            data_order=args.data_order,
            data_seed=args.data_seed,
        )
        if probe:
            ev.chunk_size = chunk = ev.probe_chunk_size()
            print(f"lca engine worker: chunk size {chunk} on {device}", file=sys.stderr)
    except loading.ModelImportError as e:
        worker.fail("import_error", str(e), EXIT_CONFIG)
    except loading.ConfigError as e:
        worker.fail("config_error", str(e), EXIT_CONFIG)
    except (ValueError, TypeError) as e:
        worker.fail("config_error", str(e), EXIT_CONFIG)
    except BaseException as e:
        if isinstance(e, SystemExit):
            raise
        if _is_oom(e):
            worker.fail(
                "out_of_memory",
                f"out of device memory while loading: {e}",
                EXIT_OOM,
                _oom_hint(chunk or 256),
            )
        traceback.print_exc()
        worker.fail("internal", f"{type(e).__name__}: {e}", EXIT_INTERNAL)

    from .. import __version__

    hello = {
        "cmd": "hello",
        "protocol": protocol.PROTOCOL_VERSION,
        "worker": "lca.engine.worker",
        "lca_version": __version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "device": str(device),
        "device_name": (
            torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        ),
        "precision": args.precision,
        "theta_dtype": args.precision,
        "grad_dtype": "f64",
        "model": cfg.model.describe(),
        "exported": exported,
        "data": str(data.path),
        "loss": cfg.loss,
        "batch_norm": ev.bn_mode,
        "n_samples": ev.n,
        "n_terms": ev.count,
        "chunk_size": ev.chunk_size,
        "n_chunks": -(-ev.n // ev.chunk_size),
        "data_order": ev.data_order,
        "data_seed": ev.data_seed,
        "numel": ev.numel,
        "tensors": [
            {
                "name": c.name,
                "shape": c.shape,
                "kind": c.kind,
                "offset": c.offset,
                "numel": c.numel,
                "dtype": args.precision,
            }
            for c in ev.coords
        ],
        "aliases": ev.aliases,
        "held_buffers": [{"name": n, "shape": s, "dtype": d} for n, s, d in ev.held],
        "deterministic": True,
        "tf32": False,
    }
    worker.send(hello)
    serve(worker, ev, sys.stdin.buffer)


def serve(worker: Worker, ev: Any, inp: BinaryIO) -> None:
    from .evaluator import NumericError

    max_payload = ev.numel * 8
    while True:
        try:
            header, payload = protocol.read_message(inp, max_payload=max_payload)
        except protocol.EndOfStream:
            sys.exit(EXIT_OK)
        except protocol.ProtocolError as e:
            worker.fail("bad_request", f"malformed message: {e}", EXIT_CONFIG)
        cmd = header["cmd"]
        rid = header.get("id")
        if cmd == "shutdown":
            worker.send({"cmd": "bye", "id": rid})
            sys.exit(EXIT_OK)
        if cmd not in ("loss_grad", "loss"):
            worker.send(
                {
                    "cmd": "error",
                    "id": rid,
                    "kind": "bad_request",
                    "message": f"unknown command '{cmd}' (expected loss_grad, loss, shutdown)",
                }
            )
            continue
        dtype = header.get("dtype", ev_dtype(ev))
        size = protocol.DTYPE_SIZE.get(dtype) if isinstance(dtype, str) else None
        numel = header.get("numel")
        if size is None or numel != ev.numel or len(payload) != ev.numel * size:
            worker.send(
                {
                    "cmd": "error",
                    "id": rid,
                    "kind": "bad_request",
                    "message": f"'{cmd}' needs θ as {ev.numel} values of dtype f32 or f64 "
                    f"(the hello's layout); got numel {numel}, dtype {dtype}, "
                    f"{len(payload)} payload bytes",
                }
            )
            continue
        t0 = time.perf_counter()
        try:
            flat = ev.theta_from_bytes(payload, dtype)
            loss, grad = ev.evaluate(flat, want_grad=(cmd == "loss_grad"))
        except NumericError as e:
            worker.send({"cmd": "error", "id": rid, "kind": "numeric", "message": str(e)})
            continue
        except BaseException as e:
            if isinstance(e, SystemExit):
                raise
            if _is_oom(e):
                worker.fail(
                    "out_of_memory",
                    f"out of device memory evaluating a chunk of {ev.chunk_size} "
                    f"samples on {ev.device}: {e}",
                    EXIT_OOM,
                    _oom_hint(ev.chunk_size),
                )
            traceback.print_exc()
            worker.fail("internal", f"{type(e).__name__}: {e}", EXIT_INTERNAL)
        import numpy as np

        body = np.empty(1 + (0 if grad is None else grad.size), dtype="<f8")
        body[0] = loss
        if grad is not None:
            body[1:] = grad
        worker.send(
            {
                "cmd": "result",
                "id": rid,
                "of": cmd,
                "numel": 0 if grad is None else ev.numel,
                "dtype": "f64",
                "count": ev.count,
                "seconds": round(time.perf_counter() - t0, 6),
            },
            memoryview(body).cast("B"),
        )


def ev_dtype(ev: Any) -> str:
    return "f64" if str(ev.dtype) == "torch.float64" else "f32"


if __name__ == "__main__":
    main()
