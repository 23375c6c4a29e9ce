#!/usr/bin/env bash
# One-GPU benchmark of `lca analyze --engine torch` against a hand-written PyTorch
# Simpson-with-reuse script (bench/torch_engine.py): ResNet-20 on CIFAR-sized data and a
# 10.7M-parameter GPT, f32 with TF32 off. Prints the markdown rows (columns: the script, the
# worker driven in process, and the lca binary end to end).
#
#   cargo build --release && bench/gpu.sh            # cuda:0, 3 steps each
#   DEVICE=cuda:1 STEPS=5 PYTHON=/path/to/python bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export LCA_BIN=${LCA_BIN:-$PWD/target/release/lca}
[ -x "$LCA_BIN" ] || { echo "build lca first (cargo build --release) or set LCA_BIN" >&2; exit 2; }
exec bench/torch_engine_gpu.sh "$@"
