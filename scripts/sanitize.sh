#!/usr/bin/env bash
# Builds ckptkv's store, engine and kv-browser tests and the fuzz targets
# with AddressSanitizer and UndefinedBehaviorSanitizer (-DCKPTKV_SANITIZE=ON,
# RelWithDebInfo) into build-asan/ and runs them through ctest. CI runs it
# before the test suite. Extra arguments go to ctest.
#   scripts/sanitize.sh                      # the default set
#   SANITIZE_TARGETS=all scripts/sanitize.sh -LE 'crash|lint'   # everything
# LibTorch and RocksDB are Debian's (not instrumented): errors inside them
# are reported only where they touch ckptkv's memory.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
ROOT=$PWD
BUILD_DIR=${BUILD_DIR:-build-asan}
JOBS=${JOBS:-2}
TARGETS=${SANITIZE_TARGETS:-store_tests engine_tests kv_browser_tests kv-browser
  kv_browser_fixture_writer checkpoint_tests record_fuzz block_fuzz state_tree_fuzz slice_fuzz
  torch_file_fuzz}
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCKPTKV_SANITIZE=ON \
  -DCKPTKV_FUZZ_SECONDS="${FUZZ_SECONDS:-8}" >/dev/null
if [ "$TARGETS" = all ]; then
  ninja -C "$BUILD_DIR" -j"$JOBS"
else
  # shellcheck disable=SC2086
  ninja -C "$BUILD_DIR" -j"$JOBS" $TARGETS
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$ROOT/scripts/lsan.supp:print_suppressions=0}
cd "$BUILD_DIR"
if [ $# -eq 0 ]; then
  # What the default targets cover; tests of targets not built are left out.
  set -- -L 'unit|kv-browser|fuzz|tui' -E 'NOT_BUILT|placement_fuzz|import_fuzz|kv_browser_engine_store'
fi
ctest --output-on-failure "$@"
