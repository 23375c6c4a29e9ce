#!/usr/bin/env bash
# Interleaved A/B of the shared first layer: for each spec, `lca analyze --no-adaptive` with
# lca's own decision (A) and with --no-share-first-layer (B), alternated ROUNDS times; prints
# the decision (summary.json's shared_first_layer), the fastest run of each and their ratio.
# With the decision "unshared" both runs do the same work (the ratio is noise).
#
#   bench/share_ab.sh [SPEC[:CKPTS] ...]      # default: every fixture spec
#
# Environment: ROUNDS (default 5), THREADS (default 1), EXTRA (more analyze options, e.g.
# "--policy tolerance" instead of --no-adaptive). Nothing here is used by tests or CI.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bin=${CARGO_TARGET_DIR:-$root/target}/release/lca
rounds=${ROUNDS:-5}
threads=${THREADS:-1}
extra=${EXTRA:---no-adaptive}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
specs=("$@")
if [ ${#specs[@]} -eq 0 ]; then
  specs=(fixtures/*/model*.toml)
fi
printf '| spec | decision | shared s (min) | unshared s (min) | unshared / shared |\n|---|---|---|---|---|\n'
for item in "${specs[@]}"; do
  spec=${item%%:*}
  ckpts=$(dirname "$spec")/ckpts
  [ "$item" != "$spec" ] && ckpts=${item#*:}
  best_a=999999 best_b=999999 decision=?
  for _ in $(seq 1 "$rounds"); do
    for mode in a b; do
      flags=()
      [ $mode = b ] && flags=(--no-share-first-layer)
      rm -rf "$tmp/out"
      t0=$(date +%s.%N)
      # shellcheck disable=SC2086
      "$bin" analyze "$ckpts" -s "$spec" -o "$tmp/out" $extra --no-verify-loss -j "$threads" -q \
        "${flags[@]}" >/dev/null 2>"$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
      dt=$(echo "$(date +%s.%N) - $t0" | bc)
      if [ $mode = a ]; then
        decision=$(grep -q '"shared_first_layer": true' "$tmp/out/summary.json" && echo shared || echo unshared)
        best_a=$(echo "if ($dt < $best_a) $dt else $best_a" | bc)
      else
        best_b=$(echo "if ($dt < $best_b) $dt else $best_b" | bc)
      fi
    done
  done
  printf '| %s | %s | %.3f | %.3f | %.2f |\n' "$spec" "$decision" "$best_a" "$best_b" \
    "$(echo "$best_b / $best_a" | bc -l)"
done
