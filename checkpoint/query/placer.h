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
//   layer_XX-model_YY-model_states.pt (and layer_XX-model_states.pt,
//   layer_XX-model_YY_model_states.pt): PipelineModule's state dict of layer
//   XX at TP rank YY (0 without a model axis). Key K is the parameter the
//   model-state files' param_shapes name `XX.K`, or for a tied module the
//   one `tied_modules.<m>.K`, sharded as the rules say, at the TP degree
//   of the model file that names it. DeepSpeed saves a stage's layer files
//   before its mp_rank file, so those are taken from the model files saved
//   earlier in the tag or else in the last tag this placer ended (a run
//   saves every checkpoint at one layout); the first tag of a run saved in
//   DeepSpeed's order thus has unplaced layer files, which PlaceTag (which
//   takes model files first) places after the commit. Every tensor must
//   have the shape param_shapes gives it.
//
// Files of other names (client files, MoE expert files) get no placements.
// PlacedBefore orders a tag's files so that each can be placed when its
// turn comes (model-state files, then layer files, then the rest, then
// optimizer files): sort a directory's files with it before placing them
// one by one, as an import does.
#ifndef CKPTKV_CHECKPOINT_QUERY_PLACER_H_
#define CKPTKV_CHECKPOINT_QUERY_PLACER_H_

#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/core/model_spec.h"
#include "engine/kv_checkpoint_engine.h"
#include "store/status.h"

namespace ckptkv::checkpoint {

struct PlaceTagReport;

class DeepSpeedPlacer : public TensorPlacer {
 public:
  explicit DeepSpeedPlacer(ShardingRules rules = ShardingRules::MegatronDefaults());

  // Never fails: a file it cannot place gets no placements and a warning.
  Placements Place(const std::string& tag, const std::string& file,
                   const c10::IValue& state) override;
  void EndTag(const std::string& tag) override;
  // FinishTag, for the engines.
  Status AfterCommit(Store& store, const std::string& tag) override;

  // After `tag` was committed: if Place left layer files of it unplaced
  // (DeepSpeed's save order, first tag of a run), places the committed tag
  // with PlaceTag (records only, no tensor bytes; the tag is re-committed
  // atomically) and returns its report; nullopt when there was nothing to
  // do. Call it before EndTag(tag) or after: the last 16 such tags are
  // remembered until then.
  Result<std::optional<PlaceTagReport>> FinishTag(Store& store, const std::string& tag);

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
  Result<Placements> PlaceLayer(const std::string& tag, int layer, int tp_rank,
                                const c10::IValue& state);

  ShardingRules rules_;
  std::mutex mu_;
  std::map<std::string, std::map<int, ModelInfo>> tags_;  // tag -> mp rank -> model info
  std::map<int, ModelInfo> last_;  // the model infos of the last tag ended that had any
  static constexpr size_t kUnplacedTags = 16;
  // Marks `tag` for FinishTag. Under mu_.
  void PlaceAfterCommit(const std::string& tag);
  std::deque<std::string> unplaced_layers_;  // tags with layer files Place left unplaced
  // tag -> layer parameters placed from last_: name -> (local shape, tp).
  std::map<std::string, std::map<std::string, std::pair<std::vector<int64_t>, int>>> guessed_;
};

// Whether `a` must be placed before `b` (see above); a strict weak order
// on file names, by kind only, so a stable sort keeps the rest in place.
bool PlacedBefore(const std::string& a, const std::string& b);

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
