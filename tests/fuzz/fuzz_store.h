// The small store the fuzz targets read through: created once per process
// in a temporary directory, with one tag whose tensors span several chunks
// (the seed corpus names their blocks).
#ifndef CKPTKV_TESTS_FUZZ_FUZZ_STORE_H_
#define CKPTKV_TESTS_FUZZ_FUZZ_STORE_H_

#include <stdlib.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "store/store.h"
#include "tests/store_util.h"

namespace ckptkv::fuzz {

inline constexpr uint32_t kFuzzChunk = 4096;

// Deterministic bytes of the seed tensor "w" (3.5 chunks).
inline std::vector<uint8_t> SeedBytes() {
  std::vector<uint8_t> v(kFuzzChunk * 7 / 2);
  uint32_t x = 12345;
  for (auto& b : v) {
    x = x * 1103515245u + 12345u;
    b = static_cast<uint8_t>(x >> 16);
  }
  return v;
}

inline Store* SeedStore() {
  std::string dir = (std::filesystem::temp_directory_path() / "ckptkv-fuzz-XXXXXX").string();
  if (::mkdtemp(dir.data()) == nullptr) std::abort();
  static std::string cleanup;
  cleanup = dir;
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(cleanup, ec);
  });
  StoreOptions o;
  o.chunk_size = kFuzzChunk;
  o.inline_threshold = 256;
  o.threads = 1;
  auto s = Store::Open(dir, o);
  if (!s.ok()) {
    std::fprintf(stderr, "fuzz store: %s\n", s.status().ToString().c_str());
    std::abort();
  }
  Store* store = s.value().release();
  const std::vector<uint8_t> bytes = SeedBytes();
  if (!store->BeginTag("t").ok() || !testing::PutBytes(*store, "t", "f", "w", bytes).ok()) {
    std::abort();
  }
  return store;  // the tag stays pending: its blocks are written and readable
}

}  // namespace ckptkv::fuzz

#endif  // CKPTKV_TESTS_FUZZ_FUZZ_STORE_H_
