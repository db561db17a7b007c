// Fuzz target: a TensorRecord as read from the store (Verifier, then
// CheckTensorRecord and CheckPlacementRecord), and, for records that pass,
// Store::ReadTensorRange over a small real store whose blocks the seed
// records name. Whatever the bytes, the result is a Status: never a crash,
// an out-of-bounds access or an allocation beyond one chunk.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "store/record_check.h"
#include "store/store.h"
#include "tests/fuzz/fuzz_store.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static ckptkv::Store* store = ckptkv::fuzz::SeedStore();
  if (size < 8) return 0;
  // The last 8 bytes choose the range; the rest is the record.
  uint32_t off = 0, len = 0;
  for (int i = 0; i < 4; ++i) {
    off |= static_cast<uint32_t>(data[size - 8 + i]) << (8 * i);
    len |= static_cast<uint32_t>(data[size - 4 + i]) << (8 * i);
  }
  const std::string_view bytes(reinterpret_cast<const char*>(data), size - 8);
  const ckptkv::fb::TensorRecord* r = nullptr;
  if (!ckptkv::VerifyTensorRecordBytes(bytes, "fuzz", &r).ok()) return 0;
  const uint64_t total = r->byte_length();
  // Out of range: refused before anything is written.
  (void)store->ReadTensorRange(*r, total + 1, 1, nullptr, "fuzz");
  const uint64_t o = total ? off % (total + 1) : 0;
  const uint64_t n = std::min<uint64_t>({len, total - o, uint64_t{1} << 20});
  std::vector<uint8_t> dst(n);
  (void)store->ReadTensorRange(*r, o, n, dst.data(), "fuzz");
  return 0;
}
