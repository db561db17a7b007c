// DeepSpeed's reshape maps (deepspeed/checkpoint/reshape_meg_2d.py and
// reshape_3d_utils.py): which source checkpoint files a rank of a smaller
// (pp, tp, dp) layout takes, as lists of file indices.
//
// Indices are DeepSpeed's: a model file index is the pp-major MP rank
// (mp = pp * tp_degree + tp, i.e. mp_rank_XX), a ZeRO file index is
// dp * (pp * tp) + mp (the position in the (dp, mp)-sorted zero files).
// Reshaping only contracts: TP first, then PP, then DP, each by exact
// division of the index lists, exactly as DeepSpeed partitions them. Errors
// are InvalidArgument naming the degrees and what would be valid.
//
// Torch-free.
#ifndef CKPTKV_CHECKPOINT_CORE_RESHAPE_MAPS_H_
#define CKPTKV_CHECKPOINT_CORE_RESHAPE_MAPS_H_

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "store/status.h"

namespace ckptkv::checkpoint {

// partition_data: `list` cut into n contiguous chunks of equal length.
// InvalidArgument unless n >= 1 and n divides list.size().
Result<std::vector<std::vector<int>>> PartitionData(const std::vector<int>& list, int n);

// meg_2d_parallel_map: (pp, tp) cell -> list of source file indices.
class Meg2dParallelMap {
 public:
  struct Cell {
    int pp = 0;
    int tp = 0;
    std::vector<int> indices;
  };

  // Degrees must be >= 1 (smaller values are treated as 1).
  Meg2dParallelMap(int pp_degree, int tp_degree);

  int pp_degree() const { return pp_; }
  int tp_degree() const { return tp_; }

  // simple_init: index i -> cell (i / tp, i % tp), value [i].
  void SimpleInit();
  // add_data: appends to the cell. InvalidArgument for an index >= degree.
  Status AddData(int pp, int tp, const std::vector<int>& data);
  // get_data: the cells' lists concatenated, pp-major then tp; an absent
  // coordinate means every index of that axis. InvalidArgument for an
  // index >= degree.
  Result<std::vector<int>> GetData(std::optional<int> pp = std::nullopt,
                                   std::optional<int> tp = std::nullopt) const;

  // DeepSpeed's key of a cell: "pp,tp".
  static std::string Key(int pp, int tp);
  // Every cell, pp-major (the order DeepSpeed's simple_init inserts them).
  std::vector<Cell> Cells() const;
  // "0,0=[0, 1] 0,1=[2, 3]" (for messages and the CLI).
  std::string ToString() const;

  bool operator==(const Meg2dParallelMap& o) const {
    return pp_ == o.pp_ && tp_ == o.tp_ && cells_ == o.cells_;
  }

 private:
  int pp_;
  int tp_;
  std::vector<std::vector<int>> cells_;  // pp * tp, pp-major
};

// reshape_meg_2d_parallel: the simple (old_pp, old_tp) map contracted to
// (new_pp, new_tp), TP first (each pp row's files cut into new_tp groups),
// then PP (each tp column cut into new_pp groups).
Result<Meg2dParallelMap> ReshapeMeg2dParallel(int old_pp, int old_tp, int new_pp, int new_tp);

// model_3d_desc.
struct Model3dDesc {
  int pp = 1;
  int tp = 1;
  int dp = 1;

  int WorldSize() const { return pp * tp * dp; }
  // "PP,TP,DP = (2, 2, 2)".
  std::string Desc() const;
  // is_valid: every index below its degree; otherwise the reasons
  // ("PP indexing error: index 2 >= degree 2").
  std::pair<bool, std::vector<std::string>> IsValid(int pp_index, int tp_index, int dp_index) const;
  // can_reshape: no dimension grows; otherwise the reasons
  // ("Expansion reshape not supported - TP: 2 ---> 4").
  std::pair<bool, std::vector<std::string>> CanReshape(const Model3dDesc& target) const;
  // reshape: one 2D map per target DP rank over ZeRO file indices. The 2D
  // reshape of (pp, tp) to the target's, then each model index idx becomes
  // [idx + i * pp * tp for i < dp] (dp-interleaved), then every cell's list
  // is cut into target.dp groups.
  Result<std::vector<Meg2dParallelMap>> Reshape(const Model3dDesc& target) const;

  bool operator==(const Model3dDesc& o) const { return pp == o.pp && tp == o.tp && dp == o.dp; }
};

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_RESHAPE_MAPS_H_
