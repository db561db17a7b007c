// Fragments and the one query everything else is built on.
//
// A stored tensor of a sharded checkpoint is a fragment of a global tensor
// (one per parameter and optimizer state: "param" for the training weights,
// "fp32" for the master weights, "exp_avg", "exp_avg_sq"). Its Placement
// says where it sits: a rectangle of the global tensor (TP shards), or a
// flat buffer made of segments of the flattened TP shards of several
// parameters (ZeRO partitions). A FragmentSource answers "copy this
// rectangle of (param, state) into this tensor"; FillFromPlacement builds
// any stored tensor from a source by asking for the rectangles its
// placement covers. See docs/fragments.md.
#ifndef CKPTKV_CHECKPOINT_QUERY_FRAGMENTS_H_
#define CKPTKV_CHECKPOINT_QUERY_FRAGMENTS_H_

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "checkpoint/core/model_spec.h"
#include "store/status.h"
#include "store/store.h"

namespace ckptkv::checkpoint {

struct Rect {
  std::vector<int64_t> offsets;
  std::vector<int64_t> shape;
  int64_t numel() const { return Numel(shape); }
  bool empty() const { return numel() == 0; }
};

// The intersection of two rectangles (empty shape entries when disjoint).
Rect Intersect(const Rect& a, const Rect& b);
bool Contains(const Rect& outer, const Rect& inner);

// Elements [begin, end) of a row-major block of `shape`, cut into
// rectangles that are each contiguous in that order (at most 2*rank-1).
struct FlatRect {
  Rect rect;           // in block coordinates
  int64_t flat_begin;  // index of its first element in the block
};
std::vector<FlatRect> SplitFlatRange(const std::vector<int64_t>& shape, int64_t begin, int64_t end);

class FragmentSource {
 public:
  virtual ~FragmentSource() = default;
  // Copies rectangle `rect` of the global tensor of (param, state) into
  // `out` (shape == rect.shape; any dtype and device; a view is written in
  // place). Elements no fragment covers are left as they are.
  virtual Status Fill(const std::string& param, const std::string& state, const Rect& rect,
                      at::Tensor out) = 0;
  // Among replicated copies, prefer those of TP rank range `tp_rank` of
  // `tp_degree` (DeepSpeed reads the files of the matching TP ranks).
  virtual void Prefer(int tp_rank, int tp_degree) {
    (void)tp_rank;
    (void)tp_degree;
  }
  // A stored record whose bytes are exactly the tensor `placement` asks
  // for in `dtype` (a writer links it instead of copying), or nullptr.
  virtual const fb::TensorRecord* Exact(const Placement& placement, fb::DType dtype) {
    (void)placement;
    (void)dtype;
    return nullptr;
  }
};

// The rectangle of the global tensor that TP rank `tp_rank` of `tp` holds.
// REQUIRES: spec.CheckLayout(tp, ...) is OK and 0 <= tp_rank < tp (planned
// layouts); a stored placement's shard comes from SegmentShard.
Rect ShardRect(const ParamSpec& p, int tp_rank, int tp);

// Checks the fields of `placement`, the placement of a tensor of
// `tensor_shape`, against each other (what needs no other record):
// - every shape non-negative with an element count that fits in int64;
// - tp_degree -1 (none, then tp_rank -1) or >= 1 with 0 <= tp_rank <
//   tp_degree; shard_dim -1 or a dimension of global_shape, and tp_degree
//   divides it;
// - rectangle form (param set, no segments): offsets and shard_shape (or
//   the tensor's shape) of global_shape's rank, inside global_shape, as
//   many elements as the tensor (but for "placeholder"), and along
//   shard_dim exactly TP rank tp_rank's shard;
// - flat form (no param): flat_group >= 0, flat_offset >= 0, flat_numel the
//   tensor's element count, segments with a param, non-negative numbers, in
//   buffer order without overlap and inside the buffer.
// Corruption naming `where` and the field otherwise.
Status CheckPlacement(const Placement& placement, const std::vector<int64_t>& tensor_shape,
                      const std::string& where);

// The TP shard of a segment's parameter (global shape `global_shape`,
// partition dimension `shard_dim`, -1 replicated) at the placement's TP
// coordinate, checked: shard_dim inside the shape, tp_degree dividing it,
// and the segment's [shard_start, +numel) inside the shard. Corruption
// naming `where` otherwise. REQUIRES: CheckPlacement(placement) is OK.
Result<Rect> SegmentShard(const Placement& placement, const PlacementSegment& segment,
                          const std::vector<int64_t>& global_shape, int shard_dim,
                          const std::string& where);

// Where `pieces` (rectangles inside `target`) fail to cover `target`
// exactly once: the first element in row-major order that no piece or more
// than one piece covers. A sweep over the pieces' boundaries in dimension
// 0, then 1, ..., with an interval check in the last: O(n log n) for the
// row-major and TP splits fragments make.
struct CoverProblem {
  std::vector<int64_t> at;  // the element (coordinates of target and pieces)
  bool overlap = false;     // false: a gap
};
std::optional<CoverProblem> FirstCoverProblem(const std::vector<Rect>& pieces, const Rect& target);

// Fills `out` (zeroed first) with the elements `placement` says it holds.
Status FillFromPlacement(const ModelSpec& spec, const Placement& placement, FragmentSource& source,
                         const at::Tensor& out);
// The same for elements [begin, end), in row-major order, of a tensor of
// `shape`: `out` is 1-D with end - begin elements. A writer streams a large
// tensor into the store this way, one chunk at a time.
Status FillRangeFromPlacement(const ModelSpec& spec, const Placement& placement,
                              FragmentSource& source, const std::vector<int64_t>& shape,
                              int64_t begin, int64_t end, const at::Tensor& out);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_FRAGMENTS_H_
