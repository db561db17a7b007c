// The parallel layout (pp, tp, dp) of a stored DeepSpeed tag, found as
// DeepSpeed's get_model_3d_descriptor finds it, and DeepSpeed's file lists
// (get_files_with_prefix, get_zero_files). Torch-free: only state trees
// are read, never tensors.
#ifndef CKPTKV_CHECKPOINT_CORE_DESCRIPTOR_H_
#define CKPTKV_CHECKPOINT_CORE_DESCRIPTOR_H_

#include <string>
#include <vector>

#include "checkpoint/core/reshape_maps.h"
#include "store/status.h"

namespace ckptkv {
class Store;
}

namespace ckptkv::checkpoint {

// get_files_with_prefix: the files whose last path component starts with
// `prefix`, sorted lexicographically by path (so mp_rank_100 sorts before
// mp_rank_10_, as in DeepSpeed).
std::vector<std::string> GetFilesWithPrefix(const std::vector<std::string>& files,
                                            const std::string& prefix);

// get_zero_files: the ZeRO optimizer files of the first non-empty prefix
// among "zero_pp_rank_", "fp16_zero_pp_rank_", "bf16_zero_pp_rank_", sorted
// numerically by (dp, mp), so zero file index = dp * (pp * tp) + mp.
// DeepSpeed's prefix scan would also pick up ZeRO-3's
// zero_pp_rank_D_mp_rank_XX_model_states.pt; only *optim_states.pt files
// are taken here (the reshape maps index optimizer partitions).
std::vector<std::string> GetZeroFiles(const std::vector<std::string>& files);

// The DeepSpeed files of a tag, by kind, each list in DeepSpeed's order.
struct DeepSpeedFiles {
  std::vector<std::string> all;         // every file of the tag
  std::vector<std::string> model;       // mp_rank_XX_model_states.pt (lexicographic)
  std::vector<std::string> zero_model;  // ZeRO-3 zero_pp_rank_D_mp_rank_XX_model_states.pt
  std::vector<std::string> zero;        // GetZeroFiles
  std::vector<std::string> layer;       // layer_* (lexicographic)
};
DeepSpeedFiles ClassifyFiles(const std::vector<std::string>& files);
Result<DeepSpeedFiles> ListDeepSpeedFiles(const Store& store, const std::string& tag);

// get_model_3d_descriptor of a committed tag.
// - If the model files carry checkpoint_parallel_dimensions {pp_degree,
//   tp_degree} (DeepSpeed >= 0.17), (pp, tp) come from them: every model
//   file must have it and agree, #model files == pp * tp and
//   #zero files % (pp * tp) == 0; dp = max(1, #zero / (pp * tp)).
// - Otherwise the legacy heuristic: with layer_01* files tp = #layer_01*,
//   pp = #mp_rank_* / tp; else tp = #mp_rank_*, pp = 1; dp as above.
// - ZeRO-3 tags have zero_pp_rank_D_mp_rank_XX_model_states.pt instead of
//   mp_rank_* files (DeepSpeed's get_model_3d_descriptor does not handle
//   them): (pp, tp) come from their checkpoint_parallel_dimensions (or
//   tp = #distinct MP ranks, pp = 1 without it), dp from the file count.
// InvalidArgument naming the files when the tag is not a consistent
// DeepSpeed checkpoint; NotFound when the tag does not exist.
Result<Model3dDesc> GetModel3dDescriptor(const Store& store, const std::string& tag);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_DESCRIPTOR_H_
