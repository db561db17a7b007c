// Digest: the XXH3-128 content address of a block.
#ifndef CKPTKV_STORE_DIGEST_H_
#define CKPTKV_STORE_DIGEST_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace ckptkv {

struct Digest {
  uint64_t lo = 0;
  uint64_t hi = 0;

  static Digest Of(const void* data, size_t len);
  // 16-byte big-endian key (hi then lo), so keys sort like the hex form.
  std::string Key() const;
  static bool FromKey(std::string_view key, Digest* out);
  // 32 lowercase hex digits.
  std::string Hex() const;

  bool operator==(const Digest& o) const { return lo == o.lo && hi == o.hi; }
  bool operator!=(const Digest& o) const { return !(*this == o); }
};

struct DigestHash {
  size_t operator()(const Digest& d) const { return static_cast<size_t>(d.lo ^ (d.hi * 31)); }
};

}  // namespace ckptkv

#endif  // CKPTKV_STORE_DIGEST_H_
