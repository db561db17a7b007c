#!/usr/bin/env bash
# Builds and tests ckptkv's CUDA paths on a GPU host that has PyTorch (and so
# a CUDA LibTorch) but neither ckptkv's Debian packages nor a network.
#
#   tools/gpu-check.sh pack      on Debian 12 with apt: download the .deb files
#                                of every build dependency into .gpu-debs/
#   tools/gpu-check.sh run       on the GPU host: unpack them into .gpu-deps/,
#                                build against PyTorch's LibTorch, run the
#                                tests and compare a reshape on cuda with one
#                                on cpu; logs to $OUT when it is set
#   tools/gpu-check.sh rehearse  on the Debian machine that ran pack: `run`
#                                in a mount namespace where the system's copies
#                                of the packed packages are hidden, against
#                                Debian's CPU LibTorch (the CUDA cases skip)
#
# docs/gpu.md has the invocations. Environment:
#   CKPTKV_GPU_DEBS     where pack puts the .debs      (default .gpu-debs)
#   CKPTKV_GPU_PREFIX   where run unpacks them         (default .gpu-deps)
#   BUILD_DIR           build directory                (default build-gpu)
#   TORCH_CMAKE_PREFIX  LibTorch's CMake prefix (default: PyTorch's,
#                       torch.utils.cmake_prefix_path)
#   CKPTKV_GPU_DEVICE   device compared with cpu       (default cuda)
#   CKPTKV_GPU_EXPECT_CUDA  1: a skipped CUDA test or an unusable device is a
#                       failure (default); 0: expect CUDA to be absent
#   JOBS                build parallelism              (default nproc)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEBS=$(realpath -m "${CKPTKV_GPU_DEBS:-$ROOT/.gpu-debs}")
PREFIX=$(realpath -m "${CKPTKV_GPU_PREFIX:-$ROOT/.gpu-deps}")
BUILD=$(realpath -m "${BUILD_DIR:-$ROOT/build-gpu}")
ARCH=x86_64-linux-gnu
# The carry limit of the remote runner: the working tree and the .debs together.
CARRY_LIMIT=$((64 * 1024 * 1024))

# Every build dependency of ckptkv (scripts/install-deps.sh, less the
# compiler, CMake and LibTorch, which the GPU host has), the libraries
# librocksdb links (readelf NEEDED: gflags, snappy, zlib, bz2, lz4, zstd; no
# jemalloc or uring in Debian 12's build) with their -dev packages, which
# RocksDBConfig.cmake looks for, and pkg-config for xxhash and zstd.
PACKAGES=(
  librocksdb-dev librocksdb7.8
  libgflags-dev libgflags2.2 libsnappy-dev libsnappy1v5 zlib1g-dev zlib1g
  libbz2-dev libbz2-1.0 liblz4-dev liblz4-1 libzstd-dev libzstd1
  libflatbuffers-dev libflatbuffers2 flatbuffers-compiler flatbuffers-compiler-dev
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 catch2
  libxxhash-dev libxxhash0 libcli11-dev nlohmann-json3-dev
  libncurses-dev libncurses6 libncursesw6 libtinfo6
  ninja-build pkgconf pkgconf-bin libpkgconf3
)
# Libraries every host has (glibc, the C++ runtime): not packed.
HOST_LIBS='^(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\+\+|ld-linux-x86-64)\.so'
# Packages a GPU host's base system has anyway: rehearse leaves them visible.
HOST_BASE='^(zlib1g|libzstd1|liblz4-1|libbz2-1.0|libtinfo6|libncursesw6|libncurses6)$'
# The test executables run, and the programs the CLI check uses.
TESTS=(engine_tests reshape_tests cuda_tests deepspeed_tests)
SKIPPED="skipped: CUDA is not available"

say() { echo "gpu-check: $*"; }
die() {
  echo "gpu-check: error: $*" >&2
  exit 1
}
mib() { awk -v b="$1" 'BEGIN { printf "%.2f MiB", b / 1048576 }'; }

# --- pack -------------------------------------------------------------------

# Fails if an ELF file under $1 needs a library that is neither there nor
# one every host has.
check_closure() {
  local tree=$1 missing=0 f lib
  local have
  have=$(find "$tree" \( -type f -o -type l \) -name 'lib*.so*' -printf '%f\n' | sort -u)
  while IFS= read -r f; do
    readelf -h "$f" >/dev/null 2>&1 || continue
    for lib in $(readelf -d "$f" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
      if ! grep -qxF "$lib" <<<"$have" && ! [[ $lib =~ $HOST_LIBS ]]; then
        echo "gpu-check: ${f#"$tree"} needs $lib, which no packed package provides" >&2
        missing=1
      fi
    done
  done < <(find "$tree" -type f \( -name '*.so*' -o -path '*/bin/*' \))
  return $missing
}

cmd_pack() {
  command -v apt-get >/dev/null || die "pack needs apt-get (Debian 12)"
  local sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  if [ "${CKPTKV_GPU_APT_UPDATE:-1}" = 1 ]; then
    say "apt-get update"
    $sudo apt-get update -qq
  fi
  rm -rf "$DEBS"
  mkdir -p "$DEBS"
  say "downloading ${#PACKAGES[@]} packages into $DEBS"
  (cd "$DEBS" && apt-get download -qq "${PACKAGES[@]}")
  # apt-get download names files with %3a for ':' in epochs.
  local n
  n=$(find "$DEBS" -name '*.deb' | wc -l)
  [ "$n" -eq "${#PACKAGES[@]}" ] || die "expected ${#PACKAGES[@]} .deb files, got $n"
  local tmp
  tmp=$(mktemp -d)
  for d in "$DEBS"/*.deb; do dpkg-deb -x "$d" "$tmp"; done
  if ! check_closure "$tmp"; then
    rm -rf "$tmp"
    die "the packed libraries need more packages (above); add them to PACKAGES"
  fi
  rm -rf "$tmp"
  (cd "$DEBS" && for d in *.deb; do dpkg-deb -f "$d" Package Version | sed 's/^[^:]*: //' | paste -sd' '; done) \
    >"$DEBS/MANIFEST"
  local debs tree
  debs=$(du -cb "$DEBS"/* | tail -1 | cut -f1)
  # What else travels with a remote run: tracked and untracked, not ignored.
  tree=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard |
    xargs -0 -r du -cb 2>/dev/null | awk '$2 == "total" { s += $1 } END { print s + 0 }')
  say "$n packages, $debs bytes ($(mib "$debs")) in $DEBS; MANIFEST lists them"
  say "with the working tree ($(mib "$tree")): $(mib $((debs + tree))) of the 64 MiB carry limit"
  [ $((debs + tree)) -le $CARRY_LIMIT ] || die "over the 64 MiB carry limit"
}

# --- run --------------------------------------------------------------------

FAILURES=()
LOGS=""
fail() {
  FAILURES+=("$1")
  say "FAILED: $1"
}

# Copies the logs into $OUT (at most 8 files come back from a remote run).
finish() {
  local rc=$?
  if [ -n "${OUT:-}" ] && [ -n "$LOGS" ] && [ -d "$LOGS" ]; then
    mkdir -p "$OUT"
    cp -f "$LOGS/summary.txt" "$OUT/" 2>/dev/null || true
    cp -f "$LOGS/cuda_tests.log" "$OUT/" 2>/dev/null || true
    tar -czf "$OUT/gpu-check-logs.tar.gz" -C "$(dirname "$LOGS")" "$(basename "$LOGS")" || true
  fi
  exit $rc
}

unpack() {
  compgen -G "$DEBS/*.deb" >/dev/null || die "no .deb files in $DEBS: run 'tools/gpu-check.sh pack' on Debian 12 and carry $DEBS"
  rm -rf "$PREFIX"
  mkdir -p "$PREFIX"
  local d
  for d in "$DEBS"/*.deb; do
    if command -v dpkg-deb >/dev/null; then
      dpkg-deb -x "$d" "$PREFIX"
    else
      # No dpkg: a .deb is an ar archive holding data.tar.*.
      local member
      member=$(ar t "$d" | grep '^data\.tar')
      ar p "$d" "$member" | tar -xa -f - -C "$PREFIX" 2>/dev/null ||
        ar p "$d" "$member" | tar -xJ -f - -C "$PREFIX"
    fi
  done
  # Absolute symlinks (libz.so -> /lib/...) point into the prefix instead.
  local l t
  while IFS= read -r l; do
    t=$(readlink "$l")
    ln -sfn "$PREFIX$t" "$l"
  done < <(find "$PREFIX" -type l -lname '/*')
  # pkg-config files: prefix=/usr becomes the unpacked prefix.
  find "$PREFIX" -name '*.pc' -path '*/pkgconfig/*' -exec \
    sed -i "s|^prefix=/usr\$|prefix=$PREFIX/usr|" {} +
  # CMake packages that name files by absolute path (Snappy's targets,
  # RocksDB's libbz2.so) name the unpacked ones.
  find "$PREFIX/usr" -name '*.cmake' \( -iname '*targets*' -o -iname '*config.cmake' \) \
    -exec sed -i -e "s|\([\";]\)/usr/|\1$PREFIX/usr/|g" -e "s|\"/usr\"|\"$PREFIX/usr\"|g" {} +
  say "unpacked $(find "$DEBS" -name '*.deb' | wc -l) packages into $PREFIX"
}

torch_prefix() {
  if [ -n "${TORCH_CMAKE_PREFIX:-}" ]; then
    echo "$TORCH_CMAKE_PREFIX"
    return
  fi
  python3 -c 'import torch; print(torch.utils.cmake_prefix_path)' 2>/dev/null ||
    die "no TORCH_CMAKE_PREFIX and no python3 with torch to ask"
}

cmd_run() {
  local expect_cuda=${CKPTKV_GPU_EXPECT_CUDA:-1}
  local device=${CKPTKV_GPU_DEVICE:-cuda}
  mkdir -p "$BUILD"
  LOGS="$BUILD/gpu-check-logs"
  rm -rf "$LOGS"
  mkdir -p "$LOGS"
  trap finish EXIT
  exec > >(tee "$LOGS/run.log") 2>&1
  say "$(date -u +%FT%TZ) on $(uname -n), $(nproc) CPUs"
  if command -v nvidia-smi >/dev/null; then nvidia-smi -L || true; else say "no nvidia-smi"; fi
  # PyTorch is asked first, before LD_LIBRARY_PATH names Debian's libraries.
  local torch
  torch=$(torch_prefix)
  [ -d "$torch/Torch" ] || die "no Torch/ CMake package under '$torch'"
  say "LibTorch: $torch"
  if [ -z "${TORCH_CMAKE_PREFIX:-}" ]; then
    # PyTorch's LibTorch: the C++ ABI must match Debian's libraries, and a
    # CUDA build's CMake package needs nvcc. CMake and ninja may live beside
    # its python (pip packages) without being on PATH.
    local abi cuda
    abi=$(python3 -c 'import torch; print(int(getattr(torch, "compiled_with_cxx11_abi", lambda: torch._C._GLIBCXX_USE_CXX11_ABI)()))')
    [ "$abi" = 1 ] || die "this PyTorch uses the pre-C++11 ABI (_GLIBCXX_USE_CXX11_ABI=0); Debian's libraries need the C++11 ABI (PyTorch >= 2.7 wheels have it)"
    cuda=$(python3 -c 'import torch; print(torch.version.cuda or "")')
    say "PyTorch $(python3 -c 'import torch; print(torch.__version__, "cuda available:", torch.cuda.is_available())'), CUDA '$cuda'"
    local pybin
    pybin=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
    export PATH="$PATH:$pybin"
    if [ -n "$cuda" ] && [ -z "${CUDACXX:-}" ] && ! command -v nvcc >/dev/null; then
      for n in /usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc; do
        if [ -x "$n" ]; then
          export CUDACXX=$n
          break
        fi
      done
    fi
  fi
  command -v cmake >/dev/null || die "cmake is not installed"
  command -v c++ >/dev/null || command -v g++ >/dev/null || die "no C++ compiler (c++ / g++)"

  unpack
  local lib1="$PREFIX/usr/lib/$ARCH" lib2="$PREFIX/lib/$ARCH"
  export LD_LIBRARY_PATH="$lib1:$lib2${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PKG_CONFIG_PATH="$lib1/pkgconfig:$PREFIX/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  # The host's tools first; the unpacked ninja and pkg-config where it has none.
  export PATH="$PATH:$PREFIX/usr/bin"
  if ! command -v pkg-config >/dev/null && command -v pkgconf >/dev/null; then
    PKG_CONFIG=$(command -v pkgconf)
    export PKG_CONFIG
  fi
  local missing
  missing=$(ldd "$lib1"/librocksdb.so.* "$PREFIX/usr/bin/flatc" 2>&1 | grep 'not found' || true)
  [ -z "$missing" ] || die "unpacked libraries do not load here: $missing"

  local cmake_args=(
    -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=$PREFIX/usr;$torch"
    "-DCMAKE_LIBRARY_ARCHITECTURE=$ARCH"
    "-DCMAKE_MAKE_PROGRAM=$(command -v ninja)"
    # -ltinfo in libncurses.so's linker script, and transitive libraries.
    "-DCMAKE_EXE_LINKER_FLAGS=-L$lib1 -L$lib2"
    # CMake 4 refuses config files that ask for CMake < 3.5; older ignore this.
    -DCMAKE_POLICY_VERSION_MINIMUM=3.5
  )
  rm -f "$BUILD/CMakeCache.txt"
  say "configure: cmake ${cmake_args[*]}"
  cmake "${cmake_args[@]}" >"$LOGS/configure.log" 2>&1 || {
    tail -40 "$LOGS/configure.log"
    die "configure failed; $LOGS/configure.log"
  }
  say "build: ${TESTS[*]} ckptkv kv-browser"
  local t0=$SECONDS
  ninja -C "$BUILD" -j"${JOBS:-$(nproc)}" "${TESTS[@]}" ckptkv kv-browser >"$LOGS/build.log" 2>&1 || {
    grep -E -A5 'error|FAILED' "$LOGS/build.log" | head -60
    die "build failed; $LOGS/build.log"
  }
  say "built in $((SECONDS - t0)) s"

  local t rc
  for t in "${TESTS[@]}"; do
    t0=$SECONDS
    rc=0
    "$BUILD/bin/$t" >"$LOGS/$t.log" 2>&1 || rc=$?
    say "$t: exit $rc in $((SECONDS - t0)) s; $(grep -E '^(All tests passed|test cases:)' "$LOGS/$t.log" | tail -1)"
    if [ $rc -ne 0 ]; then
      grep -B2 -A12 'FAILED' "$LOGS/$t.log" | head -80
      fail "$t"
    fi
  done
  local skips
  skips=$(grep -c "$SKIPPED" "$LOGS/cuda_tests.log" || true)
  if [ "$expect_cuda" = 1 ] && [ "$skips" -gt 0 ]; then
    fail "cuda_tests skipped $skips CUDA test case(s): LibTorch sees no GPU"
  elif [ "$expect_cuda" != 1 ]; then
    say "cuda_tests: $skips CUDA test case(s) skipped, as expected without CUDA"
  fi

  cli_check "$device" "$expect_cuda" || fail "CLI: reshape on $device vs cpu"
  {
    echo "gpu-check on $(uname -n) at $(date -u +%FT%TZ)"
    echo "LibTorch: $torch"
    for t in "${TESTS[@]}"; do
      echo "$t: $(grep -E '^(All tests passed|test cases:)' "$LOGS/$t.log" | tail -1)"
    done
    echo "cuda_tests skipped CUDA cases: $skips"
    echo "failures: ${#FAILURES[@]} ${FAILURES[*]:-}"
  } >"$LOGS/summary.txt"
  cat "$LOGS/summary.txt"
  if [ ${#FAILURES[@]} -gt 0 ]; then
    say "FAILED: ${FAILURES[*]}"
    exit 1
  fi
  say "all checks passed"
}

# ckptkv synth, then reshape and export-universal on cpu and on $1 into two
# tags each, compared tensor by tensor (kv-browser diff), by tree, and by
# re-hashing every block (ckptkv verify). Without CUDA, --device cuda must be
# refused by name. Each step is checked by hand: errexit does not apply in a
# function whose status is tested.
cli_check() {
  local device=$1 expect_cuda=$2
  local bin="$BUILD/bin" db="$BUILD/gpu-check-db" log="$LOGS/cli.log"
  rm -rf "$db"
  (
    step() {
      echo "+ $*" >&2
      "$@" || {
        echo "step failed (exit $?): $*"
        exit 1
      }
    }
    step "$bin/ckptkv" synth --db "$db" --tag src --tp 2 --pp 2 --dp 2 --zero-stage 2
    if [ "$expect_cuda" != 1 ]; then
      local err rc=0
      err=$("$bin/ckptkv" reshape --db "$db" --tag src --tp 1 --pp 1 --dp 1 \
        --out-tag refused --device cuda 2>&1) || rc=$?
      echo "--device cuda without CUDA: exit $rc: $err"
      [ $rc -eq 1 ] || exit 1
      grep -q "'cuda'" <<<"$err" || exit 1
      grep -q "use --device cpu" <<<"$err" || exit 1
      if "$bin/kv-browser" --db "$db" tree refused >/dev/null 2>&1; then
        echo "the refused reshape left a tag"
        exit 1
      fi
    fi
    local side dev kind a b
    for side in cpu dev; do
      dev=cpu
      [ $side = cpu ] || dev=$device
      step "$bin/ckptkv" reshape --db "$db" --tag src --tp 1 --pp 1 --dp 1 \
        --out-tag "reshaped_on_$side" --device "$dev" --json
      step "$bin/ckptkv" export-universal --db "$db" --tag src --out-tag "universal_on_$side" \
        --device "$dev" --json
    done
    for kind in reshaped universal; do
      a="${kind}_on_cpu"
      b="${kind}_on_dev"
      step "$bin/kv-browser" --db "$db" diff "$a" "$b" --json >"$LOGS/diff_$kind.json"
      python3 - "$LOGS/diff_$kind.json" "$a" "$b" <<'PY' || exit 1
import json, sys
d = json.load(open(sys.argv[1]))
bad = {k: len(d[k]) for k in ("added", "removed", "reshaped", "changed") if d[k]}
print(f"diff {sys.argv[2]} {sys.argv[3]}: {d['unchanged']} tensors unchanged, "
      f"{d['logical_bytes_a']} / {d['logical_bytes_b']} bytes; differences: {bad or 'none'}")
sys.exit(1 if bad or d["unchanged"] == 0 or d["logical_bytes_a"] != d["logical_bytes_b"] else 0)
PY
      step "$bin/kv-browser" --db "$db" tree "$a" --expand --json >"$LOGS/tree_$a.json"
      step "$bin/kv-browser" --db "$db" tree "$b" --expand --json >"$LOGS/tree_$b.json"
      python3 - "$LOGS/tree_$a.json" "$LOGS/tree_$b.json" <<'PY' || exit 1
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
a.pop("tag"); b.pop("tag")
print("trees equal (files, coordinates, parameters, dtypes, shapes):", a == b)
sys.exit(0 if a == b else 1)
PY
    done
    step "$bin/ckptkv" verify --db "$db" --json
  ) >"$log" 2>&1
  local rc=$?
  cat "$log"
  return $rc
}

# --- rehearse ---------------------------------------------------------------

# On the Debian machine that packed: hide every file of the packed packages
# installed here (less the base libraries a GPU host has), then `run` against
# Debian's CPU LibTorch, so that only the unpacked prefix can satisfy them.
cmd_rehearse() {
  [ "$(id -u)" -eq 0 ] || die "rehearse needs root (a mount namespace)"
  if [ "${CKPTKV_GPU_HIDDEN:-}" != 1 ]; then
    exec unshare -m --propagation private env CKPTKV_GPU_HIDDEN=1 "$0" rehearse
  fi
  local ov
  ov=$(mktemp -d)
  mount -t tmpfs none "$ov"
  mkdir -p "$ov/upper" "$ov/work"
  local p f n=0 hidden=()
  for p in "${PACKAGES[@]}"; do
    [[ $p =~ $HOST_BASE ]] && continue
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || continue
    hidden+=("$p")
    while IFS= read -r f; do
      [ -e "$f" ] || [ -L "$f" ] || continue
      [ -d "$f" ] && [ ! -L "$f" ] && continue
      # /lib/... is /usr/lib/... here; whiteouts live in the /usr overlay.
      f="$(realpath "$(dirname "$f")")/$(basename "$f")"
      [[ $f == /usr/* ]] || continue
      mkdir -p "$ov/upper/$(dirname "${f#/usr/}")"
      [ -e "$ov/upper/${f#/usr/}" ] || mknod "$ov/upper/${f#/usr/}" c 0 0
      n=$((n + 1))
    done < <(dpkg -L "$p")
  done
  mount -t overlay overlay -o "lowerdir=/usr,upperdir=$ov/upper,workdir=$ov/work" /usr
  say "rehearse: hid $n files of ${#hidden[@]} installed packages: ${hidden[*]}"
  for f in /usr/include/rocksdb/db.h /usr/bin/flatc /usr/lib/$ARCH/librocksdb.so.7.8 \
    /usr/lib/$ARCH/pkgconfig/libxxhash.pc /usr/include/spdlog/spdlog.h /usr/bin/ninja; do
    [ ! -e "$f" ] || die "rehearse: $f is still visible"
  done
  export TORCH_CMAKE_PREFIX=${TORCH_CMAKE_PREFIX:-/usr/lib/$ARCH/cmake}
  export CKPTKV_GPU_EXPECT_CUDA=${CKPTKV_GPU_EXPECT_CUDA:-0}
  export CKPTKV_GPU_DEVICE=${CKPTKV_GPU_DEVICE:-cpu}
  cmd_run
}

case "${1:-}" in
  pack) cmd_pack ;;
  run) cmd_run ;;
  rehearse) cmd_rehearse ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 2
    ;;
esac
