#!/usr/bin/env bash
# Builds ckptkv with AddressSanitizer and UndefinedBehaviorSanitizer into
# build-asan/ (RelWithDebInfo, -DCKPTKV_SANITIZE=ON) and runs the tests
# there through ctest. Extra arguments go to ctest; by default the store,
# engine, kv-browser, checkpoint and fuzz tests run (the crash and lint
# tests add nothing under a sanitizer but time):
#   scripts/sanitize.sh                 # the default set
#   scripts/sanitize.sh -R store        # one part
# LibTorch and RocksDB are Debian's (not instrumented): errors inside them
# are reported only where they touch ckptkv's memory.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
BUILD_DIR=${BUILD_DIR:-build-asan}
JOBS=${JOBS:-2}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCKPTKV_SANITIZE=ON \
  -DCKPTKV_FUZZ_SECONDS="${FUZZ_SECONDS:-8}" >/dev/null
ninja -C "$BUILD_DIR" -j"$JOBS"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$PWD/scripts/lsan.supp:print_suppressions=0}
cd "$BUILD_DIR"
if [ $# -eq 0 ]; then
  set -- -LE 'crash|lint'
fi
ctest --output-on-failure "$@"
