// Reshape of a stored DeepSpeed checkpoint to a new (tp, pp, dp), written
// back as a new tag, and universal (topology-free) export and import.
//
// All of them plan the target files (layout.h) and fill each tensor through
// the fragment query of the source tag (tag_index.h). ZeRO optimizer state
// is re-partitioned for the new DP degree exactly as DeepSpeed lays it out
// when training at that degree (alignment 2*dp, padding, group_paddings,
// partition_count, param_slice_mappings recomputed) — DeepSpeed itself only
// concatenates partitions. Tensors whose placement is unchanged are linked,
// so a new tag shares the old one's blocks.
#ifndef CKPTKV_CHECKPOINT_QUERY_RESHAPE_H_
#define CKPTKV_CHECKPOINT_QUERY_RESHAPE_H_

#include <optional>
#include <string>

#include "checkpoint/core/tag_layout.h"
#include "checkpoint/query/layout.h"
#include "checkpoint/query/tag_index.h"
#include "checkpoint/query/writer.h"

namespace ckptkv::checkpoint {

// What a stored tag is: its model, layout and metadata, from records only.
struct SourceInfo {
  ModelSpec spec;
  TrainLayout layout;
  CheckpointMeta meta;
  bool universal = false;
  DeepSpeedFiles files;
};
Result<SourceInfo> DescribeTag(const Store& store, const TagIndex& index);

// A stored file as a plan: its state with every placed tensor as a meta
// placeholder carrying its stored placement; tensors without a placement
// are read (they are small: optimizer steps).
Result<PlannedFile> LoadPlanned(const Store& store, const std::string& tag,
                                const std::string& file);

struct ReshapeOptions {
  int tp = 1, pp = 1, dp = 1;
  // Where the new tag keeps the weights (module of the mp_rank files or
  // PipelineModule layer files); unset: as the source does.
  std::optional<LayerFiles> layer_files;
  std::string out_tag;  // default "<tag>_tp<N>_pp<M>_dp<K>"
  WriteOptions write;
};

struct ReshapeReport {
  TrainLayout from, to;
  std::string out_tag;
  WriteReport write;
  uint64_t bytes_read = 0;  // raw bytes of blocks read
  double seconds = 0;
};

Result<ReshapeReport> Reshape(Store& store, const std::string& tag, const ReshapeOptions& options);

// What a reshape would read, in DeepSpeed's index conventions: for each new
// model file "pp,tp" the old mp indices (pp-major) it reads from, for each
// new dp rank the old zero-file indices (dp*(pp*tp)+mp) per "pp,tp", and
// the bytes of the distinct chunks to read (inline tensors cost no block
// read and are not counted). Nothing is written.
struct ReshapePlan {
  TrainLayout from, to;
  std::map<std::string, std::vector<int>> model_files;
  std::vector<std::map<std::string, std::vector<int>>> zero_files;
  uint64_t bytes_to_read = 0;
  uint64_t tensors_linked = 0;
};
Result<ReshapePlan> PlanReshape(const Store& store, const std::string& tag, int tp, int pp, int dp);

// ds_to_universal: one file per parameter and state, zero/<name>/<state>.pt
// = {"param": full fp32 tensor (vocabulary padding cropped), "cat_dim"?,
// "vocab_tensor"?}, zero/<name>/step.pt, zero/optimizer_state.pt, and the
// model-state files of the source, linked.
Result<ReshapeReport> ExportUniversal(Store& store, const std::string& tag,
                                      const std::string& out_tag, const WriteOptions& write);
// Loads a universal tag into any layout (the ZeRO stage and dtype given).
Result<ReshapeReport> ImportUniversal(Store& store, const std::string& tag, const TrainLayout& to,
                                      const std::string& out_tag, const WriteOptions& write);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_RESHAPE_H_
