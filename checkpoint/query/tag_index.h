// The fragments of a stored tag and the query over them.
//
// TagIndex reads only records (no tensor bytes): every tensor with a
// placement (checked by CheckPlacement; Corruption otherwise) becomes one
// or more pieces, each a rectangle of a global tensor that is contiguous in
// the stored tensor. Pieces fall into copies: one per pipeline stage, and
// for a TP-replicated parameter one per TP rank as well. The planner picks
// the first copy (preferred TP ranks first) whose pieces cover a target
// rectangle of (param, state) exactly once, proven by FirstCoverProblem,
// and lists the byte ranges (hence chunks) they need; a rectangle no copy
// covers, or a copy whose pieces overlap, is Corruption naming the element.
// The executor reads exactly those ranges, moves them to the target device
// and places each intersection there with narrow/copy. Replicated copies
// are therefore read once. Not thread-safe (the executor's chunk cache).
#ifndef CKPTKV_CHECKPOINT_QUERY_TAG_INDEX_H_
#define CKPTKV_CHECKPOINT_QUERY_TAG_INDEX_H_

#include <deque>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/query/fragments.h"
#include "store/store.h"

namespace ckptkv::checkpoint {

struct StoredTensor {
  std::string file, path;
  TensorRecordRef record;
  Placement placement;
};

struct Piece {
  size_t tensor = 0;       // index into TagIndex::tensors()
  Rect rect;               // in global coordinates; contiguous row-major in the tensor
  int64_t elem_begin = 0;  // element of the stored tensor where it starts
};

// The pieces of one copy of (param, state), by first row.
struct PieceCopy {
  int stage = -1;    // pipeline stage of the files (-1: not a DeepSpeed name)
  int tp_rank = -1;  // TP-replicated parameters: the rank; -1: all ranks
  int tp_degree = -1;
  std::vector<size_t> by_row;  // indices into PieceSet::pieces, by dimension-0 offset
  std::vector<int64_t> reach;  // reach[i]: largest dimension-0 end of by_row[0..i]
};

struct PieceSet {
  std::vector<Piece> pieces;      // never empty
  std::vector<PieceCopy> copies;  // in the order of their first tensor
  Rect bounds;                    // the smallest rectangle holding every piece
};

struct ParamInfo {
  std::vector<int64_t> global_shape;
  int shard_dim = -1;
};

struct ReadStep {
  size_t tensor = 0;
  uint64_t byte_offset = 0, byte_length = 0;
  uint64_t first_chunk = 0, chunks = 0;  // chunks of the stored tensor it touches
  Rect target;                           // the intersection, in global coordinates
  std::vector<int64_t> piece_shape;      // the rectangle the bytes are a row-major part of
};

class TagIndex : public FragmentSource {
 public:
  static Result<std::unique_ptr<TagIndex>> Build(const Store& store, const std::string& tag);

  const std::string& tag() const { return tag_; }
  const std::vector<StoredTensor>& tensors() const { return tensors_; }
  const std::map<std::string, ParamInfo>& params() const { return params_; }

  // The planner: the reads that fill `rect` of (param, state), each element
  // read once. A "param" query with no training-weight fragments falls back
  // to "fp32". NotFound for an unknown (param, state), InvalidArgument for a
  // rectangle outside the parameter, Corruption when no copy of the
  // fragments covers `rect` exactly once. O(log n + k log k) for k pieces
  // intersecting `rect` (times the copies tried).
  Result<std::vector<ReadStep>> Plan(const std::string& param, const std::string& state,
                                     const Rect& rect) const;
  // The smallest rectangle that holds every fragment of (param, state), with
  // Plan's "fp32" fallback; nullopt when it has none. A universal tensor
  // whose vocabulary padding was cropped holds fewer rows than its parameter.
  std::optional<Rect> Bounds(const std::string& param, const std::string& state) const;
  // The executor.
  Status Fill(const std::string& param, const std::string& state, const Rect& rect,
              at::Tensor out) override;
  const fb::TensorRecord* Exact(const Placement& placement, fb::DType dtype) override;
  // The stored tensor Exact would link, or nullptr.
  const StoredTensor* ExactStored(const Placement& placement, fb::DType dtype) const;
  void Prefer(int tp_rank, int tp_degree) override {
    prefer_rank_ = tp_rank;
    prefer_degree_ = tp_degree;
  }

  // The whole global tensor of (param, state) on `device`, in the stored dtype.
  Result<at::Tensor> Assemble(const std::string& param, const std::string& state,
                              const std::string& device = "cpu");

 private:
  TagIndex(const Store& store, std::string tag) : store_(store), tag_(std::move(tag)) {}
  const PieceSet* PiecesFor(const std::string& param, const std::string& state) const;
  bool Preferred(const PieceCopy& c) const;
  Status ReadBytes(const ReadStep& s, uint8_t* dst);
  // Bytes [lo, hi) of chunk `chunk` of a stored tensor, through the cache.
  Status CopyChunk(size_t tensor, uint64_t chunk, uint64_t lo, uint64_t hi, uint8_t* dst);

  const Store& store_;
  std::string tag_;
  std::vector<StoredTensor> tensors_;
  std::map<std::string, ParamInfo> params_;
  std::map<std::string, PieceSet> pieces_;  // param + '\n' + state
  std::map<std::string, size_t> exact_;     // placement signature -> tensor
  int prefer_rank_ = -1, prefer_degree_ = -1;
  // Decoded chunks, (tensor, chunk) -> bytes, evicted oldest first.
  std::map<std::pair<size_t, uint64_t>, std::string> cache_;
  std::deque<std::pair<size_t, uint64_t>> cache_order_;
  // Bytes of decoded chunks kept for reuse by neighbouring small reads.
  uint64_t cache_bytes_ = 0;
  static constexpr uint64_t kCacheLimit = 64u << 20;
};

// Placement of a stored record (fb) as the writer's struct.
Placement PlacementOf(const fb::Placement& p);
// "closest: a, b, c" among names, by edit distance.
std::string Closest(const std::string& name, std::vector<std::string> names);
// A string that is equal for equal placements of the same dtype.
std::string PlacementSignature(const Placement& p, fb::DType dtype);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_TAG_INDEX_H_
