#!/bin/bash
# Installs the build tree into a scratch prefix, then configures, builds and
# runs tests/install/consumer against it: find_package(ckptkv) and
# ckptkv::engine from outside the source tree.
# usage: install_test.sh <build dir> <source dir> [Torch_DIR]
set -euo pipefail
build=$1
src=$2
torch_dir=${3:-}
work=$(mktemp -d /tmp/ckptkv-install-test.XXXXXX)
trap 'rm -rf "$work"' EXIT

cmake --install "$build" --prefix "$work/prefix" > "$work/install.log"
for f in bin/ckptkv bin/kv-browser include/ckptkv/store/store.h \
         include/ckptkv/engine/kv_checkpoint_engine.h include/ckptkv/ckptkv_generated.h \
         include/ckptkv/checkpoint/query/reshape.h lib/cmake/ckptkv/ckptkvConfig.cmake; do
  [ -e "$work/prefix/$f" ] || { echo "FAIL: $f was not installed"; exit 1; }
done
if find "$work/prefix/include" -name '*_internal.h' | grep -q .; then
  echo "FAIL: a private header was installed"; exit 1
fi
cmake -S "$src/tests/install/consumer" -B "$work/consumer" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$work/prefix" \
  ${torch_dir:+-DTorch_DIR="$torch_dir"} > "$work/configure.log" ||
  { cat "$work/configure.log"; exit 1; }
cmake --build "$work/consumer" -j2 > "$work/build.log" || { cat "$work/build.log"; exit 1; }
mkdir "$work/store"
"$work/consumer/consumer" "$work/store"
# The Python package, when it was built: importable from the prefix alone,
# and it reads the store the C++ consumer wrote.
site=$(find "$work/prefix/lib" -maxdepth 3 -type d -path '*dist-packages' | head -n 1)
if [ -n "$site" ] && [ -d "$site/ckptkv" ]; then
  python=${CKPTKV_PYTHON:-/usr/bin/python3}
  (cd "$work" && PYTHONPATH="$site" "$python" -c "
import sys, ckptkv
assert ckptkv.__file__.startswith(sys.argv[1]), ckptkv.__file__
with ckptkv.Store(sys.argv[2], read_only=True) as s:
    assert s.tags() and s.verify()['ok'], s.tags()
print('python package: ok')
" "$site" "$work/store") || { echo "FAIL: the installed Python package"; exit 1; }
fi
echo "install test: ok"
