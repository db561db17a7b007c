#!/usr/bin/env bash
# Runs ckptkv's fuzz targets under libFuzzer with AddressSanitizer and
# UndefinedBehaviorSanitizer (Debian's clang), each for FUZZ_SECONDS
# (default 60), starting from the checked-in seed corpus. New inputs
# libFuzzer finds go to build-fuzz/corpus/<target>; a crash leaves its input
# in build-fuzz/ (crash-*), to be replayed with `build-fuzz/bin/<target> FILE`
# and added to tests/fuzz/corpus/<target> with the fix.
#   scripts/fuzz.sh                      # every target
#   FUZZ_SECONDS=600 scripts/fuzz.sh record_fuzz
# ctest runs the same targets in the ordinary build through a plain
# mutation driver for a few seconds each; this script is the long run.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
if ! command -v clang++ >/dev/null || ! dpkg-query -W libclang-rt-14-dev >/dev/null 2>&1; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang libclang-rt-14-dev
fi
ROOT=$PWD
BUILD_DIR=${BUILD_DIR:-build-fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-60}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(record_fuzz block_fuzz state_tree_fuzz placement_fuzz slice_fuzz)
CC=clang CXX=clang++ cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCKPTKV_LIBFUZZER=ON -DCKPTKV_SANITIZE=ON >/dev/null
ninja -C "$BUILD_DIR" -j"${JOBS:-2}" "${targets[@]}"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
for t in "${targets[@]}"; do
  mkdir -p "$BUILD_DIR/corpus/$t"
  echo "== $t for ${SECONDS_EACH}s"
  (cd "$BUILD_DIR" && "bin/$t" -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
     -rss_limit_mb=2048 "corpus/$t" "$ROOT/tests/fuzz/corpus/$t" 2>&1 |
     grep -E "stat::number_of_executed_units|stat::average_exec_per_sec|stat::peak_rss_mb|ERROR|SUMMARY|Done" || true)
done
