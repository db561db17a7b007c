#include "checkpoint/deepspeed/deepspeed_checkpoint.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <regex>
#include <set>

#include "checkpoint/core/tag_layout.h"
#include "checkpoint/core/file_names.h"
#include "checkpoint/core/state_view.h"
#include "engine/state_codec.h"
#include "store/store.h"
#include "engine/torch_call.h"

namespace ckptkv::checkpoint {
namespace {

constexpr const char* kEmbedPrefix = "tied_modules.embed.";

// Python's list[i] with negative indices; nullopt when out of range.
std::optional<size_t> PyIndex(int i, size_t size) {
  const int64_t n = static_cast<int64_t>(size);
  const int64_t j = i < 0 ? n + i : i;
  if (j < 0 || j >= n) return std::nullopt;
  return static_cast<size_t>(j);
}

// The value of a stored node as a LibTorch value; nullopt when the subtree
// holds a tensor (the caller then loads the file).
std::optional<c10::IValue> NodeToIValue(const fb::Node* n) {
  if (n == nullptr) return c10::IValue();
  const TensorLoader no_tensors = [](const std::string&, const std::string&) -> Result<at::Tensor> {
    return Status::NotSupported("a tensor");
  };
  auto v = DecodeNode(n, no_tensors, "metadata");
  if (!v.ok()) return std::nullopt;
  return std::move(v).value();
}

std::string Ranks(int tp, int pp) {
  return "(tp " + std::to_string(tp) + ", pp " + std::to_string(pp) + ")";
}

}  // namespace

bool IsSequentialLayerKey(const std::string& key) {
  static const std::set<std::string> kSequential = {
      "input_layernorm.weight",        "input_layernorm.bias",
      "self_attention.dense.bias",     "post_attention_layernorm.weight",
      "post_attention_layernorm.bias", "mlp.dense_4h_to_h.bias",
      "position_embeddings.weight"};
  return kSequential.count(key) > 0;
}

int LayerConcatDim(const std::string& key) {
  return key == "self_attention.dense.weight" || key == "mlp.dense_4h_to_h.weight" ? 1 : 0;
}

Result<c10::IValue> MergeStateDicts(const std::vector<c10::IValue>& dicts) {
  if (dicts.empty() || !dicts[0].isGenericDict()) {
    return Status::InvalidArgument("_merge_state_dicts needs a non-empty list of dicts");
  }
  const auto first = dicts[0].toGenericDict();
  c10::impl::GenericDict out(first.keyType(), first.valueType());
  for (const auto& e : first) {
    const std::string key = e.key().isString() ? e.key().toStringRef() : std::string();
    if (IsSequentialLayerKey(key)) {
      out.insert(e.key(), e.value());
      continue;
    }
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < dicts.size(); ++i) {
      if (!dicts[i].isGenericDict()) {
        return Status::InvalidArgument("_merge_state_dicts: item " + std::to_string(i) +
                                       " is not a dict");
      }
      const auto d = dicts[i].toGenericDict();
      auto it = d.find(e.key());
      if (it == d.end() || !it->value().isTensor()) {
        return Status::InvalidArgument(
            "_merge_state_dicts: key '" + key + "' of the first " + "dict is " +
            (it == d.end() ? std::string("missing") : "a " + PyTypeName(it->value())) +
            " in dict " + std::to_string(i) + "; expected a tensor");
      }
      parts.push_back(it->value().toTensor());
    }
    RETURN_IF_ERROR(TorchCall(TorchErrorKind::kUserValue,
                              "_merge_state_dicts: cannot cat '" + key + "' on dim " +
                                  std::to_string(LayerConcatDim(key)),
                              [&] {
                                out.insert(e.key(), at::cat(parts, LayerConcatDim(key)));
                                return Status::OK();
                              }));
  }
  return c10::IValue(out);
}

Result<DeepSpeedCheckpoint> DeepSpeedCheckpoint::Open(const Store& store, const std::string& tag,
                                                      DeepSpeedCheckpointOptions options) {
  ASSIGN_OR_RETURN(DeepSpeedFiles files, ListDeepSpeedFiles(store, tag));
  DeepSpeedCheckpoint c;
  c.store_ = &store;
  c.tag_ = tag;
  c.final_layer_norm_idx_ = options.final_layer_norm_idx;
  c.merge_ = options.merge;
  c.loader_ = options.loader ? std::move(options.loader) : StoreFileLoader(store, tag);
  // _validate_folder.
  const bool pipeline_parallel = !files.layer.empty();
  std::vector<std::string> prefixes = {"mp_rank_"};
  if (pipeline_parallel) {
    prefixes.emplace_back("layer_");
    prefixes.emplace_back("layer_01");
  }
  for (const auto& prefix : prefixes) {
    if (GetFilesWithPrefix(files.all, prefix).empty()) {
      std::string msg = "tag '" + tag + "' seems a bogus DeepSpeed checkpoint: cannot find ";
      msg += prefix;
      msg += "* files in it";
      return Status::InvalidArgument(msg);
    }
  }
  ASSIGN_OR_RETURN(c.zero_, ZeROCheckpoint::Open(store, tag, std::nullopt, c.loader_));
  // DeepSpeed lists every mp_rank_* / layer_* file by prefix.
  c.mp_rank_files_ = GetFilesWithPrefix(files.all, "mp_rank_");
  c.layer_files_ = files.layer;
  // _get_layer_keys.
  static const std::regex kLayerPattern(R"(layer_(\d+)-model_.*)");
  std::set<std::pair<long long, std::string>> ids;
  for (const auto& f : c.layer_files_) {
    std::smatch m;
    const std::string name = Basename(f);
    if (!std::regex_search(name, m, kLayerPattern)) {
      std::string msg = "tag '" + tag + "': layer file ";
      msg += f;
      msg += " does not match layer_<id>-model_*";
      return Status::InvalidArgument(msg);
    }
    ids.emplace(std::stoll(m[1].str()), m[1].str());
  }
  for (const auto& [num, id] : ids) c.layer_keys_.push_back("layer_" + id);

  c.tp_ = options.tp.value_or(c.zero_.GetSrcTpDegree());
  c.pp_ = options.pp.value_or(c.zero_.GetSrcPpDegree());
  c.dp_ = options.dp.value_or(c.zero_.GetSrcDpDegree());
  c.old_2d_map_ = Meg2dParallelMap(c.zero_.GetSrcPpDegree(), c.zero_.GetSrcTpDegree());
  c.old_2d_map_.SimpleInit();
  ASSIGN_OR_RETURN(c.new_2d_map_, ReshapeMeg2dParallel(c.zero_.GetSrcPpDegree(),
                                                       c.zero_.GetSrcTpDegree(), c.pp_, c.tp_));
  if (c.IsChangePpDegree() || c.IsChangeTpDegree() || c.IsChangeDpDegree()) {
    RETURN_IF_ERROR(c.zero_.Reshape(Model3dDesc{c.pp_, c.tp_, c.dp_}));
  }
  // _sanity_check.
  const int num_mp = static_cast<int>(c.mp_rank_files_.size());
  if (num_mp % c.tp_ != 0 || c.zero_.num_files() % (c.pp_ * c.tp_) != 0) {
    return Status::InvalidArgument(
        "tag '" + tag + "': " + std::to_string(num_mp) + " model files and " +
        std::to_string(c.zero_.num_files()) + " zero files do not fit target " +
        Ranks(c.tp_, c.pp_) +
        "; the model files must be a multiple of tp and the zero files of pp*tp");
  }
  RETURN_IF_ERROR(c.BuildLayerMaps());
  // _build_global_state, from the state tree of the first model file.
  ASSIGN_OR_RETURN(StoredState first, StoredState::Read(store, tag, c.mp_rank_files_[0]));
  c.iteration_ = AsInt(first.Find({"iteration"})).value_or(0);
  RETURN_IF_ERROR(c.BuildModuleLayers());
  return c;
}

Status DeepSpeedCheckpoint::BuildLayerMaps() {
  // _build_pp_transformer_map.
  std::vector<std::string> transformer;
  if (!layer_keys_.empty()) {
    auto final_idx = PyIndex(final_layer_norm_idx_, layer_keys_.size());
    const size_t end = final_idx ? *final_idx : layer_keys_.size();
    for (size_t i = 1; i < end; ++i) transformer.push_back(layer_keys_[i]);
  }
  const size_t layers_per_pp = transformer.size() / pp_;
  for (int i = 0; i < pp_; ++i) {
    pp_to_transformer_map_[i] = std::vector<std::string>(
        transformer.begin() + i * layers_per_pp, transformer.begin() + (i + 1) * layers_per_pp);
  }
  // _build_transformer_file_map.
  if (!transformer.empty() && layers_per_pp == 0) {
    return Status::InvalidArgument("tag '" + tag_ + "': " + std::to_string(transformer.size()) +
                                   " transformer layers cannot be spread over pp " +
                                   std::to_string(pp_) + " stages");
  }
  for (size_t k = 0; k < transformer.size(); ++k) {
    const int pp_index = static_cast<int>(k / layers_per_pp);
    std::vector<int> idx;
    const auto files = GetFilesWithPrefix(layer_files_, transformer[k] + "-");
    for (size_t i = 0; i < files.size(); ++i) idx.push_back(static_cast<int>(i));
    auto parts = PartitionData(idx, tp_);
    if (!parts.ok()) return parts.status().WithContext("tag '" + tag_ + "' " + transformer[k]);
    for (int t = 0; t < tp_; ++t) {
      std::vector<std::string> group;
      for (int i : parts.value()[t]) group.push_back(files[i]);
      transformer_file_map_[{t, pp_index}].push_back(std::move(group));
    }
  }
  // _build_tp_other_layer_map (prefix without '-', as DeepSpeed).
  auto other = [&](int layer_index, std::map<int, std::vector<std::string>>* out) -> Status {
    if (layer_files_.empty()) return Status::OK();
    auto i = PyIndex(layer_index, layer_keys_.size());
    if (!i) {
      return Status::InvalidArgument("tag '" + tag_ + "': layer index " +
                                     std::to_string(layer_index) + " outside the " +
                                     std::to_string(layer_keys_.size()) + " layer keys");
    }
    const auto files = GetFilesWithPrefix(layer_files_, layer_keys_[*i]);
    std::vector<int> idx;
    for (size_t j = 0; j < files.size(); ++j) idx.push_back(static_cast<int>(j));
    auto parts = PartitionData(idx, tp_);
    if (!parts.ok()) return parts.status().WithContext("tag '" + tag_ + "' " + layer_keys_[*i]);
    for (int t = 0; t < tp_; ++t) {
      for (int j : parts.value()[t]) (*out)[t].push_back(files[j]);
      (*out)[t];  // a TP group may be empty
    }
    return Status::OK();
  };
  RETURN_IF_ERROR(other(0, &tp_to_embedding_map_));
  return other(final_layer_norm_idx_, &tp_to_final_norm_map_);
}

Status DeepSpeedCheckpoint::BuildModuleLayers() {
  const int src_tp = zero_.GetSrcTpDegree();
  std::map<std::string, std::set<int>> stages;
  std::map<long long, std::string> numbered;
  bool embedding = false;
  for (const auto& file : mp_rank_files_) {
    auto coords = ParseFileName(file);
    if (!coords || coords->kind != FileKind::kModelStates) continue;
    ASSIGN_OR_RETURN(StoredState state, StoredState::Read(*store_, tag_, file));
    const int stage = PpOfMp(coords->mp_rank, src_tp);
    for (const auto& [k, v] : DictEntries(state.Find({"module"}))) {
      auto key = AsString(k);
      if (!key) continue;
      if (StartsWith(*key, kEmbedPrefix)) {
        embedding = true;
        stages[kEmbedPrefix].insert(stage);
        continue;
      }
      const size_t dot = key->find('.');
      if (dot == 0 || dot == std::string::npos ||
          !std::all_of(key->begin(), key->begin() + dot, ::isdigit)) {
        continue;
      }
      const std::string prefix = key->substr(0, dot + 1);
      numbered.emplace(std::stoll(key->substr(0, dot)), prefix);
      stages[prefix].insert(stage);
    }
  }
  if (embedding) module_layers_.push_back(ModuleLayer{kEmbedPrefix, -1});
  for (const auto& [num, prefix] : numbered) {
    module_layers_.push_back(ModuleLayer{prefix, static_cast<int>(num)});
  }
  for (auto& [prefix, s] : stages) module_layer_stages_[prefix].assign(s.begin(), s.end());
  return Status::OK();
}

Result<c10::IValue> DeepSpeedCheckpoint::GetCheckpointValue(const std::string& key) const {
  ASSIGN_OR_RETURN(StoredState first, StoredState::Read(*store_, tag_, mp_rank_files_[0]));
  if (auto v = NodeToIValue(first.Find({key}))) return *v;
  // The value holds tensors: load the file, as DeepSpeed does.
  ASSIGN_OR_RETURN(c10::IValue sd, loader_(mp_rank_files_[0]));
  const c10::IValue* v = DictField(sd, key);
  return v != nullptr ? *v : c10::IValue();
}

Result<c10::IValue> DeepSpeedCheckpoint::GetArgs() const { return GetCheckpointValue("args"); }

Result<std::vector<std::string>> DeepSpeedCheckpoint::Get2dParallelFiles(int tp, int pp) const {
  if (tp < 0 || tp >= tp_ || pp < 0 || pp >= pp_) {
    return Status::InvalidArgument("rank " + Ranks(tp, pp) + " is outside the target layout " +
                                   Ranks(tp_, pp_));
  }
  ASSIGN_OR_RETURN(auto indices, new_2d_map_.GetData(pp, tp));
  std::vector<std::string> out;
  for (int i : indices) {
    if (i < 0 || i >= static_cast<int>(mp_rank_files_.size())) {
      return Status::InvalidArgument("tag '" + tag_ + "': rank " + Ranks(tp, pp) +
                                     " needs model file " + std::to_string(i) + " but there are " +
                                     std::to_string(mp_rank_files_.size()));
    }
    out.push_back(mp_rank_files_[i]);
  }
  return out;
}

Result<c10::IValue> DeepSpeedCheckpoint::Get2dParallelState(int tp, int pp) const {
  ASSIGN_OR_RETURN(auto files, Get2dParallelFiles(tp, pp));
  std::optional<c10::IValue> merged;
  for (const auto& f : files) {
    ASSIGN_OR_RETURN(c10::IValue sd, loader_(f));
    if (!merged) {
      merged = std::move(sd);
      continue;
    }
    auto m = MergeState(*merged, sd, merge_);
    if (!m.ok()) return m.status().WithContext("tag '" + tag_ + "': merging " + f);
    merged = std::move(m).value();
  }
  return *merged;
}

Result<std::vector<std::string>> DeepSpeedCheckpoint::GetZeroFiles(int pp, int tp, int dp) const {
  return zero_.GetFilesForRank(pp, tp, dp);
}

Result<c10::IValue> DeepSpeedCheckpoint::GetZeroCheckpointState(int pp, int tp, int dp) const {
  return zero_.GetStateForRank(pp, tp, dp, {"param_shapes"}, true, merge_);
}

Result<std::string> DeepSpeedCheckpoint::GetEmbeddingLayerId() const {
  if (layer_keys_.empty()) return Status::NotFound("tag '" + tag_ + "' has no layer files");
  return layer_keys_[0];
}

Result<std::string> DeepSpeedCheckpoint::GetFinalNormLayerId() const {
  auto i = PyIndex(final_layer_norm_idx_, layer_keys_.size());
  if (!i) return Status::NotFound("tag '" + tag_ + "' has no final norm layer file");
  return layer_keys_[*i];
}

namespace {

Result<std::vector<std::string>> MapAt(const std::map<int, std::vector<std::string>>& m, int tp,
                                       const std::string& what) {
  auto it = m.find(tp);
  if (it == m.end()) {
    return Status::InvalidArgument("no " + what + " files for tp index " + std::to_string(tp) +
                                   " (the tag has " + std::to_string(m.size()) + " TP groups)");
  }
  return it->second;
}

}  // namespace

Result<std::vector<std::string>> DeepSpeedCheckpoint::GetEmbeddingFiles(int tp) const {
  return MapAt(tp_to_embedding_map_, tp, "embedding layer");
}

Result<c10::IValue> DeepSpeedCheckpoint::GetEmbeddingState(int tp) const {
  ASSIGN_OR_RETURN(auto files, GetEmbeddingFiles(tp));
  std::vector<c10::IValue> sds;
  for (const auto& f : files) {
    ASSIGN_OR_RETURN(c10::IValue sd, loader_(f));
    sds.push_back(std::move(sd));
  }
  return MergeStateDicts(sds);
}

Result<std::vector<std::string>> DeepSpeedCheckpoint::GetFinalNormFiles(int tp) const {
  return MapAt(tp_to_final_norm_map_, tp, "final norm layer");
}

Result<c10::IValue> DeepSpeedCheckpoint::GetFinalNormState(int tp) const {
  ASSIGN_OR_RETURN(auto files, GetFinalNormFiles(tp));
  if (files.empty()) return Status::NotFound("no final norm file for tp " + std::to_string(tp));
  return loader_(files[0]);
}

Result<std::vector<std::string>> DeepSpeedCheckpoint::GetPpTransformerMap(int pp) const {
  auto it = pp_to_transformer_map_.find(pp);
  if (pp < 0 || pp >= pp_ || it == pp_to_transformer_map_.end()) {
    return Status::InvalidArgument("pp index " + std::to_string(pp) + " >= pp degree " +
                                   std::to_string(pp_));
  }
  return it->second;
}

Result<std::vector<c10::IValue>> DeepSpeedCheckpoint::GetTransformerState(int tp, int pp) const {
  if (tp < 0 || tp >= tp_ || pp < 0 || pp >= pp_) {
    return Status::InvalidArgument("rank " + Ranks(tp, pp) + " is outside the target layout " +
                                   Ranks(tp_, pp_));
  }
  std::vector<c10::IValue> out;
  auto it = transformer_file_map_.find({tp, pp});
  if (it == transformer_file_map_.end()) return out;
  for (const auto& group : it->second) {
    std::vector<c10::IValue> sds;
    for (const auto& f : group) {
      ASSIGN_OR_RETURN(c10::IValue sd, loader_(f));
      sds.push_back(std::move(sd));
    }
    ASSIGN_OR_RETURN(auto merged, MergeStateDicts(sds));
    out.push_back(std::move(merged));
  }
  return out;
}

Result<std::vector<std::string>> DeepSpeedCheckpoint::ModuleLayerFiles(
    const ModuleLayer& layer) const {
  auto it = module_layer_stages_.find(layer.prefix);
  if (it == module_layer_stages_.end() || it->second.empty()) {
    return Status::NotFound("tag '" + tag_ + "': no model file holds module layer " + layer.prefix);
  }
  const int stage = it->second.front();
  const int src_tp = zero_.GetSrcTpDegree();
  std::vector<std::string> files;
  for (int t = 0; t < src_tp; ++t) {
    const std::string name = ModelFileName(MpRank(stage, t, src_tp));
    auto f = std::find_if(mp_rank_files_.begin(), mp_rank_files_.end(),
                          [&](const std::string& p) { return Basename(p) == name; });
    if (f == mp_rank_files_.end()) {
      return Status::InvalidArgument("tag '" + tag_ + "': module layer " + layer.prefix +
                                     " lives in stage " + std::to_string(stage) + " but " + name +
                                     " is missing");
    }
    files.push_back(*f);
  }
  return files;
}

Result<c10::IValue> DeepSpeedCheckpoint::ModuleLayerState(const std::string& file,
                                                          const ModuleLayer& layer) const {
  ASSIGN_OR_RETURN(c10::IValue sd, loader_(file));
  const c10::IValue* module = DictField(sd, "module");
  if (!module || !module->isGenericDict()) {
    return Status::InvalidArgument("tag '" + tag_ + "': " + file + " has no module dict");
  }
  c10::impl::GenericDict out(c10::StringType::get(), c10::AnyType::get());
  for (const auto& e : module->toGenericDict()) {
    if (!e.key().isString() || !StartsWith(e.key().toStringRef(), layer.prefix)) continue;
    out.insert(e.key().toStringRef().substr(layer.prefix.size()), e.value());
  }
  return c10::IValue(out);
}

Result<std::vector<std::string>> DeepSpeedCheckpoint::GetModuleEmbeddingFiles(int tp) const {
  if (module_layers_.empty() || module_layers_[0].index != -1) {
    return Status::NotFound("tag '" + tag_ + "': no model file holds " + kEmbedPrefix + "*");
  }
  ASSIGN_OR_RETURN(auto files, ModuleLayerFiles(module_layers_[0]));
  std::vector<int> idx(files.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
  ASSIGN_OR_RETURN(auto parts, PartitionData(idx, tp_));
  if (tp < 0 || tp >= tp_) return Status::InvalidArgument("tp index outside the target layout");
  std::vector<std::string> out;
  for (int i : parts[tp]) out.push_back(files[i]);
  return out;
}

Result<c10::IValue> DeepSpeedCheckpoint::GetModuleEmbeddingState(int tp) const {
  ASSIGN_OR_RETURN(auto files, GetModuleEmbeddingFiles(tp));
  std::vector<c10::IValue> sds;
  for (const auto& f : files) {
    ASSIGN_OR_RETURN(auto sd, ModuleLayerState(f, module_layers_[0]));
    sds.push_back(std::move(sd));
  }
  return MergeStateDicts(sds);
}

Result<std::vector<ModuleLayer>> DeepSpeedCheckpoint::GetModulePpTransformerLayers(int pp) const {
  if (pp < 0 || pp >= pp_) {
    return Status::InvalidArgument("pp index " + std::to_string(pp) + " >= pp degree " +
                                   std::to_string(pp_));
  }
  std::vector<ModuleLayer> transformer;
  auto final_idx = PyIndex(final_layer_norm_idx_, module_layers_.size());
  const size_t end = final_idx ? *final_idx : module_layers_.size();
  for (size_t i = 1; i < end; ++i) transformer.push_back(module_layers_[i]);
  const size_t per_pp = transformer.size() / pp_;
  return std::vector<ModuleLayer>(transformer.begin() + pp * per_pp,
                                  transformer.begin() + (pp + 1) * per_pp);
}

Result<std::vector<c10::IValue>> DeepSpeedCheckpoint::GetModuleTransformerState(int tp,
                                                                                int pp) const {
  if (tp < 0 || tp >= tp_) return Status::InvalidArgument("tp index outside the target layout");
  ASSIGN_OR_RETURN(auto layers, GetModulePpTransformerLayers(pp));
  std::vector<c10::IValue> out;
  for (const auto& layer : layers) {
    ASSIGN_OR_RETURN(auto files, ModuleLayerFiles(layer));
    std::vector<int> idx(files.size());
    for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
    ASSIGN_OR_RETURN(auto parts, PartitionData(idx, tp_));
    std::vector<c10::IValue> sds;
    for (int i : parts[tp]) {
      ASSIGN_OR_RETURN(auto sd, ModuleLayerState(files[i], layer));
      sds.push_back(std::move(sd));
    }
    ASSIGN_OR_RETURN(auto merged, MergeStateDicts(sds));
    out.push_back(std::move(merged));
  }
  return out;
}

Result<c10::IValue> DeepSpeedCheckpoint::GetModuleFinalNormState(int tp) const {
  if (tp < 0 || tp >= tp_) return Status::InvalidArgument("tp index outside the target layout");
  auto final_idx = PyIndex(final_layer_norm_idx_, module_layers_.size());
  if (!final_idx || module_layers_[*final_idx].index < 0) {
    return Status::NotFound("tag '" + tag_ + "': no numbered module layer for the final norm");
  }
  const ModuleLayer& layer = module_layers_[*final_idx];
  ASSIGN_OR_RETURN(auto files, ModuleLayerFiles(layer));
  std::vector<int> idx(files.size());
  for (size_t i = 0; i < idx.size(); ++i) idx[i] = static_cast<int>(i);
  ASSIGN_OR_RETURN(auto parts, PartitionData(idx, tp_));
  if (parts[tp].empty()) return Status::NotFound("no final norm file for tp " + std::to_string(tp));
  return ModuleLayerState(files[parts[tp][0]], layer);
}

}  // namespace ckptkv::checkpoint
