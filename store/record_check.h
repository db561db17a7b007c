// Semantic checks of stored records, after the FlatBuffers Verifier.
//
// The Verifier proves a record's bytes can be read safely; these functions
// prove that what the record says is consistent, so that no reader indexes,
// allocates or multiplies with a stored number it has not checked. Every
// failure is a Corruption whose message starts with `where` (the record's
// tag/file:param) and names the field at fault. Pure functions: no RocksDB,
// no LibTorch; the fuzz targets call them directly.
#ifndef CKPTKV_STORE_RECORD_CHECK_H_
#define CKPTKV_STORE_RECORD_CHECK_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "schema/records.h"
#include "store/status.h"

namespace ckptkv {

// Largest chunk a record may name; also the largest chunk a reader
// allocates for one block.
inline constexpr uint32_t kMaxChunkSize = 256u << 20;

// dtype, shape (checked product), byte_length, chunk_size, chunk count,
// inline length, the whole-tensor digest, and the placement's own fields
// (CheckPlacementRecord).
Status CheckTensorRecord(const fb::TensorRecord& r, const std::string& where);

// The fields of a placement that can be checked without the rest of its
// tag: non-negative dims and offsets, matching ranks, the rectangle inside
// global_shape and of the tensor's size, shard_dim inside the rank,
// 0 <= tp_rank < tp_degree, segments non-negative and inside the tensor.
Status CheckPlacementRecord(const fb::Placement& p, const std::vector<int64_t>& tensor_shape,
                            const std::string& where);

// Nodes a decoder may visit in a state tree of `bytes` bytes (the same
// bound the Verifier enforces on tables): a tree whose walk exceeds it is
// Corruption, however it passed verification.
size_t StateTreeNodeBudget(size_t bytes);

// A BigInt node's text: an optional '-' and 1 to kMaxBigIntDigits decimal
// digits (Python's own default limit for int <-> str).
constexpr size_t kMaxBigIntDigits = 4300;
bool IsDecimalInteger(std::string_view s);

// Walks a verified state tree within its node budget and lists the param
// paths of its tensor nodes (in tree order, repeats included). Corruption
// for a node of unknown kind, a tensor node without a path, a dict whose
// keys and items differ in number, or a walk over budget.
Status CollectTreeTensors(const fb::StateTree& tree, size_t bytes, const std::string& where,
                          std::vector<std::string>* paths);

// A verified, checked TensorRecord; nullptr and a Corruption otherwise:
// `unverified` when the Verifier refuses the bytes, CheckTensorRecord's
// message (which starts with `where`) when a check fails. The bytes must
// stay alive and in place while *out is used.
Status VerifyTensorRecordBytes(std::string_view bytes, const std::string& where,
                               const std::string& unverified, const fb::TensorRecord** out);
// The same, `unverified` being "<where>: tensor record fails verification".
Status VerifyTensorRecordBytes(std::string_view bytes, const std::string& where,
                               const fb::TensorRecord** out);

// Verifies a StateTree and walks it within its node budget
// (CollectTreeTensors, messages starting with `where`), listing the param
// paths of its tensor nodes; a Corruption of message `unverified` when the
// Verifier refuses the bytes.
Status VerifyStateTreeBytes(std::string_view bytes, const std::string& where,
                            const std::string& unverified, std::vector<std::string>* paths);

}  // namespace ckptkv

#endif  // CKPTKV_STORE_RECORD_CHECK_H_
