#!/usr/bin/env python3
"""Full-training-set loss + gradient of a small character-level GPT: lca vs PyTorch on the CPU.

For each configuration, writes a spec (the layout of docs/examples/nanogpt.toml), a token data
set and one checkpoint (save_model, nanoGPT init) to a temporary directory, then times

  - PyTorch (float32, `torch.set_num_threads(THREADS)`, model.eval()): forward, mean
    cross-entropy over every position and backward over the whole set, in chunks of each of
    gpt_specs.chunk_candidates' sizes (the whole set in one batch among them; on the larger
    models smaller chunks are faster), with attention as docs/examples/nanogpt.py writes it
    (explicit masked softmax) and with F.scaled_dot_product_attention(is_causal=True), as
    nanoGPT does on PyTorch >= 2, each variant at its fastest chunk;
  - lca (examples/bench_gpt.rs, THREADS rayon workers, the same spec, data and checkpoint,
    chunks of the spec's chunk_size in parallel, as `lca analyze`).

Each figure is the median of REPEATS timed runs after a warm-up (the fastest is printed too);
the speed-up compares medians (PyTorch's faster variant at its faster chunk against lca), and
the load average before and after each configuration is recorded beside it. The losses must agree.

    cargo build --release --example bench_gpt
    bench/.venv/bin/python bench/gpt_compare.py [--threads 2] [--repeats 10] [--only 0,1] [--json F]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--keep",
        metavar="DIR",
        help="write each configuration's spec, data and "
        "checkpoint to DIR/<index>/ and keep them (for profiling)",
    )
    p.add_argument("--only", metavar="INDEX[,INDEX...]", help="run only these configurations")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON (bench/report.py)")
    p.add_argument(
        "--binary",
        default=str(
            Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
            / "release"
            / "examples"
            / "bench_gpt"
        ),
    )
    return p.parse_args()


ARGS = parse()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file, save_model  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpt_specs import CONFIGS, build, chunk_candidates, sdpa_forward, spec_toml  # noqa: E402

torch.set_num_threads(ARGS.threads)


def nanogpt() -> ModuleType:
    spec = importlib.util.spec_from_file_location("nanogpt", ROOT / "docs/examples/nanogpt.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["nanogpt"] = mod
    spec.loader.exec_module(mod)
    return mod


NG = nanogpt()


def time_torch(
    model: torch.nn.Module, tokens: torch.Tensor, chunk: int | None
) -> tuple[float, float, float]:
    x, y = tokens[:, :-1], tokens[:, 1:]
    n_tok = y.numel()

    def once() -> float:
        model.zero_grad(set_to_none=True)
        total = 0.0
        step = chunk or len(tokens)
        for a in range(0, len(tokens), step):
            logits = model(x[a : a + step])
            # Summed over the chunk, divided by the whole set's count: the full-set mean.
            loss = (
                F.cross_entropy(
                    logits.reshape(-1, logits.size(-1)),
                    y[a : a + step].reshape(-1),
                    reduction="sum",
                )
                / n_tok
            )
            loss.backward()
            total += float(loss.detach())
        return total

    loss = once()
    times = []
    for _ in range(ARGS.repeats):
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), loss


def main() -> int:
    binary = Path(ARGS.binary)
    if not binary.exists():
        print(
            f"build the example first: cargo build --release --example bench_gpt ({binary})",
            file=sys.stderr,
        )
        return 2
    print(f"torch {torch.__version__}, {ARGS.threads} thread(s), median of {ARGS.repeats}")
    rows = []
    only = None if ARGS.only is None else {int(i) for i in ARGS.only.split(",")}
    for i, (name, vocab, t, layers, heads, c, n_seq, chunk) in enumerate(CONFIGS):
        if only is not None and i not in only:
            continue
        load_before = os.getloadavg()[0]
        torch.manual_seed(0)
        model = build(NG, i).eval()
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, vocab, (n_seq, t + 1), generator=g)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(ARGS.keep) / str(i) if ARGS.keep else Path(tmp)
            d.mkdir(parents=True, exist_ok=True)
            (d / "model.toml").write_text(spec_toml(vocab, t, layers, heads, c, chunk))
            save_file({"tokens": tokens}, str(d / "train.safetensors"))
            save_model(model, str(d / "ckpt_0.safetensors"))
            r = subprocess.run(
                [
                    str(binary),
                    str(d / "model.toml"),
                    str(d / "ckpt_0.safetensors"),
                    str(ARGS.repeats),
                    str(ARGS.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            ours = json.loads(r.stdout)
        chunks = chunk_candidates(i)
        by_plain = {c: time_torch(model, tokens, c) for c in chunks}
        NG.CausalSelfAttention.forward, plain = sdpa_forward, NG.CausalSelfAttention.forward
        try:
            by_sdpa = {c: time_torch(model, tokens, c) for c in chunks}
        finally:
            NG.CausalSelfAttention.forward = plain
        c_plain = min(chunks, key=lambda c: by_plain[c][1])
        c_sdpa = min(chunks, key=lambda c: by_sdpa[c][1])
        t_plain, m_plain, l_plain = by_plain[c_plain]
        t_sdpa, m_sdpa, l_sdpa = by_sdpa[c_sdpa]
        assert math.isclose(ours["loss"], l_plain, rel_tol=1e-5), (ours["loss"], l_plain)
        assert math.isclose(l_sdpa, l_plain, rel_tol=1e-5), (l_sdpa, l_plain)
        n_params = sum(p.numel() for p in model.parameters())
        assert n_params == ours["params"], (n_params, ours["params"])
        rows.append(
            {
                "model": name,
                "params": n_params,
                "tokens": n_seq * t,
                "chunk": chunk,
                "threads": ARGS.threads,
                "repeats": ARGS.repeats,
                "torch": torch.__version__,
                "torch_chunk": c_plain,
                "torch_sdpa_chunk": c_sdpa,
                "torch_median_by_chunk": {str(c): by_plain[c][1] for c in chunks},
                "torch_sdpa_median_by_chunk": {str(c): by_sdpa[c][1] for c in chunks},
                "torch_min_s": t_plain,
                "torch_median_s": m_plain,
                "torch_sdpa_min_s": t_sdpa,
                "torch_sdpa_median_s": m_sdpa,
                "lca_min_s": ours["min_s"],
                "lca_median_s": ours["median_s"],
                "speedup": min(m_plain, m_sdpa) / ours["median_s"],
                "load_before": load_before,
                "load_after": os.getloadavg()[0],
            }
        )
    head = (
        "model",
        "params",
        "tokens",
        "lca chunk",
        "threads",
        "torch ms (chunk)",
        "torch SDPA ms (chunk)",
        "lca ms",
        "faster torch / lca (medians)",
        "load",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(
            f"| {r['model']} | {r['params']} | {r['tokens']} | {r['chunk']} | {r['threads']} | "
            + " | ".join(
                f"{1e3 * r[k + '_median_s']:.1f} (min {1e3 * r[k + '_min_s']:.1f})"
                + (f" ({r[k + '_chunk']})" if k != "lca" else "")
                for k in ("torch", "torch_sdpa", "lca")
            )
            + f" | {r['speedup']:.2f}x | {r['load_before']:.2f}→{r['load_after']:.2f} |"
        )
    if ARGS.json:
        Path(ARGS.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
