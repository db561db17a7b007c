#!/usr/bin/env bash
# End-to-end checks of the ckptkv program: the demo resumes exactly, the
# admin commands report and clean a store, a damaged store is exit code 2,
# bad input is exit code 1, the naive (DeepSpeed) reshape writes a tag that
# loads and refuses expansions, place indexes tags saved without placements
# (and names the files it cannot place), and the bench's JSON holds every scenario,
# the reshape rows included.
# Usage: cli_test.sh path/to/ckptkv
set -uo pipefail
ckptkv=$1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
pass=0
check() {  # check "what" command...: the command must succeed
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); else echo "FAILED: $what"; failures=$((failures + 1)); fi
}
expect_rc() {  # expect_rc RC "what" command...
  local want=$1 what=$2; shift 2
  "$@" >"$tmp/out" 2>"$tmp/err"
  local rc=$?
  if [ "$rc" -eq "$want" ]; then pass=$((pass + 1)); else
    echo "FAILED: $what: exit $rc, wanted $want"; cat "$tmp/out" "$tmp/err"; failures=$((failures + 1)); fi
}

db=$tmp/store
expect_rc 0 "demo runs" "$ckptkv" demo --db "$db" --steps 12 --every 3 --vocab 512 --hidden 32
check "demo resumes exactly" grep -q "resume: exact" "$tmp/out"

# A rerun replaces the demo's own store, but never a store it did not make.
expect_rc 0 "demo reruns over its own store" "$ckptkv" demo --db "$db" --steps 12 --every 3 --vocab 512 --hidden 32
cp -r "$db" "$tmp/real" && rm "$tmp/real/CKPTKV-DEMO" "$tmp/real/OWNER"
# Regression: a demo rerun over a store another process is writing used to
# delete it (it opened it read-only, took no lock, then removed it). The
# write lock is a flock on the store directory; flock(1) holds it here.
flock "$db" sleep 8 &  # sleep inherits the lock: it is released when sleep ends
holder=$!
sleep 0.5
expect_rc 1 "demo refuses a store another process holds" "$ckptkv" demo --db "$db" --steps 12 --every 3 --vocab 512 --hidden 32
check "the refusal names the lock" grep -q "locked by" "$tmp/out" "$tmp/err"
wait "$holder" 2>/dev/null || true
check "the held store is intact" "$ckptkv" verify --db "$db"
expect_rc 1 "demo refuses a store it did not make" "$ckptkv" demo --db "$tmp/real" --steps 12 --every 3
check "the refused store is intact" "$ckptkv" verify --db "$tmp/real"

expect_rc 0 "ls --json" "$ckptkv" ls --db "$db" --json
for t in global_step3 global_step6; do
  check "ls lists $t" grep -q "\"$t\"" "$tmp/out"
done
check "ls shows new bytes" grep -q '"new_bytes"' "$tmp/out"
expect_rc 0 "verify of a sound store" "$ckptkv" verify --db "$db"

expect_rc 0 "rm a tag" "$ckptkv" rm --db "$db" global_step3
expect_rc 1 "rm of a missing tag" "$ckptkv" rm --db "$db" global_step3
check "rm names the missing tag" grep -q "global_step3" "$tmp/err"
expect_rc 0 "gc --dry-run" "$ckptkv" gc --db "$db" --dry-run --json
expect_rc 0 "gc" "$ckptkv" gc --db "$db" --json
expect_rc 0 "verify after gc" "$ckptkv" verify --db "$db"

expect_rc 1 "ls of a missing store" "$ckptkv" ls --db "$tmp/nope"
mkdir -p "$tmp/notastore" && echo hi >"$tmp/notastore/file"
expect_rc 1 "ls of a directory that is not a store" "$ckptkv" ls --db "$tmp/notastore"
check "says it is not a store" grep -q "not a ckptkv store" "$tmp/err"
expect_rc 1 "unknown subcommand" "$ckptkv" frobnicate

# Damage every blob file in its middle: verify must report, not crash.
for f in "$db"/*.blob; do
  size=$(stat -c %s "$f")
  printf '\xde\xad\xbe\xef\xde\xad\xbe\xef' | dd of="$f" bs=1 seek=$((size / 2)) conv=notrunc status=none
done
expect_rc 2 "verify of a damaged store" "$ckptkv" verify --db "$db"
check "verify names a damaged tag" grep -q "problem: tag=global_step" "$tmp/err"

expect_rc 0 "bench --json (core)" "$ckptkv" bench --scenarios core --size-mb 16 --series 3 --json \
  --dir "$tmp"
for s in full_save_raw full_save_torch full_save_kv resave_unchanged_kv resave_10pct_kv \
         frozen_series_kv load_kv load_torch; do
  check "bench reports $s" grep -q "\"$s\"" "$tmp/out"
done

# The naive reshape (DeepSpeed's way) on a tiny tp2 x pp2 x dp2 checkpoint.
ds=$tmp/ds
expect_rc 0 "synth of a tiny DeepSpeed checkpoint" "$ckptkv" synth --db "$ds" --tag src \
  --tp 2 --pp 2 --dp 2 --zero-stage 2 --layers 2 --hidden 64 --vocab 100
expect_rc 0 "reshape --naive to tp1 pp1 dp1" "$ckptkv" reshape --naive --db "$ds" --tag src \
  --tp 1 --pp 1 --dp 1 --out-tag naive --json
check "naive reshape loaded files" grep -Eq '"files_loaded": [1-9]' "$tmp/out"
check "naive reshape read blocks" grep -Eq '"bytes_read": [1-9]' "$tmp/out"
check "naive reshape wrote one model and one optimizer file" grep -q '"files": 2' "$tmp/out"
expect_rc 0 "ls after the naive reshape" "$ckptkv" ls --db "$ds" --json
check "ls lists the naive tag" grep -q '"naive"' "$tmp/out"
expect_rc 0 "verify of the naive tag" "$ckptkv" verify --db "$ds" --tag naive
# Its files load whole again (and its layout is discovered from them).
expect_rc 0 "the naive tag loads" "$ckptkv" reshape --naive --db "$ds" --tag naive \
  --tp 1 --pp 1 --dp 1 --out-tag naive_again --json
check "the naive tag's files were loaded" grep -Eq '"files_loaded": [1-9]' "$tmp/out"
expect_rc 1 "reshape --naive refuses a TP expansion" "$ckptkv" reshape --naive --db "$ds" \
  --tag src --tp 4 --pp 2 --dp 2
check "the TP refusal names the dimension" grep -q "tp 2 -> 4 is an expansion" "$tmp/err"
expect_rc 1 "reshape --naive refuses a DP expansion" "$ckptkv" reshape --naive --db "$ds" \
  --tag src --tp 1 --pp 1 --dp 4
check "the DP refusal names the dimension" grep -q "DP: 2 ---> 4" "$tmp/err"
expect_rc 1 "reshape --naive --plan" "$ckptkv" reshape --naive --plan --db "$ds" --tag src
check "says --naive and --plan do not combine" grep -q "do not combine" "$tmp/err"
expect_rc 1 "reshape --naive --device cuda" "$ckptkv" reshape --naive --device cuda --db "$ds" \
  --tag src
check "says --naive is CPU only" grep -q "CPU only" "$tmp/err"
expect_rc 1 "reshape --naive of a missing store" "$ckptkv" reshape --naive --db "$tmp/nope" \
  --tag src
check "the missing store was not created" test ! -e "$tmp/nope"

# place: index a tag whose files were saved without placements.
expect_rc 0 "place a synth tag under a new name" "$ckptkv" place --db "$ds" --tag src \
  --out-tag src_placed --json
check "place placed tensors" grep -Eq '"placed_tensors": [1-9]' "$tmp/out"
check "place left no file unplaced" grep -q '"unplaced_files": \[\]' "$tmp/out"
expect_rc 0 "the placed tag plans a reshape" "$ckptkv" reshape --db "$ds" --tag src_placed \
  --tp 1 --pp 1 --dp 1 --plan --json
check "the plan reads bytes" grep -Eq '"bytes_to_read": [1-9]' "$tmp/out"
# merge_state concatenated replicated tensors too: the naive tag's module
# disagrees with its param_shapes, so its model file stays unplaced.
expect_rc 0 "place the naive tag" "$ckptkv" place --db "$ds" --tag naive --json
check "place names the naive tag's unplaced model file" grep -q '"file": "mp_rank_00_model_states.pt"' "$tmp/out"
check "and says why" grep -q 'param_shapes says' "$tmp/out"
expect_rc 0 "verify after place" "$ckptkv" verify --db "$ds"
expect_rc 1 "place of a missing tag" "$ckptkv" place --db "$ds" --tag nope
check "place names the missing tag" grep -q "nope" "$tmp/err"
printf '(\n' >"$tmp/rules.bad"
expect_rc 1 "place with a bad rules file" "$ckptkv" place --db "$ds" --tag src --rules "$tmp/rules.bad"
check "the rules error names the file" grep -q "rules.bad" "$tmp/err"

# Numeric options: whole numbers in range, or an error naming the option
# (regression: --threads -3 and --seed -1 wrapped, --iteration overflowed,
# and "1e1" was called "not in range").
for bad in "bench --threads -3" "bench --size-mb 16x" "synth --db $tmp/n --tag a --seed -1" \
           "synth --db $tmp/n --tag a --seed 18446744073709551616" \
           "synth --db $tmp/n --tag a --iteration 99999999999999999999" \
           "synth --db $tmp/n --tag a --layers 1e1" "synth --db $tmp/n --tag a --tp 0x2" \
           "demo --db $tmp/n --steps 2abc" "demo --db $tmp/n --every -4" \
           "demo --db $tmp/n --vocab 99999999999999999999"; do
  # shellcheck disable=SC2086
  expect_rc 1 "ckptkv $bad" "$ckptkv" $bad
  opt=$(echo "$bad" | grep -o -- '--[a-z-]* [^ ]*$' | cut -d' ' -f1)
  check "ckptkv $bad names $opt and what is valid" grep -q -- "$opt: '.*' is not valid: give a whole number from" "$tmp/err"
done
check "no store was made by a refused command" test ! -e "$tmp/n"

# The bench's reshape scenarios at a tiny size: both rows, with figures.
expect_rc 1 "bench --reshape-layers 3" "$ckptkv" bench --scenarios reshape --reshape-layers 3
check "names --reshape-layers" grep -q -- "--reshape-layers 3" "$tmp/err"
expect_rc 0 "bench --scenarios reshape --json" "$ckptkv" bench --scenarios reshape --json \
  --reshape-layers 2 --reshape-hidden 64 --reshape-vocab 100 --no-drop-caches --dir "$tmp"
# Per row and method, "seconds" and "bytes_read" (10 spaces deep) above 0.
positive=$(awk '
  /^      "tp[0-9]_pp[0-9]_dp[0-9]": \{/ { row = $1 }
  /^        "(fragment|naive)": \{/ { method = $1 }
  /^          "(seconds|bytes_read)": / { v = $2; sub(",", "", v); if (v + 0 > 0) print row method $1 }
' "$tmp/out" | sort -u | wc -l)
check "bench: both rows, both methods, positive seconds and bytes read (got $positive of 8)" \
  test "$positive" -eq 8
check "bench labels the naive baseline of the DP expansion" \
  grep -q '"naive_target": "tp1 pp1 dp1 (DeepSpeed cannot expand DP)"' "$tmp/out"
check "bench reports the RSS floor" grep -q '"floor"' "$tmp/out"
check "bench --scenarios reshape runs no core scenario" bash -c "! grep -q full_save_kv '$tmp/out'"
check "bench removed its scratch directory" bash -c "! ls -d '$tmp'/ckptkv-bench-* 2>/dev/null"

echo "$pass passed, $failures failed"
[ "$failures" -eq 0 ]
