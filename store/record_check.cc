#include "store/record_check.h"

#include <algorithm>
#include <cstdint>

#include "store/digest.h"
#include "store/names.h"
#include "store/size_math.h"

namespace ckptkv {
namespace {

Digest FromFb(const fb::Digest128& d) { return Digest{d.lo(), d.hi()}; }

std::vector<int64_t> Vec(const flatbuffers::Vector<int64_t>* v) {
  return v ? std::vector<int64_t>(v->begin(), v->end()) : std::vector<int64_t>();
}

Status Bad(const std::string& where, const std::string& what) {
  return Status::Corruption(where + ": " + what);
}

// The Verifier checks the alignment of tables, fields and vector lengths,
// not of the 8-byte elements of a vector; a crafted record could place them
// where reading them is undefined behaviour.
template <typename V>
bool Aligned8(const V* v) {
  return v == nullptr || v->size() == 0 || reinterpret_cast<uintptr_t>(v->Data()) % 8 == 0;
}

}  // namespace

Status CheckPlacementRecord(const fb::Placement& p, const std::vector<int64_t>& tensor_shape,
                            const std::string& where) {
  const std::string at = where + ": placement";
  if (!Aligned8(p.global_shape()) || !Aligned8(p.offsets()) || !Aligned8(p.shard_shape())) {
    return Bad(at, "a vector of 64-bit numbers is not aligned");
  }
  const std::vector<int64_t> global = Vec(p.global_shape());
  const std::vector<int64_t> offsets = Vec(p.offsets());
  const std::vector<int64_t> shard = Vec(p.shard_shape());
  if (!CheckedNumel(global)) {
    return Bad(at,
               "global_shape " + ShapeString(global) + " has a negative dimension or overflows");
  }
  if (p.tp_degree() == 0 || p.tp_degree() < -1) {
    return Bad(at, "tp_degree " + std::to_string(p.tp_degree()) + " is invalid; valid: -1 or >= 1");
  }
  if (p.tp_degree() > 0 && (p.tp_rank() < 0 || p.tp_rank() >= p.tp_degree())) {
    return Bad(at, "tp_rank " + std::to_string(p.tp_rank()) + " is outside [0, tp_degree " +
                       std::to_string(p.tp_degree()) + ")");
  }
  if (p.tp_degree() < 0 && p.tp_rank() != -1) {
    return Bad(at, "tp_rank " + std::to_string(p.tp_rank()) + " without a tp_degree");
  }
  if (p.shard_dim() < -1 || p.shard_dim() >= static_cast<int64_t>(global.size())) {
    return Bad(at, "shard_dim " + std::to_string(p.shard_dim()) + " is outside [-1, " +
                       std::to_string(global.size()) + ") for global_shape " + ShapeString(global));
  }
  if (p.shard_dim() >= 0 && p.tp_degree() > 0 && global[p.shard_dim()] % p.tp_degree() != 0) {
    return Bad(at, "tp_degree " + std::to_string(p.tp_degree()) + " does not divide dimension " +
                       std::to_string(p.shard_dim()) + " of global_shape " + ShapeString(global));
  }
  if (p.flat_offset() < 0 || p.flat_numel() < 0) {
    return Bad(at, "flat_offset " + std::to_string(p.flat_offset()) + " / flat_numel " +
                       std::to_string(p.flat_numel()) + " is negative");
  }
  const auto tensor_numel = CheckedNumel(tensor_shape);
  if (!tensor_numel) return Bad(at, "tensor shape overflows");
  if (p.segments() && p.segments()->size() > 0) {
    // Flat form: each segment lies inside the stored tensor.
    for (const fb::Segment* s : *p.segments()) {
      const std::string name = s->param() ? s->param()->str() : "";
      if (name.empty()) return Bad(at, "a segment has no param");
      if (s->start() < 0 || s->numel() < 0 || s->shard_start() < 0) {
        return Bad(at, "segment of " + name + " has a negative start, numel or shard_start");
      }
      auto end = CheckedAdd64(s->start(), s->numel());
      if (!end || *end > *tensor_numel) {
        return Bad(at, "segment of " + name + " [" + std::to_string(s->start()) + ", +" +
                           std::to_string(s->numel()) + ") lies outside the tensor's " +
                           std::to_string(*tensor_numel) + " elements");
      }
      if (!CheckedAdd64(s->shard_start(), s->numel())) {
        return Bad(at, "segment of " + name + " overflows its shard");
      }
    }
    return Status::OK();
  }
  if (global.empty() && offsets.empty() && shard.empty()) return Status::OK();
  // Rectangle form: offsets + extent inside global_shape.
  const std::vector<int64_t>& extent = shard.empty() ? tensor_shape : shard;
  if (offsets.size() != global.size() || extent.size() != global.size()) {
    return Bad(at, "offsets " + ShapeString(offsets) + " and shard " + ShapeString(extent) +
                       " must have the rank of global_shape " + ShapeString(global));
  }
  for (size_t d = 0; d < global.size(); ++d) {
    auto end = CheckedAdd64(offsets[d], extent[d]);
    if (offsets[d] < 0 || extent[d] < 0 || !end || *end > global[d]) {
      return Bad(at, "rectangle at offsets " + ShapeString(offsets) + " of shape " +
                         ShapeString(extent) + " lies outside global_shape " + ShapeString(global) +
                         " (dimension " + std::to_string(d) + ")");
    }
  }
  const bool placeholder = p.state() && p.state()->string_view() == "placeholder";
  if (!placeholder && CheckedNumel(extent) != tensor_numel) {
    return Bad(at, "shard_shape " + ShapeString(extent) + " does not hold the tensor's " +
                       std::to_string(*tensor_numel) + " elements");
  }
  return Status::OK();
}

Status CheckTensorRecord(const fb::TensorRecord& r, const std::string& where) {
  if (!Aligned8(r.shape()) || !Aligned8(r.chunks())) {
    return Bad(where, "shape or chunk list is not aligned to 8 bytes");
  }
  const uint64_t esize = DTypeSize(r.dtype());
  if (esize == 0) {
    return Bad(where, "unknown dtype code " + std::to_string(static_cast<int>(r.dtype())));
  }
  const std::vector<int64_t> shape = Vec(r.shape());
  for (int64_t d : shape) {
    if (d < 0) return Bad(where, "negative dimension in shape " + ShapeString(shape));
  }
  const auto bytes = CheckedByteLength(shape, esize);
  if (!bytes) {
    return Bad(where, "shape " + ShapeString(shape) + " of " + DTypeName(r.dtype()) +
                          " overflows a 64-bit byte length");
  }
  if (*bytes != r.byte_length()) {
    return Bad(where, "shape and dtype give " + std::to_string(*bytes) +
                          " bytes but byte_length says " + std::to_string(r.byte_length()));
  }
  if (r.chunk_size() == 0 || r.chunk_size() > kMaxChunkSize) {
    return Bad(where, "chunk_size " + std::to_string(r.chunk_size()) +
                          " is out of range; valid: 1 to " + std::to_string(kMaxChunkSize));
  }
  if (!r.digest()) return Bad(where, "record has no digest");
  if (r.inline_data()) {
    if (r.inline_data()->size() != r.byte_length()) {
      return Bad(where, "inline data holds " + std::to_string(r.inline_data()->size()) +
                            " bytes, byte_length says " + std::to_string(r.byte_length()));
    }
    if (r.chunks() && r.chunks()->size() > 0) {
      return Bad(where, "record has both inline data and chunks");
    }
    if (Digest::Of(r.inline_data()->data(), r.inline_data()->size()) != FromFb(*r.digest())) {
      return Bad(where, "inline bytes do not match the record digest");
    }
  } else {
    const uint64_t expect = ChunkCount(r.byte_length(), r.chunk_size());
    const uint64_t have = r.chunks() ? r.chunks()->size() : 0;
    if (have != expect) {
      return Bad(where, "record lists " + std::to_string(have) + " chunks; byte_length " +
                            std::to_string(r.byte_length()) + " in chunks of " +
                            std::to_string(r.chunk_size()) + " needs " + std::to_string(expect));
    }
    std::string keys;
    keys.reserve(have * 16);
    if (r.chunks()) {
      for (const auto* c : *r.chunks()) keys += FromFb(*c).Key();
    }
    if (Digest::Of(keys.data(), keys.size()) != FromFb(*r.digest())) {
      return Bad(where, "chunk list does not match the record digest");
    }
  }
  if (r.placement()) RETURN_IF_ERROR(CheckPlacementRecord(*r.placement(), shape, where));
  return Status::OK();
}

size_t StateTreeNodeBudget(size_t bytes) { return bytes / 4 + 16; }

bool IsDecimalInteger(std::string_view s) {
  if (!s.empty() && s.front() == '-') s.remove_prefix(1);
  if (s.empty() || s.size() > kMaxBigIntDigits) return false;
  for (char c : s) {
    if (c < '0' || c > '9') return false;
  }
  return true;
}

namespace {

struct TreeWalk {
  Status CheckBigInt(const fb::Node* n) const {
    if (!n->s() || !IsDecimalInteger(n->s()->string_view())) {
      return Bad(where, "big-int node does not hold decimal digits");
    }
    return Status::OK();
  }

  Status CheckObject(const fb::Node* n) const {
    if (!n->s() || n->s()->size() == 0 ||
        n->s()->string_view().find(':') == std::string_view::npos) {
      return Bad(where, "object node does not name its class as module:qualname");
    }
    if (n->i() < 0 || n->i() > static_cast<int64_t>(fb::ObjectForm::MAX)) {
      return Bad(where,
                 "object node of " + n->s()->str() + " has unknown form " + std::to_string(n->i()));
    }
    const size_t items = n->items() ? n->items()->size() : 0;
    if (items < 1 || items > 2) {
      return Bad(where, "object node of " + n->s()->str() + " has " + std::to_string(items) +
                            " payload values; 1 or 2 are valid");
    }
    return Status::OK();
  }

  const std::string& where;
  size_t budget;
  std::vector<std::string>* paths;
  size_t visited = 0;

  Status Visit(const fb::Node* n, int depth) {
    if (n == nullptr) return Bad(where, "state tree has an empty node");
    if (++visited > budget) {
      return Bad(where, "state tree visits more than " + std::to_string(budget) +
                            " nodes, more than its size allows (shared subtrees?)");
    }
    if (depth > 512) return Bad(where, "state tree nests deeper than 512 levels");
    switch (n->kind()) {
      case fb::NodeKind::None:
      case fb::NodeKind::Bool:
      case fb::NodeKind::Int:
      case fb::NodeKind::Double:
      case fb::NodeKind::ComplexDouble:
      case fb::NodeKind::String:
      case fb::NodeKind::Device:
        return Status::OK();
      case fb::NodeKind::Tensor:
        if (!n->s() || n->s()->size() == 0) return Bad(where, "tensor node has no param path");
        paths->push_back(n->s()->str());
        return Status::OK();
      case fb::NodeKind::Bytes:
        return Status::OK();
      case fb::NodeKind::BigInt:
        return CheckBigInt(n);
      case fb::NodeKind::Object:
        RETURN_IF_ERROR(CheckObject(n));
        break;
      case fb::NodeKind::List:
      case fb::NodeKind::Tuple:
      case fb::NodeKind::Dict:
        break;
      default:
        return Bad(where, "node of unknown kind " + std::to_string(static_cast<int>(n->kind())));
    }
    const size_t items = n->items() ? n->items()->size() : 0;
    if (n->kind() == fb::NodeKind::Dict) {
      const size_t keys = n->keys() ? n->keys()->size() : 0;
      if (keys != items) {
        return Bad(where, "dict node has " + std::to_string(keys) + " keys and " +
                              std::to_string(items) + " values");
      }
      for (size_t i = 0; i < keys; ++i) RETURN_IF_ERROR(Visit(n->keys()->Get(i), depth + 1));
    }
    for (size_t i = 0; i < items; ++i) RETURN_IF_ERROR(Visit(n->items()->Get(i), depth + 1));
    return Status::OK();
  }
};

}  // namespace

Status CollectTreeTensors(const fb::StateTree& tree, size_t bytes, const std::string& where,
                          std::vector<std::string>* paths) {
  TreeWalk walk{where, StateTreeNodeBudget(bytes), paths};
  return walk.Visit(tree.root(), 0);
}

Status VerifyTensorRecordBytes(std::string_view bytes, const std::string& where,
                               const std::string& unverified, const fb::TensorRecord** out) {
  *out = nullptr;
  const fb::TensorRecord* r = VerifiedTensorRecord(bytes);
  if (r == nullptr) return Status::Corruption(unverified);
  RETURN_IF_ERROR(CheckTensorRecord(*r, where));
  *out = r;
  return Status::OK();
}

Status VerifyTensorRecordBytes(std::string_view bytes, const std::string& where,
                               const fb::TensorRecord** out) {
  return VerifyTensorRecordBytes(bytes, where, where + ": tensor record fails verification", out);
}

Status VerifyStateTreeBytes(std::string_view bytes, const std::string& where,
                            const std::string& unverified, std::vector<std::string>* paths) {
  const fb::StateTree* tree = VerifiedStateTree(bytes);
  if (tree == nullptr) return Status::Corruption(unverified);
  return CollectTreeTensors(*tree, bytes.size(), where, paths);
}

}  // namespace ckptkv
