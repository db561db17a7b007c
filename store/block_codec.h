// Encoding of a block value in the `blocks` column family:
//   byte 0      codec (0 raw, 1 zstd, 2 grouped zstd)
//   bytes 1..4  raw length, little-endian uint32
//   bytes 5..   payload: the raw bytes; one zstd frame; or (grouped) one
//               byte element size (2, 4 or 8), then one zstd frame of the
//               byte-grouped bytes (docs/format.md, "Encoded block")
// Decoding checks the header and lengths; it never trusts them.
#ifndef CKPTKV_STORE_BLOCK_CODEC_H_
#define CKPTKV_STORE_BLOCK_CODEC_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "schema/records.h"
#include "store/status.h"

namespace ckptkv {

enum class Codec : uint8_t { kRaw = 0, kZstd = 1, kGroupedZstd = 2 };
inline constexpr uint8_t kMaxCodec = static_cast<uint8_t>(Codec::kGroupedZstd);
inline constexpr size_t kBlockHeaderSize = 5;

// Whether `c` is a codec byte this version reads.
inline bool IsKnownCodec(uint8_t c) { return c <= kMaxCodec; }
// "raw", "zstd", "grouped-zstd"; "codec N" for an unknown byte.
std::string CodecName(uint8_t codec);
inline std::string CodecName(Codec codec) { return CodecName(static_cast<uint8_t>(codec)); }
// The codec a name (as CodecName gives it) stands for.
std::optional<Codec> ParseCodec(std::string_view name);
// "valid: 0 (raw), 1 (zstd) or 2 (grouped-zstd)", for messages.
std::string ValidCodecs();

// The element size grouped zstd groups the bytes of a dtype by: 2 for
// bf16 / fp16, 4 for fp32 and complex64 (its float parts), 8 for fp64 and
// complex128; 0 (plain zstd) for the other dtypes.
uint32_t GroupElementSize(fb::DType dtype);

// zstd levels (measured: docs/architecture.md, "Block codecs"). Codec 2
// runs zstd at a very negative level with Huffman coding of literals kept
// on: on grouped floats the gain is entropy coding, matches are rare, and
// this level is about twice as fast as level 1 for the same ratio.
inline constexpr int kZstdLevel = 1;
inline constexpr int kGroupedZstdLevel = -50;
// Chunks longer than twice this are first compressed on a sample of this
// many leading bytes; a sample that saves less than 1/32 keeps the chunk raw.
inline constexpr size_t kSampleBytes = size_t{64} << 10;

// The 5-byte header of a block holding `raw_len` bytes encoded with `codec`.
std::string BlockHeader(Codec codec, size_t raw_len);
// Compresses with zstd into *out; false when that saves less than 1/16 of
// the bytes (the block is then stored raw).
bool CompressBlock(const uint8_t* data, size_t len, std::string* out);
// How one chunk is stored when `preferred` is asked for: kRaw stores it
// raw; kZstd compresses it with zstd; kGroupedZstd byte-groups it by
// `element_size` (2, 4 or 8; any other value means plain zstd) and then
// compresses it. A chunk is kept raw when a sample of it (kSampleBytes)
// saves less than 1/32 or the whole saves less than 1/16. Returns the codec
// used; unless it is kRaw, *payload holds the block's payload (what follows
// the header). `level` replaces the codec's zstd level (measurements).
Codec EncodeChunk(Codec preferred, uint32_t element_size, const uint8_t* data, size_t len,
                  std::string* payload, std::optional<int> level = std::nullopt);
// Header + payload in one string (EncodeChunk).
std::string EncodeBlock(Codec codec, const uint8_t* data, size_t len, uint32_t element_size = 0);
// Decodes `value` into exactly `raw_len` bytes at `out`. A grouped block
// needs a scratch buffer of raw_len bytes: *scratch, or a buffer of the
// calling thread (kept, so bounded by the largest chunk it decoded).
Status DecodeBlock(std::string_view value, uint8_t* out, size_t raw_len,
                   std::vector<uint8_t>* scratch = nullptr);
// Reads the codec byte and raw length; false if the header is malformed
// (too short, or an unknown codec).
bool PeekBlockHeader(std::string_view value, Codec* codec, uint32_t* raw_len);

// Byte grouping of `len` bytes by `element_size` (2, 4 or 8): stream k
// holds byte k of every whole element, streams concatenated, then the
// len % element_size tail bytes as they are. Ungroup is the inverse.
void GroupBytes(const uint8_t* src, size_t len, uint32_t element_size, uint8_t* dst);
void UngroupBytes(const uint8_t* src, size_t len, uint32_t element_size, uint8_t* dst);

}  // namespace ckptkv

#endif  // CKPTKV_STORE_BLOCK_CODEC_H_
