#include "store/block_codec.h"

#include <zstd.h>

#include <cstring>

namespace ckptkv {

std::string BlockHeader(Codec codec, size_t raw_len) {
  std::string h(kBlockHeaderSize, '\0');
  h[0] = static_cast<char>(codec);
  for (int i = 0; i < 4; ++i) h[1 + i] = static_cast<char>((raw_len >> (8 * i)) & 0xff);
  return h;
}

bool CompressBlock(const uint8_t* data, size_t len, std::string* out) {
  size_t bound = ZSTD_compressBound(len);
  out->resize(bound);
  size_t n = ZSTD_compress(out->data(), bound, data, len, 1);
  if (ZSTD_isError(n) || n + len / 16 >= len) return false;
  out->resize(n);
  return true;
}

std::string EncodeBlock(Codec codec, const uint8_t* data, size_t len) {
  std::string payload;
  if (codec == Codec::kZstd && CompressBlock(data, len, &payload)) {
    return BlockHeader(Codec::kZstd, len) + payload;
  }
  std::string out = BlockHeader(Codec::kRaw, len);
  out.append(reinterpret_cast<const char*>(data), len);
  return out;
}

bool PeekBlockHeader(std::string_view value, Codec* codec, uint32_t* raw_len) {
  if (value.size() < kBlockHeaderSize) return false;
  uint8_t c = static_cast<uint8_t>(value[0]);
  if (c > static_cast<uint8_t>(Codec::kZstd)) return false;
  uint32_t n = 0;
  for (int i = 0; i < 4; ++i)
    n |= static_cast<uint32_t>(static_cast<uint8_t>(value[1 + i])) << (8 * i);
  *codec = static_cast<Codec>(c);
  *raw_len = n;
  return true;
}

Status DecodeBlock(std::string_view value, uint8_t* out, size_t raw_len) {
  Codec codec;
  uint32_t len;
  if (!PeekBlockHeader(value, &codec, &len)) {
    return Status::Corruption(
        "block header is malformed (" + std::to_string(value.size()) + " bytes, codec byte " +
        (value.empty() ? std::string("none") : std::to_string(static_cast<uint8_t>(value[0]))) +
        ")");
  }
  if (len != raw_len) {
    return Status::Corruption("block holds " + std::to_string(len) + " bytes but " +
                              std::to_string(raw_len) + " were expected");
  }
  std::string_view payload = value.substr(kBlockHeaderSize);
  if (codec == Codec::kRaw) {
    if (payload.size() != raw_len) {
      return Status::Corruption("raw block payload is " + std::to_string(payload.size()) +
                                " bytes, header says " + std::to_string(raw_len));
    }
    if (raw_len) std::memcpy(out, payload.data(), raw_len);
    return Status::OK();
  }
  size_t n = ZSTD_decompress(out, raw_len, payload.data(), payload.size());
  if (ZSTD_isError(n) || n != raw_len) {
    return Status::Corruption(std::string("zstd block does not decode: ") +
                              (ZSTD_isError(n) ? ZSTD_getErrorName(n) : "wrong length"));
  }
  return Status::OK();
}

}  // namespace ckptkv
