// Verified access to ckptkv's FlatBuffers records.
//
// Every record read from the database goes through one of these functions
// before any field is touched. They return nullptr when the bytes do not
// pass the FlatBuffers Verifier; callers turn that into a Corruption error
// that names the record's key. The bytes must outlive the returned pointer.
#ifndef CKPTKV_SCHEMA_RECORDS_H_
#define CKPTKV_SCHEMA_RECORDS_H_

#include <string_view>

#include "ckptkv_generated.h"

namespace ckptkv {

inline constexpr unsigned kFormatVersion = 1;
inline constexpr const char* kHashAlgorithm = "xxh3-128";

const fb::StoreHeader* VerifiedStoreHeader(std::string_view bytes);
const fb::TensorRecord* VerifiedTensorRecord(std::string_view bytes);
const fb::StateTree* VerifiedStateTree(std::string_view bytes);
const fb::CommitRecord* VerifiedCommitRecord(std::string_view bytes);

// Name of a DType for messages ("float32", "bfloat16", ...).
const char* DTypeName(fb::DType dtype);
// Bytes per element of a DType.
size_t DTypeSize(fb::DType dtype);

// What a state-tree node stands for to a reader that does not rebuild
// Python objects (the C++ engine, the queries, kv-browser's values): an
// Object node's payload (items[0]: a set's List, an OrderedDict's Dict, an
// enum's value, a dataclass's Dict of fields), through at most 16 nested
// Objects; any other node, itself. nullptr for nullptr or an Object without
// a payload (which verification refuses).
const fb::Node* ValueOf(const fb::Node* node);

}  // namespace ckptkv

#endif  // CKPTKV_SCHEMA_RECORDS_H_
