// Fuzz target: kv-browser's slice parser. Input: a rank byte (at most 8
// dimensions), that many int64 dimensions (little-endian), then the slice
// text. Whatever ParseSlice accepts must select only elements inside the
// shape: the invariant kv-browser peek relies on to read within the tensor.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "tools/kv_browser/slice.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const size_t rank = data[0] % 9;
  if (size < 1 + 8 * rank) return 0;
  std::vector<int64_t> shape(rank);
  for (size_t d = 0; d < rank; ++d) {
    std::memcpy(&shape[d], data + 1 + 8 * d, 8);
    // Keep dimensions where the invariant can be checked by enumeration
    // half the time, arbitrary the other half.
    if (data[0] & 0x80) shape[d] = shape[d] % 100;
  }
  const std::string text(reinterpret_cast<const char*>(data) + 1 + 8 * rank, size - 1 - 8 * rank);
  auto dims = ckptkv::kvb::ParseSlice(text, shape);
  if (!dims.ok()) return 0;
  if (dims->size() != rank) std::abort();
  for (size_t d = 0; d < rank; ++d) {
    const auto& s = (*dims)[d];
    if (s.step == 0 || s.count < 0 || s.count > shape[d]) std::abort();
    if (s.count == 0) continue;
    // first and last selected elements inside [0, size)
    __int128 last = static_cast<__int128>(s.start) + static_cast<__int128>(s.count - 1) * s.step;
    if (s.start < 0 || s.start >= shape[d] || last < 0 || last >= shape[d]) std::abort();
    if (!s.keep && s.count != 1) std::abort();
  }
  return 0;
}
