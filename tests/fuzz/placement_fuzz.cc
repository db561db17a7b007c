// Fuzz target: the planner's checks of a stored placement. A TensorRecord
// that passes the store's checks has its placement read as the planner
// reads it (PlacementOf), checked again (CheckPlacement), its segments'
// shards computed (SegmentShard) and the rectangles its pieces make
// checked for exact cover (FirstCoverProblem). Never a crash.
#include <cstdint>
#include <string>
#include <vector>

#include "checkpoint/query/fragments.h"
#include "checkpoint/query/tag_index.h"
#include "store/record_check.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const fb::TensorRecord* r = nullptr;
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  if (!VerifyTensorRecordBytes(bytes, "fuzz", &r).ok() || r->placement() == nullptr) return 0;
  const Placement pl = PlacementOf(*r->placement());
  std::vector<int64_t> shape;
  if (r->shape()) shape.assign(r->shape()->begin(), r->shape()->end());
  if (!CheckPlacement(pl, shape, "fuzz").ok()) return 0;
  std::vector<Rect> pieces;
  if (pl.segments.empty()) {
    if (pl.global_shape.empty()) return 0;
    Rect target{std::vector<int64_t>(pl.global_shape.size(), 0), pl.global_shape};
    pieces.push_back(Rect{pl.offsets, pl.shard_shape.empty() ? shape : pl.shard_shape});
    (void)FirstCoverProblem(pieces, target);
    return 0;
  }
  for (const auto& seg : pl.segments) {
    // The segment's parameter as the placement's own global shape says.
    auto shard = SegmentShard(pl, seg, pl.global_shape.empty() ? shape : pl.global_shape,
                              pl.shard_dim, "fuzz");
    if (!shard.ok()) continue;
    for (const FlatRect& fr :
         SplitFlatRange(shard->shape, seg.shard_start, seg.shard_start + seg.numel)) {
      pieces.push_back(fr.rect);
    }
    (void)FirstCoverProblem(pieces,
                            Rect{std::vector<int64_t>(shard->shape.size(), 0), shard->shape});
    pieces.clear();
  }
  return 0;
}
