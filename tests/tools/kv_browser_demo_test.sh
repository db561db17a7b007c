#!/usr/bin/env bash
# kv-browser on a store written by the core engine: `ckptkv demo` saves
# LibTorch state dicts through KvCheckpointEngine; kv-browser must list,
# read, compare, verify and export them.
# Usage: kv_browser_demo_test.sh path/to/kv-browser path/to/ckptkv
set -uo pipefail
kvb=$1
ckptkv=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
db=$tmp/store
failures=0
pass=0
expect() {  # expect RC "what" PATTERN command...: exit code RC and PATTERN in stdout+stderr
  local want=$1 what=$2 pattern=$3; shift 3
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -eq "$want" ] && grep -qE -- "$pattern" "$tmp/out" "$tmp/err"; then
    pass=$((pass + 1))
  else
    echo "FAILED: $what: exit $rc (wanted $want), pattern '$pattern'"
    cat "$tmp/out" "$tmp/err"
    failures=$((failures + 1))
  fi
}

"$ckptkv" demo --db "$db" --steps 12 --every 3 --vocab 512 --hidden 32 >"$tmp/demo" 2>&1 ||
  { cat "$tmp/demo"; echo "FAILED: demo"; exit 1; }

expect 0 "tags" '"tag": "global_step3"' "$kvb" --db "$db" tags --json
expect 0 "tags marks latest" '^\* global_step' "$kvb" --db "$db" tags
expect 0 "tree" 'module/embed.weight +float32 \[512, 256\]' "$kvb" --db "$db" tree latest
expect 0 "meta renders the saved iteration" '^  iteration: 3$' "$kvb" --db "$db" meta global_step3
expect 0 "meta renders args" '"vocab": 512' "$kvb" --db "$db" meta global_step3 --json
expect 0 "stats" '"l2_norm"' "$kvb" --db "$db" stats latest 'module/fc1.*' --json
expect 0 "peek" '"result_shape": \[' "$kvb" --db "$db" peek latest module/fc2.weight '0, 0:4' --json
# The frozen embedding is shared: diff does not read it.
expect 0 "diff skips the frozen embedding" '"unchanged": 1' \
  "$kvb" --db "$db" diff global_step3 global_step6 --json
grep -q '"param": "module/embed.weight"' "$tmp/out" &&
  { echo "FAILED: diff lists the frozen embedding as changed"; failures=$((failures + 1)); }
read_bytes=$(grep -oE '"bytes_read": [0-9]+' "$tmp/out" | grep -oE '[0-9]+$')
if [ "${read_bytes:-999999999}" -lt $((512 * 256 * 4)) ]; then pass=$((pass + 1)); else
  echo "FAILED: diff read $read_bytes bytes"; failures=$((failures + 1)); fi
expect 0 "history" 'global_step6' "$kvb" --db "$db" history module/fc1.weight
expect 0 "verify" ': ok$' "$kvb" --db "$db" verify --all
expect 0 "export" '"verified": true' "$kvb" --db "$db" export latest --out "$tmp/st" --json
[ -s "$tmp/st/model.safetensors" ] && pass=$((pass + 1)) ||
  { echo "FAILED: no model.safetensors"; failures=$((failures + 1)); }
expect 1 "a missing tag lists the closest" 'closest: global_step3' \
  "$kvb" --db "$db" tree global_stepp3

echo "$pass passed, $failures failed"
[ "$failures" -eq 0 ]
