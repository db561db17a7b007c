#include "schema/records.h"

#include <algorithm>

namespace ckptkv {
namespace {

// State trees nest two FlatBuffers tables per level of the saved dict; the
// default depth (64) is too small.
constexpr flatbuffers::uoffset_t kMaxDepth = 512;

// Tables the Verifier may visit. A table takes at least 4 bytes (its vtable
// offset) and each reference to it another 4, so a buffer written as a tree
// holds fewer than size / 4 tables. Tables shared as a DAG are visited once
// per reference; tying the limit to the size keeps a small record that
// references one table many times from costing time and memory exponential
// in its size (the decoders walk what the Verifier walked).
flatbuffers::uoffset_t MaxTables(size_t bytes) {
  return static_cast<flatbuffers::uoffset_t>(std::min<size_t>(bytes / 4 + 16, 1u << 30));
}

// Alignment is verified: a record whose fields are not aligned (crafted, or
// bytes not held at an allocation's start) would be read through misaligned
// pointers. Callers hold records in their own std::string.
template <typename T>
const T* Verified(std::string_view bytes) {
  if (bytes.empty()) return nullptr;
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  flatbuffers::Verifier verifier(data, bytes.size(), kMaxDepth, MaxTables(bytes.size()),
                                 /*check_alignment=*/true);
  if (!verifier.VerifyBuffer<T>(nullptr)) return nullptr;
  return flatbuffers::GetRoot<T>(data);
}

}  // namespace

const fb::StoreHeader* VerifiedStoreHeader(std::string_view bytes) {
  return Verified<fb::StoreHeader>(bytes);
}
const fb::TensorRecord* VerifiedTensorRecord(std::string_view bytes) {
  return Verified<fb::TensorRecord>(bytes);
}
const fb::StateTree* VerifiedStateTree(std::string_view bytes) {
  return Verified<fb::StateTree>(bytes);
}
const fb::CommitRecord* VerifiedCommitRecord(std::string_view bytes) {
  return Verified<fb::CommitRecord>(bytes);
}

const char* DTypeName(fb::DType dtype) {
  switch (dtype) {
    case fb::DType::Bool:
      return "bool";
    case fb::DType::UInt8:
      return "uint8";
    case fb::DType::Int8:
      return "int8";
    case fb::DType::Int16:
      return "int16";
    case fb::DType::Int32:
      return "int32";
    case fb::DType::Int64:
      return "int64";
    case fb::DType::Float16:
      return "float16";
    case fb::DType::BFloat16:
      return "bfloat16";
    case fb::DType::Float32:
      return "float32";
    case fb::DType::Float64:
      return "float64";
    case fb::DType::ComplexFloat:
      return "complex64";
    case fb::DType::ComplexDouble:
      return "complex128";
  }
  return "unknown";
}

size_t DTypeSize(fb::DType dtype) {
  switch (dtype) {
    case fb::DType::Bool:
    case fb::DType::UInt8:
    case fb::DType::Int8:
      return 1;
    case fb::DType::Int16:
    case fb::DType::Float16:
    case fb::DType::BFloat16:
      return 2;
    case fb::DType::Int32:
    case fb::DType::Float32:
      return 4;
    case fb::DType::Int64:
    case fb::DType::Float64:
    case fb::DType::ComplexFloat:
      return 8;
    case fb::DType::ComplexDouble:
      return 16;
  }
  return 0;
}

const fb::Node* ValueOf(const fb::Node* node) {
  for (int hops = 0; node != nullptr && node->kind() == fb::NodeKind::Object; ++hops) {
    if (hops == 16 || node->items() == nullptr || node->items()->size() == 0) return nullptr;
    node = node->items()->Get(0);
  }
  return node;
}

}  // namespace ckptkv
