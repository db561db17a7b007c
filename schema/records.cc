#include "schema/records.h"

namespace ckptkv {
namespace {

// State trees nest two FlatBuffers tables per level of the saved dict, and
// a large model has many tables; the defaults (64 / 1M) are too small.
constexpr flatbuffers::uoffset_t kMaxDepth = 512;
constexpr flatbuffers::uoffset_t kMaxTables = 1u << 28;

template <typename T>
const T* Verified(std::string_view bytes) {
  if (bytes.empty()) return nullptr;
  const auto* data = reinterpret_cast<const uint8_t*>(bytes.data());
  flatbuffers::Verifier verifier(data, bytes.size(), kMaxDepth, kMaxTables,
                                 /*check_alignment=*/false);
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

}  // namespace ckptkv
