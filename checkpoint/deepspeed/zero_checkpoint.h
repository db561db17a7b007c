// DeepSpeed's ZeROCheckpoint (deepspeed/checkpoint/zero_checkpoint.py)
// over a committed tag of a ckptkv store: the ZeRO optimizer files in
// (dp, mp) order, the source layout, and for a (smaller) target layout the
// files each target rank takes and their merged state.
//
// Files are loaded whole (every tensor read), as DeepSpeed's torch.load
// does; merging DP partitions just concatenates the flat tensors, which is
// only a faithful re-partitioning for the unchanged-DP case (use universal
// checkpoints for a semantically correct reshape).
#ifndef CKPTKV_CHECKPOINT_DEEPSPEED_ZERO_CHECKPOINT_H_
#define CKPTKV_CHECKPOINT_DEEPSPEED_ZERO_CHECKPOINT_H_

#include <ATen/core/ivalue.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint/deepspeed/merge_state.h"
#include "checkpoint/core/reshape_maps.h"
#include "store/status.h"

namespace ckptkv {
class Store;
class KvCheckpointEngine;
}  // namespace ckptkv

namespace ckptkv::checkpoint {

class DeepSpeedCheckpoint;

// What file loads cost.
struct LoadStats {
  uint64_t files = 0;         // files loaded
  uint64_t tensors = 0;       // distinct tensors loaded
  uint64_t tensor_bytes = 0;  // their bytes
};

// Loads one whole file of the tag (file name relative to the tag), tensors
// on the CPU.
using FileLoader = std::function<Result<c10::IValue>(const std::string& file)>;

// Reads straight from the store (StateTree + tensor records). The store and
// stats must outlive the loader; stats may be null.
FileLoader StoreFileLoader(const Store& store, const std::string& tag, LoadStats* stats = nullptr);
// Reads through engine.load("<load_dir>/<tag>/<file>", cpu), the way
// DeepSpeed reads through its checkpoint engine. The tag must have been
// opened with engine.open(load_dir, tag).
FileLoader EngineFileLoader(KvCheckpointEngine& engine, const std::string& load_dir,
                            const std::string& tag, LoadStats* stats = nullptr);

class ZeROCheckpoint {
 public:
  // The zero files of `tag` (InvalidArgument when there are none), the
  // source layout (GetModel3dDescriptor unless given) and the identity map.
  // `loader` defaults to StoreFileLoader(store, tag).
  static Result<ZeROCheckpoint> Open(const Store& store, const std::string& tag,
                                     std::optional<Model3dDesc> source = std::nullopt,
                                     FileLoader loader = nullptr);

  const std::string& tag() const { return tag_; }
  const std::vector<std::string>& file_list() const { return file_list_; }
  int num_files() const { return static_cast<int>(file_list_.size()); }
  const Model3dDesc& src_3d() const { return src_3d_; }
  const Model3dDesc& target_3d() const { return target_3d_; }
  int GetSrcWorldSize() const { return src_3d_.WorldSize(); }
  int GetSrcTpDegree() const { return src_3d_.tp; }
  int GetSrcPpDegree() const { return src_3d_.pp; }
  int GetSrcDpDegree() const { return src_3d_.dp; }
  // One 2D map of zero-file indices per target DP rank.
  const std::vector<Meg2dParallelMap>& file_map() const { return file_map_; }

  // reshape: a contraction of the source layout (InvalidArgument otherwise).
  Status Reshape(const Model3dDesc& target);
  // InvalidArgument for a rank outside the target layout.
  Result<std::vector<int>> GetFileIndicesForRank(int pp, int tp, int dp) const;
  Result<std::vector<std::string>> GetFilesForRank(int pp, int tp, int dp) const;

  // get_state_for_rank: loads each file of the rank in order, drops the
  // top-level keys_to_ignore, strips paddings (every tensor state but
  // "step" of optimizer_state_dict.base_optimizer_state.state[g] narrowed to
  // numel - group_paddings[g]), merges with MergeState, and sets
  // partition_count = [target dp] * n and (when stripping) group_paddings =
  // [0] * n in optimizer_state_dict.
  Result<c10::IValue> GetStateForRank(int pp, int tp, int dp,
                                      const std::vector<std::string>& keys_to_ignore = {},
                                      bool strip_tensor_paddings = true,
                                      const MergeOptions& merge = {}) const;

 private:
  friend class DeepSpeedCheckpoint;
  ZeROCheckpoint() = default;
  std::string tag_;
  std::vector<std::string> file_list_;
  Model3dDesc src_3d_;
  Model3dDesc target_3d_;
  std::vector<Meg2dParallelMap> file_map_;
  FileLoader loader_;
};

// _strip_tensor_paddings on one loaded file's state (in place: dicts are
// shared). InvalidArgument when a padding exceeds its tensor.
Status StripTensorPaddings(const c10::IValue& state, const std::string& where);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_DEEPSPEED_ZERO_CHECKPOINT_H_
