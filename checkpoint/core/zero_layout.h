// ZeRO flat-buffer layouts (DeepSpeed's stage 1/2 and stage 3), pure
// arithmetic over element counts. See docs/fragments.md.
//
// Stage 1/2: the parameters of a group are concatenated, padded at the end
// to a multiple of 2 * dp, and cut into dp equal partitions; rank r owns
// [r*P, (r+1)*P). Stage 3: every parameter is padded to dp * ceil(n/dp) and
// rank r owns [r*pn, (r+1)*pn) of each, concatenated.
#ifndef CKPTKV_CHECKPOINT_CORE_ZERO_LAYOUT_H_
#define CKPTKV_CHECKPOINT_CORE_ZERO_LAYOUT_H_

#include <cstdint>
#include <vector>

namespace ckptkv::checkpoint {

// Part of parameter `param` (index into the group's list) inside one
// rank's flat partition.
struct FlatPiece {
  int param = 0;
  int64_t start = 0;         // first element in the partition
  int64_t numel = 0;         // elements
  int64_t param_offset = 0;  // first element in the flattened parameter (shard)
};

struct FlatLayout {
  int dp = 1;
  int64_t total = 0;                           // elements of the parameters
  int64_t partition_size = 0;                  // elements per rank, padding included
  std::vector<int64_t> paddings;               // per rank: padding inside its partition
  std::vector<std::vector<FlatPiece>> pieces;  // per rank, in buffer order
};

// DeepSpeed's nccl_start_alignment_factor.
constexpr int64_t kNcclStartAlignmentFactor = 2;

// Stage 1/2 (DeepSpeedZeroOptimizer) layout of one parameter group.
FlatLayout Zero12Layout(const std::vector<int64_t>& numels, int dp);
// Stage 3 layout of one sub-group.
FlatLayout Zero3Layout(const std::vector<int64_t>& numels, int dp);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_ZERO_LAYOUT_H_
