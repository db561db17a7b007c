// Fuzz target: the block codec. The input's first byte picks a mode:
//   even: the rest is a stored block value, decoded into the raw length of
//         its next 3 bytes (at most 4 MiB, as a record would bound it);
//         whatever the bytes, a Status: never a crash, an out-of-bounds
//         write or an allocation beyond that length;
//   odd:  the rest is raw chunk bytes, encoded with codec (byte >> 1) % 3
//         grouped by 0, 2, 4 or 8 ((byte >> 3) % 4) and decoded again:
//         the result must be the same bytes, or the target aborts.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "store/block_codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using ckptkv::Codec;
  if (size < 4) return 0;
  const uint8_t mode = data[0];
  std::vector<uint8_t> scratch;
  if (mode % 2 == 0) {
    const size_t raw_len = (static_cast<size_t>(data[1]) | static_cast<size_t>(data[2]) << 8 |
                            static_cast<size_t>(data[3]) << 16) %
                           ((size_t{4} << 20) + 1);
    const std::string_view value(reinterpret_cast<const char*>(data + 4), size - 4);
    std::vector<uint8_t> out(raw_len);
    (void)ckptkv::DecodeBlock(value, out.data(), raw_len, &scratch);
    return 0;
  }
  static const Codec kCodecs[] = {Codec::kRaw, Codec::kZstd, Codec::kGroupedZstd};
  static const uint32_t kSizes[] = {0, 2, 4, 8};
  const Codec codec = kCodecs[(mode >> 1) % 3];
  const uint32_t es = kSizes[(mode >> 3) % 4];
  const uint8_t* raw = data + 1;
  const size_t len = size - 1;
  const std::string block = ckptkv::EncodeBlock(codec, raw, len, es);
  std::vector<uint8_t> back(len);
  const ckptkv::Status s = ckptkv::DecodeBlock(block, back.data(), len, &scratch);
  if (!s.ok() || (len && std::memcmp(back.data(), raw, len) != 0)) std::abort();
  return 0;
}
