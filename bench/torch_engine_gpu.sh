#!/usr/bin/env bash
# The PyTorch engine against a hand-written PyTorch Simpson-with-reuse script on one GPU
# (bench/torch_engine.py): ResNet-20 on CIFAR-sized data (45,000 images) and a 10.7M-parameter
# GPT (nanoGPT shakespeare-char's configuration), f32 with TF32 off. Prints two markdown rows.
#
#   bench/torch_engine_gpu.sh                 # cuda:0, 3 steps each
#   DEVICE=cuda:1 STEPS=5 bench/torch_engine_gpu.sh
#
# Needs Python with torch, numpy and safetensors (PYTHON, default python3). Run it on an
# otherwise idle GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-3}
"$PYTHON" bench/torch_engine.py --model resnet20 --samples "${RESNET_SAMPLES:-45000}" \
    --chunk-size "${RESNET_CHUNK:-2500}" --steps "$STEPS" --device "$DEVICE"
"$PYTHON" bench/torch_engine.py --model gpt10m --samples "${GPT_SEQUENCES:-2048}" \
    --chunk-size "${GPT_CHUNK:-64}" --steps "$STEPS" --device "$DEVICE" | tail -n 1
