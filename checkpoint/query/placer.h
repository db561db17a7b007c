// DeepSpeedPlacer: fragment placements for DeepSpeed's files at save time.
//
// Plugged into KvCheckpointEngine (KvEngineConfig::placer), it tells the
// store where every tensor of a DeepSpeed checkpoint sits in its global
// tensor, from the file name, the file's own metadata and the sharding
// rules, so that a tag saved by a training run can be reshaped, merged and
// exported like one written by `ckptkv synth`, with no file loads to plan:
//
//   mp_rank_XX_model_states.pt (and ZeRO-3's zero_pp_rank_D_mp_rank_XX_
//   model_states.pt): each module tensor is TP rank (XX % tp)'s shard of
//   its parameter, tp from checkpoint_parallel_dimensions (mp_world_size
//   when absent); the partition dimension comes from the sharding rules; the
//   local shape from param_shapes (ZeRO-3 saves empty placeholders).
//
//   [bf16_]zero_pp_rank_D_mp_rank_XX_optim_states.pt: the flat fp32
//   partition and the Adam moments of each parameter group are dp rank D's
//   part of the group's flat buffer, laid out from the param_shapes of
//   model file XX (which must be saved first in the same tag, as DeepSpeed
//   does) and the ZeRO stage's layout. The file's own param_slice_mappings,
//   group_paddings and tensor sizes must agree with that layout exactly;
//   otherwise the file is saved without placements and the log says why.
//
// Files of other names (layer_* files, client files) get no placements.
#ifndef CKPTKV_CHECKPOINT_QUERY_PLACER_H_
#define CKPTKV_CHECKPOINT_QUERY_PLACER_H_

#include <map>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/core/model_spec.h"
#include "engine/kv_checkpoint_engine.h"
#include "store/status.h"

namespace ckptkv::checkpoint {

class DeepSpeedPlacer : public TensorPlacer {
 public:
  explicit DeepSpeedPlacer(ShardingRules rules = ShardingRules::MegatronDefaults());

  // Never fails: a file it cannot place gets no placements and a warning.
  Placements Place(const std::string& tag, const std::string& file,
                   const c10::IValue& state) override;
  void EndTag(const std::string& tag) override;

  // As Place, with the reason when a DeepSpeed file cannot be placed
  // (InvalidArgument naming the key or tensor that disagrees). Files that
  // are not DeepSpeed model or optimizer files give an empty map.
  Result<Placements> TryPlace(const std::string& tag, const std::string& file,
                              const c10::IValue& state);

 private:
  // What an optimizer file needs from its model file.
  struct ModelInfo {
    int tp = 1;
    int dp = 1;  // dp_world_size
    // param_shapes: per group, (name, local shape) in buffer order.
    std::vector<std::vector<std::pair<std::string, std::vector<int64_t>>>> groups;
  };
  Result<Placements> PlaceModel(const std::string& tag, int mp, const c10::IValue& state);
  Result<Placements> PlaceOptim(const std::string& tag, int mp, int dp_rank,
                                const c10::IValue& state);

  ShardingRules rules_;
  std::mutex mu_;
  std::map<std::string, std::map<int, ModelInfo>> tags_;  // tag -> mp rank -> model info
};

// Records placements for a committed tag saved without them (by an engine
// with no placer, or before the placer existed): reads the files' state
// trees and tensor records, never tensor bytes, and commits `out_tag` (the
// same tag by default, replaced atomically) whose records name the same
// blocks with placements added. Files the placer cannot place keep their
// records as they were and are listed with the reason.
struct PlaceTagReport {
  std::string out_tag;
  uint64_t files = 0;
  uint64_t tensors = 0;
  uint64_t placed_tensors = 0;
  std::vector<std::pair<std::string, std::string>> unplaced_files;  // file, why
};
Result<PlaceTagReport> PlaceTag(Store& store, const std::string& tag, const std::string& out_tag,
                                DeepSpeedPlacer& placer);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_PLACER_H_
