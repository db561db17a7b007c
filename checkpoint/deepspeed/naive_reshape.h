// The naive reshape: what DeepSpeed's reshape utilities do, end to end, as
// the baseline that fragment queries are measured against.
//
// Opens the store through a KvCheckpointEngine, builds DeepSpeedCheckpoint
// (source tag -> target tp/pp/dp, contraction only), loads every needed file
// WHOLE through engine.load, merges with merge_state exactly as
// DeepSpeedCheckpoint.get_2d_parallel_state / ZeROCheckpoint.get_state_for_rank
// do, and saves the merged states as a new tag with DeepSpeed's file names at
// the new degrees: mp_rank_XX_model_states.pt per target (pp, tp), and
// [bf16_|fp16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt per target
// (pp, tp, dp). Files are loaded again for every target rank that needs
// them (DeepSpeed caches nothing either).
//
// Knowingly naive, like DeepSpeed's: merging DP ranks concatenates their
// flat partitions (padding stripped), so the result is a faithful ZeRO
// checkpoint only when DP is unchanged; TP merges concatenate every tensor
// on dim 0 (merge_state knows no row-parallel dims); a model-file key only
// in the first merged file is dropped; param_slice_mappings and scalars
// come from the first file. Only the model metadata that names the layout
// is rewritten (checkpoint_parallel_dimensions, mp_world_size,
// dp_world_size) so that the output tag's layout can be discovered again.
// PipelineModule layer_* files are not rewritten.
#ifndef CKPTKV_CHECKPOINT_DEEPSPEED_NAIVE_RESHAPE_H_
#define CKPTKV_CHECKPOINT_DEEPSPEED_NAIVE_RESHAPE_H_

#include <cstdint>
#include <string>

#include "checkpoint/deepspeed/merge_state.h"
#include "checkpoint/core/reshape_maps.h"
#include "store/status.h"
#include "store/store.h"

namespace ckptkv::checkpoint {

struct NaiveReshapeOptions {
  // DeepSpeed 0.19.6's merge_state fails on a 0-dim tensor (torch Adam's
  // step) when merging DP files; the baseline takes it from the first file,
  // as later DeepSpeed does. Everything else is 0.19.6.
  MergeOptions merge = [] {
    MergeOptions m;
    m.scalar_tensors_from_first = true;
    return m;
  }();
  bool overwrite = false;   // replace an existing output tag
  bool set_latest = false;  // point `latest` at the output tag
  StoreOptions store;       // for opening the store
};

struct NaiveReshapeStats {
  double seconds = 0;              // wall time, open to commit
  uint64_t files_loaded = 0;       // engine.load calls
  uint64_t tensor_bytes_read = 0;  // bytes of the tensors those loads returned
  uint64_t block_bytes_read = 0;   // raw bytes of blocks the store read
  uint64_t files_written = 0;
  uint64_t tensor_bytes_written = 0;  // logical bytes of the output tag
  uint64_t new_bytes_written = 0;     // of which new blocks (not deduplicated)
  Model3dDesc source;
  Model3dDesc target;
};

// InvalidArgument when the target is not a contraction DeepSpeed can do,
// NotFound when the source tag does not exist, AlreadyExists when the
// output tag exists and !overwrite.
Result<NaiveReshapeStats> NaiveReshape(const std::string& store_dir, const std::string& source_tag,
                                       const Model3dDesc& target, const std::string& output_tag,
                                       const NaiveReshapeOptions& options = {});

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_DEEPSPEED_NAIVE_RESHAPE_H_
