// DeepSpeed's DeepSpeedCheckpoint (deepspeed/checkpoint/deepspeed_checkpoint.py)
// over a committed tag of a ckptkv store: the source layout, a (smaller)
// target layout, the 2D map of model files and the ZeRO map, and the merged
// states of a target rank, as DeepSpeed computes them.
//
// Model files are mp_rank_XX_model_states.pt (lexicographic order, as
// DeepSpeed lists them); iteration and args are read from the state tree of
// the first one without loading tensors. With PipelineModule layer files
// (layer_*) the embedding / transformer / final-norm maps are DeepSpeed's.
// Without them, for model files whose `module` holds Megatron GPTModelPipe
// names (tied_modules.embed.*, <i>.<param>), the same maps are built over
// "module layers" (ModuleLayer): the embedding, the numbered layers but the
// last (transformers) and the last (final norm).
#ifndef CKPTKV_CHECKPOINT_DEEPSPEED_DEEPSPEED_CHECKPOINT_H_
#define CKPTKV_CHECKPOINT_DEEPSPEED_DEEPSPEED_CHECKPOINT_H_

#include <ATen/core/ivalue.h>

#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/deepspeed/merge_state.h"
#include "checkpoint/core/reshape_maps.h"
#include "checkpoint/deepspeed/zero_checkpoint.h"
#include "store/status.h"

namespace ckptkv {
class Store;
}

namespace ckptkv::checkpoint {

// SEQUENTIAL_LAYERS: keys replicated across TP (taken from the first file).
bool IsSequentialLayerKey(const std::string& key);
// LAYER_CONCAT_DIM: 1 for self_attention.dense.weight and
// mlp.dense_4h_to_h.weight, else 0.
int LayerConcatDim(const std::string& key);
// _merge_state_dicts: keys of the first dict; sequential keys from the
// first dict, the others torch.cat along LayerConcatDim.
Result<c10::IValue> MergeStateDicts(const std::vector<c10::IValue>& dicts);

// A layer of a model file's `module` dict (GPTModelPipe naming).
struct ModuleLayer {
  std::string prefix;  // "tied_modules.embed." or "<i>."
  int index = -1;      // -1 for the embedding
};

struct DeepSpeedCheckpointOptions {
  // Target degrees; absent = the source's.
  std::optional<int> tp, pp, dp;
  // Index into the layer keys of the final norm (DeepSpeed's default -1).
  int final_layer_norm_idx = -1;
  // How files are loaded; default StoreFileLoader(store, tag).
  FileLoader loader;
  MergeOptions merge;
};

class DeepSpeedCheckpoint {
 public:
  // InvalidArgument when the tag has no mp_rank_* files (or layer files
  // without layer_01*), no ZeRO files, or the target is not a contraction
  // DeepSpeed can do.
  static Result<DeepSpeedCheckpoint> Open(const Store& store, const std::string& tag,
                                          DeepSpeedCheckpointOptions options = {});

  const std::string& tag() const { return tag_; }
  int tp_degree() const { return tp_; }
  int pp_degree() const { return pp_; }
  int dp_degree() const { return dp_; }
  int original_tp_degree() const { return zero_.GetSrcTpDegree(); }
  int original_pp_degree() const { return zero_.GetSrcPpDegree(); }
  int original_dp_degree() const { return zero_.GetSrcDpDegree(); }
  int original_world_size() const { return zero_.GetSrcWorldSize(); }
  int world_size() const { return tp_ * pp_ * dp_; }
  bool IsChangeTpDegree() const { return tp_ != original_tp_degree(); }
  bool IsChangePpDegree() const { return pp_ != original_pp_degree(); }
  bool IsChangeDpDegree() const { return dp_ != original_dp_degree(); }

  const Meg2dParallelMap& old_2d_map() const { return old_2d_map_; }
  const Meg2dParallelMap& new_2d_map() const { return new_2d_map_; }
  const ZeROCheckpoint& zero_checkpoint() const { return zero_; }
  const std::vector<std::string>& zero_files() const { return zero_.file_list(); }
  const std::vector<std::string>& mp_rank_files() const { return mp_rank_files_; }
  const std::vector<std::string>& layer_files() const { return layer_files_; }
  const std::vector<std::string>& layer_keys() const { return layer_keys_; }

  // iteration of the first model file (0 when absent); args (None when absent).
  int64_t GetIteration() const { return iteration_; }
  Result<c10::IValue> GetArgs() const;
  // Any top-level value of the first model file (None when absent), e.g.
  // "checkpoint_info", "universal_checkpoint_info".
  Result<c10::IValue> GetCheckpointValue(const std::string& key) const;

  // The model files of target rank (tp, pp) and their merge_state.
  Result<std::vector<std::string>> Get2dParallelFiles(int tp, int pp) const;
  Result<c10::IValue> Get2dParallelState(int tp, int pp) const;
  // The ZeRO files of target rank (pp, tp, dp) and their merged state,
  // param_shapes ignored, paddings stripped.
  Result<std::vector<std::string>> GetZeroFiles(int pp, int tp, int dp) const;
  Result<c10::IValue> GetZeroCheckpointState(int pp, int tp, int dp) const;

  // Layer-file maps (PipelineModule layer_* files; empty without them).
  const std::map<int, std::vector<std::string>>& tp_to_embedding_map() const {
    return tp_to_embedding_map_;
  }
  const std::map<int, std::vector<std::string>>& tp_to_final_norm_map() const {
    return tp_to_final_norm_map_;
  }
  const std::map<int, std::vector<std::string>>& pp_to_transformer_map() const {
    return pp_to_transformer_map_;
  }
  // (tp, pp) -> per transformer layer the files to merge.
  const std::map<std::pair<int, int>, std::vector<std::vector<std::string>>>& transformer_file_map()
      const {
    return transformer_file_map_;
  }
  Result<std::string> GetEmbeddingLayerId() const;
  Result<std::string> GetFinalNormLayerId() const;
  Result<std::vector<std::string>> GetEmbeddingFiles(int tp) const;
  Result<c10::IValue> GetEmbeddingState(int tp) const;
  Result<std::vector<std::string>> GetFinalNormFiles(int tp) const;
  // Loads only the first file, as DeepSpeed does.
  Result<c10::IValue> GetFinalNormState(int tp) const;
  Result<std::vector<std::string>> GetPpTransformerMap(int pp) const;
  Result<std::vector<c10::IValue>> GetTransformerState(int tp, int pp) const;

  // Module-layer maps (model files holding GPTModelPipe `module` dicts):
  // the layers found in the module keys of every model file, embedding
  // first, then numbered layers in numeric order.
  const std::vector<ModuleLayer>& module_layers() const { return module_layers_; }
  // The model files (old TP order) of stage 0 cut into tp groups, like
  // _build_tp_other_layer_map over the embedding's per-TP files.
  Result<std::vector<std::string>> GetModuleEmbeddingFiles(int tp) const;
  // The embedding entries (keys without "tied_modules.embed.") merged with
  // MergeStateDicts.
  Result<c10::IValue> GetModuleEmbeddingState(int tp) const;
  // Transformer module layers of target stage pp (DeepSpeed's
  // layers_per_pp = #transformers / pp split, remainder dropped).
  Result<std::vector<ModuleLayer>> GetModulePpTransformerLayers(int pp) const;
  // For each of those layers, its entries (keys without "<i>.") from the
  // source files of TP group tp merged with MergeStateDicts.
  Result<std::vector<c10::IValue>> GetModuleTransformerState(int tp, int pp) const;
  // The final norm entries of the first file holding them (as DeepSpeed).
  Result<c10::IValue> GetModuleFinalNormState(int tp) const;

 private:
  DeepSpeedCheckpoint() = default;
  Status BuildLayerMaps();
  Status BuildModuleLayers();
  // The old-TP-ordered model files of the source stage holding `layer`.
  Result<std::vector<std::string>> ModuleLayerFiles(const ModuleLayer& layer) const;
  Result<c10::IValue> ModuleLayerState(const std::string& file, const ModuleLayer& layer) const;

  const Store* store_ = nullptr;
  std::string tag_;
  int tp_ = 1, pp_ = 1, dp_ = 1;
  int final_layer_norm_idx_ = -1;
  FileLoader loader_;
  MergeOptions merge_;
  std::vector<std::string> mp_rank_files_;
  std::vector<std::string> layer_files_;
  std::vector<std::string> layer_keys_;
  ZeROCheckpoint zero_;
  Meg2dParallelMap old_2d_map_{1, 1};
  Meg2dParallelMap new_2d_map_{1, 1};
  int64_t iteration_ = 0;
  std::map<int, std::vector<std::string>> tp_to_embedding_map_;
  std::map<int, std::vector<std::string>> tp_to_final_norm_map_;
  std::map<int, std::vector<std::string>> pp_to_transformer_map_;
  std::map<std::pair<int, int>, std::vector<std::vector<std::string>>> transformer_file_map_;
  std::vector<ModuleLayer> module_layers_;
  // For each module layer: the source stages whose files hold it.
  std::map<std::string, std::vector<int>> module_layer_stages_;
};

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_DEEPSPEED_DEEPSPEED_CHECKPOINT_H_
