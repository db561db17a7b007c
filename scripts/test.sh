#!/usr/bin/env bash
# Installs dependencies, builds everything and runs the whole test suite
# through ctest (unit, engine and crash tests). Extra arguments go to ctest,
# e.g. scripts/test.sh -L unit
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh
cd "${BUILD_DIR:-build}"
ctest --output-on-failure "$@"
