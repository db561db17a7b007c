// Record codecs of the store: the bytes of the values it writes and how
// they are read back (docs/format.md). Pure functions: no Store state, no
// RocksDB, no LibTorch.
//
//   index value   raw length u32, stored length u32, codec u8 (little-endian)
//   u64 counter   8 bytes little-endian (meta/next_sequence)
//   block keys    `blocks` CF: 'B' + digest key = payload, 'P' + digest key =
//                 presence record (the index value of a block no commit has
//                 indexed yet)
//   records       TensorRecord, CommitRecord, StoreHeader (FlatBuffers)
#ifndef CKPTKV_STORE_RECORD_CODEC_H_
#define CKPTKV_STORE_RECORD_CODEC_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "schema/records.h"
#include "store/block_codec.h"
#include "store/digest.h"
#include "store/store.h"

namespace ckptkv {

// Keys in the `blocks` column family: the payload, and a small presence
// record (the index value) written in the same batch. Both are in one
// column family so that one flush persists both; gc finds blocks that no
// commit indexed by scanning the presence records, never the payloads.
inline constexpr char kPayloadPrefix = 'B';
inline constexpr char kPresencePrefix = 'P';
std::string PayloadKey(const Digest& d);
std::string PresenceKey(const Digest& d);

// Index value: raw length u32, stored length u32, codec u8 (little-endian).
inline constexpr size_t kIndexValueSize = 9;
std::string EncodeIndexValue(uint32_t raw, uint32_t stored, Codec codec);
// False for a value of the wrong size or an unknown codec (raw and stored
// are set whenever the size is right).
bool DecodeIndexValue(std::string_view v, uint32_t* raw, uint32_t* stored);

std::string EncodeU64(uint64_t x);
bool DecodeU64(std::string_view v, uint64_t* x);

Digest FromFb(const fb::Digest128& d);
// Whole-tensor digest: XXH3-128 over the concatenated chunk digests.
Digest DigestOfChunks(const std::vector<Digest>& chunks);

// A TensorRecord: inline bytes when `inline_data` is set (byte_length of
// them), the chunk list otherwise.
std::string BuildTensorRecord(const TensorMeta& meta, uint64_t byte_length, uint32_t chunk_size,
                              const std::vector<Digest>& chunks, const uint8_t* inline_data,
                              Digest digest);

std::string BuildCommitRecord(const TagInfo& t);
TagInfo ToTagInfo(const fb::CommitRecord& r);

// The StoreHeader of a new store (format version kFormatVersion).
std::string BuildStoreHeader(uint32_t chunk_size, uint32_t inline_threshold, Codec codec,
                             int64_t created_at_ms);

}  // namespace ckptkv

#endif  // CKPTKV_STORE_RECORD_CODEC_H_
