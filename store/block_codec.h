// Encoding of a block value in the `blocks` column family:
//   byte 0      codec (0 raw, 1 zstd)
//   bytes 1..4  raw length, little-endian uint32
//   bytes 5..   payload (raw bytes, or a zstd frame)
// Decoding checks the header and lengths; it never trusts them.
#ifndef CKPTKV_STORE_BLOCK_CODEC_H_
#define CKPTKV_STORE_BLOCK_CODEC_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "store/status.h"

namespace ckptkv {

enum class Codec : uint8_t { kRaw = 0, kZstd = 1 };
inline constexpr size_t kBlockHeaderSize = 5;

// The 5-byte header of a block holding `raw_len` bytes encoded with `codec`.
std::string BlockHeader(Codec codec, size_t raw_len);
// Compresses with zstd into *out; false when that saves less than 1/16 of
// the bytes (the block is then stored raw).
bool CompressBlock(const uint8_t* data, size_t len, std::string* out);
// Header + payload in one string (CompressBlock, falling back to raw).
std::string EncodeBlock(Codec codec, const uint8_t* data, size_t len);
// Decodes `value` into exactly `raw_len` bytes at `out`.
Status DecodeBlock(std::string_view value, uint8_t* out, size_t raw_len);
// Reads the codec byte; false if the header is malformed.
bool PeekBlockHeader(std::string_view value, Codec* codec, uint32_t* raw_len);

}  // namespace ckptkv

#endif  // CKPTKV_STORE_BLOCK_CODEC_H_
