#!/usr/bin/env bash
# Installs ckptkv's build and test dependencies from Debian's packages.
# Idempotent: packages already present are skipped by apt-get.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config
  librocksdb-dev libtorch-dev
  libflatbuffers-dev flatbuffers-compiler
  libspdlog-dev libfmt-dev catch2
  libxxhash-dev libzstd-dev
  libcli11-dev nlohmann-json3-dev libncurses-dev
  tmux clang-format clang-tidy
  python3-dev python3-torch pybind11-dev python3-numpy python3-pytest
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
