#!/usr/bin/env bash
# Browser test of `lca report` (not run by `cargo test` or CI; see docs/report.md):
#
#   tests/browser/report.sh [SCREENSHOT_DIR]
#
# Analyses the shipped example, writes its report, and opens it offline in headless Chromium
# (Debian's `chromium` package, installed with apt-get when missing) through the DevTools
# protocol (tests/browser/cdp.mjs, Node.js ≥ 20, no npm packages). Fails on any console error
# or warning, uncaught exception or network request; checks that every figure and table is
# visible, that the tables sort, that the page is complete without JavaScript, and that it
# prints. Leaves report.html, report-1280x2000.png, report-full.png and report.pdf in
# SCREENSHOT_DIR (default: target/browser-report) to look at.
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

echo "== lca analyze + lca report on the example"
"$lca" analyze fixtures/mlp/ckpts --spec fixtures/mlp/model.toml -o "$out/lca-out" --quiet
"$lca" report "$out/lca-out" -o "$out/report.html"

echo "== headless chromium ($(chromium --version 2>/dev/null | head -1))"
start=$(date +%s)
node "${node_ws[@]}" tests/browser/cdp.mjs "$(command -v chromium)" "$out/report.html" "$out"
echo "browser check took $(( $(date +%s) - start )) s; look at $out/report-1280x2000.png and $out/report-full.png"
