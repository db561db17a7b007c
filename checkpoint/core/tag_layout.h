// A stored DeepSpeed tag's layout: the one place that works it out.
//
// Every reader that needs to know what a tag is (DeepSpeed's own
// ZeROCheckpoint and DeepSpeedCheckpoint, the fragment queries' reshape and
// universal export, the save-time placer) takes it from here:
//   - the tag's files by role, in DeepSpeed's orders (get_files_with_prefix,
//     get_zero_files) and by rank;
//   - what one model-state file records about the layout it was saved at
//     (checkpoint_parallel_dimensions, mp_world_size, dp_world_size), read
//     and checked by one rule;
//   - the tag's (pp, tp, dp) as DeepSpeed's get_model_3d_descriptor finds it.
// Torch-free: only state trees are read, never tensors.
#ifndef CKPTKV_CHECKPOINT_CORE_TAG_LAYOUT_H_
#define CKPTKV_CHECKPOINT_CORE_TAG_LAYOUT_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
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

// The DeepSpeed files of a tag, by kind, each list in DeepSpeed's order,
// and the top-level ones (DeepSpeed writes no others) by rank.
struct DeepSpeedFiles {
  std::vector<std::string> all;         // every file of the tag
  std::vector<std::string> model;       // mp_rank_XX_model_states.pt (lexicographic)
  std::vector<std::string> zero_model;  // ZeRO-3 zero_pp_rank_D_mp_rank_XX_model_states.pt
  std::vector<std::string> zero;        // GetZeroFiles
  std::vector<std::string> layer;       // layer_* (lexicographic)

  std::map<int, std::string> model_by_mp;                    // mp -> model file (ZeRO-3: dp 0's)
  std::vector<std::string> all_model;                        // model + zero_model, top level
  std::map<std::pair<int, int>, std::string> optim_by_rank;  // (dp, mp) -> a file of `zero`
  std::string universal_optim;                               // zero/optimizer_state.pt
};
DeepSpeedFiles ClassifyFiles(const std::vector<std::string>& files);
Result<DeepSpeedFiles> ListDeepSpeedFiles(const Store& store, const std::string& tag);

// What a model-state file records about the layout it was saved at; a key
// that is absent (or not an int) is nullopt.
struct SavedDims {
  bool has_parallel_dims = false;  // checkpoint_parallel_dimensions present
  std::optional<int64_t> pp_degree, tp_degree;
  std::optional<int64_t> mp_world_size, dp_world_size;
};
// Reads them from a stored model-state file's state tree.
Result<SavedDims> ReadSavedDims(const Store& store, const std::string& tag,
                                const std::string& file);

// The (pp, tp) of checkpoint_parallel_dimensions, nullopt without it;
// InvalidArgument unless it is {pp_degree: int >= 1, tp_degree: int >= 1}.
Result<std::optional<std::pair<int, int>>> ParallelDims(const SavedDims& d);
// The TP degree of a file taken on its own (the placer at save time):
// checkpoint_parallel_dimensions' tp_degree, else mp_world_size (no
// pipeline), else 1.
Result<int> SavedTpDegree(const SavedDims& d);
// dp_world_size when it is a degree (1 .. INT_MAX), else nullopt.
std::optional<int> SavedDpDegree(const SavedDims& d);

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

// Everything above for one tag, as the fragment queries take it: the
// files, and the (pp, tp, dp) the tag was saved at. (pp, tp) are found as
// GetModel3dDescriptor finds them; dp is the dp_world_size the first model
// file (lowest MP rank) records (a universal tag has no ZeRO files to count
// and keeps its source's; a tag that lost a ZeRO file keeps its degree, and
// the queries' exact-cover check names the gap), counted from the ZeRO
// files only when that file does not record it. Corruption when the model
// files and their recorded dimensions do not fit together (a lost model
// file, dimensions that disagree); InvalidArgument when the tag has no
// DeepSpeed model file; NotFound when it does not exist.
struct TagLayout {
  DeepSpeedFiles files;
  Model3dDesc degrees;
  bool universal = false;  // has zero/optimizer_state.pt
};
Result<TagLayout> DiscoverTagLayout(const Store& store, const std::string& tag);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_TAG_LAYOUT_H_
