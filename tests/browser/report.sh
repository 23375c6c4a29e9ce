#!/usr/bin/env bash
# Browser test of `lca report` (run by .ci/run; not by `cargo test`; see docs/report.md):
#
#   tests/browser/report.sh [SCREENSHOT_DIR]
#
# Analyses the shipped example (fixtures/mlp) and the 42-layer model (fixtures/deep40),
# writes their reports, and opens each offline in headless Chromium
# (Debian's `chromium` package, installed with apt-get when missing) through the DevTools
# protocol (tests/browser/cdp.mjs, Node.js ≥ 20, no npm packages). Fails on any console error
# or warning, uncaught exception or network request; checks that every figure and table is
# visible, that the tables sort, that the page is complete without JavaScript, and that it
# prints. Leaves report.html, report-1280x2000.png, report-full.png and report.pdf in
# SCREENSHOT_DIR/mlp and SCREENSHOT_DIR/deep40 (default: target/browser-report) to look at.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${1:-target/browser-report}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if ! command -v chromium >/dev/null 2>&1; then
  echo "== installing chromium (apt-get)"
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq chromium
  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi
fi
if ! command -v node >/dev/null 2>&1; then
  echo "== installing nodejs (apt-get)"
  if [ "$(id -u)" -eq 0 ]; then apt-get install -y -qq nodejs
  else sudo apt-get install -y -qq nodejs; fi
fi
node_ws=()
if ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
  node_ws=(--experimental-websocket)   # Node 20-21
fi

echo "== building lca"
cargo build --release --quiet
lca=${CARGO_TARGET_DIR:-$root/target}/release/lca

for fixture in mlp deep40; do
  dir="$out/$fixture"
  mkdir -p "$dir"
  echo "== lca analyze + lca report on fixtures/$fixture"
  "$lca" analyze "fixtures/$fixture/ckpts" --spec "fixtures/$fixture/model.toml" -o "$dir/lca-out" --quiet
  "$lca" report "$dir/lca-out" -o "$dir/report.html"

  echo "== headless chromium ($(chromium --version 2>/dev/null | head -1)) on $fixture"
  start=$(date +%s)
  node "${node_ws[@]}" tests/browser/cdp.mjs "$(command -v chromium)" "$dir/report.html" "$dir"
  echo "browser check took $(( $(date +%s) - start )) s; look at $dir/report-1280x2000.png and $dir/report-full.png"
done
