#include "store/digest.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace ckptkv {

Digest Digest::Of(const void* data, size_t len) {
  XXH128_hash_t h = XXH3_128bits(data, len);
  return Digest{h.low64, h.high64};
}

std::string Digest::Key() const {
  std::string key(16, '\0');
  for (int i = 0; i < 8; ++i) {
    key[i] = static_cast<char>(hi >> (56 - 8 * i));
    key[8 + i] = static_cast<char>(lo >> (56 - 8 * i));
  }
  return key;
}

bool Digest::FromKey(std::string_view key, Digest* out) {
  if (key.size() != 16) return false;
  uint64_t hi = 0, lo = 0;
  for (int i = 0; i < 8; ++i) {
    hi = (hi << 8) | static_cast<uint8_t>(key[i]);
    lo = (lo << 8) | static_cast<uint8_t>(key[8 + i]);
  }
  *out = Digest{lo, hi};
  return true;
}

std::string Digest::Hex() const {
  static const char* kHex = "0123456789abcdef";
  std::string key = Key();
  std::string out;
  out.reserve(32);
  for (unsigned char c : key) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

}  // namespace ckptkv
