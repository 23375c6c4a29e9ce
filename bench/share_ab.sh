#!/usr/bin/env bash
# Interleaved A/B of the shared first layer: for each spec, `lca analyze --no-adaptive` with
# the first layer shared wherever it can be (--share-first-layer) and with every point in
# full (--no-share-first-layer), alternated ROUNDS times. Prints lca's own decision (the cost
# model: summary.json's shared_first_layer of a run without either option), the fastest run of
# each mode and their ratio: where the decision is "shared" the ratio should be > 1, where it
# is "unshared" < 1 (or the first layer cannot be shared at all: "n/a").
#
#   bench/share_ab.sh [SPEC[:CKPTS] ...]      # default: every fixture spec
#
# Environment: LCA (the binary; default target/release/lca), ROUNDS (default 5), THREADS
# (default 1), EXTRA (analyze options instead of --no-adaptive, e.g. "--policy tolerance").
# Nothing here is used by tests or CI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${LCA:-${CARGO_TARGET_DIR:-$root/target}/release/lca}
rounds=${ROUNDS:-5}
threads=${THREADS:-1}
extra=${EXTRA:---no-adaptive}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
specs=("$@")
if [ ${#specs[@]} -eq 0 ]; then
  specs=(fixtures/*/model*.toml)
fi
run() { # run SPEC CKPTS FLAG -> seconds; leaves $tmp/out
  rm -rf "$tmp/out"
  local t0
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086
  "$bin" analyze "$2" -s "$1" -o "$tmp/out" $extra --no-verify-loss -j "$threads" -q $3 \
    >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  echo "$(date +%s.%N) - $t0" | bc
}
shared_flag() { grep -q '"shared_first_layer": true' "$tmp/out/summary.json" && echo shared || echo unshared; }
printf '| spec | decision | forced shared s (min) | unshared s (min) | unshared / shared |\n|---|---|---|---|---|\n'
for item in "${specs[@]}"; do
  spec=${item%%:*}
  ckpts=$(dirname "$spec")/ckpts
  [ "$item" != "$spec" ] && ckpts=${item#*:}
  run "$spec" "$ckpts" "" >/dev/null
  decision=$(shared_flag)
  run "$spec" "$ckpts" --share-first-layer >/dev/null
  [ "$(shared_flag)" = unshared ] && decision="n/a"
  best_a=999999 best_b=999999
  if [ "$decision" != "n/a" ]; then
    for _ in $(seq 1 "$rounds"); do
      a=$(run "$spec" "$ckpts" --share-first-layer)
      b=$(run "$spec" "$ckpts" --no-share-first-layer)
      best_a=$(echo "if ($a < $best_a) $a else $best_a" | bc)
      best_b=$(echo "if ($b < $best_b) $b else $best_b" | bc)
    done
    printf '| %s | %s | %.3f | %.3f | %.2f |\n' "$spec" "$decision" "$best_a" "$best_b" \
      "$(echo "$best_b / $best_a" | bc -l)"
  else
    printf '| %s | n/a | – | – | – |\n' "$spec"
  fi
done
