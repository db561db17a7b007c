#!/usr/bin/env bash
# Installs dependencies, builds ckptkv and runs the demo: a small training
# run that checkpoints every few steps into a local store (./ckptkv-demo),
# then resumes from `latest`. Extra arguments go to `ckptkv demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/build.sh ckptkv
exec "./${BUILD_DIR:-build}/bin/ckptkv" demo "$@"
