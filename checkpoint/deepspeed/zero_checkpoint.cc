#include "checkpoint/deepspeed/zero_checkpoint.h"

#include <ATen/ATen.h>

#include <charconv>
#include <unordered_set>
#include <utility>

#include "checkpoint/core/tag_layout.h"
#include "engine/kv_checkpoint_engine.h"
#include "engine/state_codec.h"
#include "store/store.h"
#include "engine/torch_call.h"
#include "store/names.h"

namespace ckptkv::checkpoint {
namespace {

// dict.get(key) for a str key; nullopt when absent or `d` is not a dict.
std::optional<c10::IValue> Get(const c10::IValue& d, const std::string& key) {
  if (!d.isGenericDict()) return std::nullopt;
  const auto dict = d.toGenericDict();
  auto it = dict.find(c10::IValue(key));
  if (it == dict.end()) return std::nullopt;
  return it->value();
}

// Python truthiness of a list value: a non-empty list.
bool NonEmptyList(const std::optional<c10::IValue>& v) {
  return v && v->isList() && !v->toListRef().empty();
}

std::optional<int64_t> GroupIndex(const c10::IValue& key) {
  if (key.isInt()) return key.toInt();
  if (key.isString()) {
    const std::string& s = key.toStringRef();
    int64_t v = 0;
    auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
    if (ec == std::errc() && p == s.data() + s.size()) return v;
  }
  return std::nullopt;
}

void CountTensors(const c10::IValue& v, std::unordered_set<const void*>* seen, LoadStats* stats) {
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    const void* key = t.defined() ? t.unsafeGetTensorImpl() : nullptr;
    if (key == nullptr || !seen->insert(key).second) return;
    stats->tensors++;
    stats->tensor_bytes += t.numel() * t.element_size();
  } else if (v.isGenericDict()) {
    for (const auto& e : v.toGenericDict()) CountTensors(e.value(), seen, stats);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) CountTensors(e, seen, stats);
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) CountTensors(e, seen, stats);
  }
}

}  // namespace

FileLoader StoreFileLoader(const Store& store, const std::string& tag, LoadStats* stats) {
  return [&store, tag, stats](const std::string& file) -> Result<c10::IValue> {
    const std::string where = FileName(tag, file);
    ASSIGN_OR_RETURN(std::string bytes, store.GetFileTree(tag, file));
    const fb::StateTree* tree = flatbuffers::GetRoot<fb::StateTree>(bytes.data());
    TensorLoader tensor_for = [&](const std::string& param,
                                  const std::string& /*device*/) -> Result<at::Tensor> {
      return TorchCall(TorchErrorKind::kUserValue, TensorName(tag, file, param),
                       [&]() -> Result<at::Tensor> {
                         ASSIGN_OR_RETURN(at::Tensor t, ReadStoredTensor(store, tag, file, param));
                         if (stats) {
                           stats->tensors++;
                           stats->tensor_bytes += t.numel() * t.element_size();
                         }
                         return t;
                       });
    };
    ASSIGN_OR_RETURN(c10::IValue v, DecodeState(*tree, tensor_for, where));
    if (stats) stats->files++;
    return v;
  };
}

FileLoader EngineFileLoader(KvCheckpointEngine& engine, const std::string& load_dir,
                            const std::string& tag, LoadStats* stats) {
  return [&engine, load_dir, tag, stats](const std::string& file) -> Result<c10::IValue> {
    const std::string path = (load_dir.empty() ? "" : load_dir + "/") + tag + "/" + file;
    c10::IValue v;
    RETURN_IF_ERROR(TorchCall(TorchErrorKind::kUserValue, path, [&] {
      v = engine.load(path, c10::Device(c10::kCPU));
      return Status::OK();
    }));
    if (stats) {
      std::unordered_set<const void*> seen;
      CountTensors(v, &seen, stats);
      stats->files++;
    }
    return v;
  };
}

Status StripTensorPaddings(const c10::IValue& state, const std::string& where) {
  auto osd = Get(state, "optimizer_state_dict");
  if (!osd) return Status::OK();
  auto base = Get(*osd, "base_optimizer_state");
  if (!base) return Status::OK();
  auto group_states = Get(*base, "state");
  if (!group_states || !group_states->isGenericDict()) return Status::OK();
  auto paddings = Get(*osd, "group_paddings");
  if (!paddings || paddings->isNone()) return Status::OK();
  if (!paddings->isList()) {
    return Status::InvalidArgument(where + ": optimizer_state_dict.group_paddings is " +
                                   PyTypeName(*paddings) + ", expected a list of ints");
  }
  const auto pads = paddings->toListRef();
  for (const auto& g : group_states->toGenericDict()) {
    const auto gi = GroupIndex(g.key());
    if (!gi || *gi < 0 || *gi >= static_cast<int64_t>(pads.size()) || !pads[*gi].isInt()) {
      return Status::InvalidArgument(
          where + ": base_optimizer_state.state has group key " +
          (g.key().isString() ? g.key().toStringRef() : PyTypeName(g.key())) +
          " but group_paddings has " + std::to_string(pads.size()) + " int entries");
    }
    const int64_t pad = pads[*gi].toInt();
    if (pad == 0 || !g.value().isGenericDict()) continue;
    auto group_state = g.value().toGenericDict();
    std::vector<std::pair<c10::IValue, at::Tensor>> updates;
    for (const auto& s : group_state) {
      if (s.key().isString() && s.key().toStringRef() == "step") continue;
      if (!s.value().isTensor()) continue;
      const at::Tensor& t = s.value().toTensor();
      const int64_t raw = t.numel() - pad;
      if (t.dim() == 0 || raw < 0 || raw > t.size(0)) {
        return Status::InvalidArgument(where + ": state " + std::to_string(*gi) + "." +
                                       (s.key().isString() ? s.key().toStringRef() : "?") +
                                       " of shape " + c10::str(t.sizes()) +
                                       " cannot lose its padding of " + std::to_string(pad) +
                                       " elements (a flat partition of at least that length "
                                       "was expected)");
      }
      updates.emplace_back(s.key(), t.narrow(0, 0, raw).clone());
    }
    for (auto& [k, t] : updates) group_state.insert_or_assign(k, std::move(t));
  }
  return Status::OK();
}

Result<ZeROCheckpoint> ZeROCheckpoint::Open(const Store& store, const std::string& tag,
                                            std::optional<Model3dDesc> source, FileLoader loader) {
  ASSIGN_OR_RETURN(DeepSpeedFiles files, ListDeepSpeedFiles(store, tag));
  if (files.zero.empty()) {
    return Status::InvalidArgument("No ZeRO files found in tag '" + tag +
                                   "': expected [bf16_|fp16_]zero_pp_rank_D_mp_rank_XX_"
                                   "optim_states.pt files");
  }
  ZeROCheckpoint z;
  z.tag_ = tag;
  z.file_list_ = std::move(files.zero);
  if (source) {
    z.src_3d_ = *source;
  } else {
    ASSIGN_OR_RETURN(z.src_3d_, GetModel3dDescriptor(store, tag));
  }
  z.target_3d_ = z.src_3d_;
  ASSIGN_OR_RETURN(z.file_map_, z.src_3d_.Reshape(z.target_3d_));
  z.loader_ = loader ? std::move(loader) : StoreFileLoader(store, tag);
  return z;
}

Status ZeROCheckpoint::Reshape(const Model3dDesc& target) {
  ASSIGN_OR_RETURN(auto map, src_3d_.Reshape(target));
  target_3d_ = target;
  file_map_ = std::move(map);
  return Status::OK();
}

Result<std::vector<int>> ZeROCheckpoint::GetFileIndicesForRank(int pp, int tp, int dp) const {
  if (dp < 0 || dp >= static_cast<int>(file_map_.size())) {
    return Status::InvalidArgument("DP index " + std::to_string(dp) + " >= DP degree " +
                                   std::to_string(file_map_.size()) + " of the target layout " +
                                   target_3d_.Desc());
  }
  return file_map_[dp].GetData(pp, tp);
}

Result<std::vector<std::string>> ZeROCheckpoint::GetFilesForRank(int pp, int tp, int dp) const {
  ASSIGN_OR_RETURN(auto indices, GetFileIndicesForRank(pp, tp, dp));
  std::vector<std::string> out;
  out.reserve(indices.size());
  for (int i : indices) {
    if (i < 0 || i >= num_files()) {
      return Status::InvalidArgument("tag '" + tag_ + "': rank (pp " + std::to_string(pp) +
                                     ", tp " + std::to_string(tp) + ", dp " + std::to_string(dp) +
                                     ") needs zero file " + std::to_string(i) +
                                     " but the tag has " + std::to_string(num_files()) +
                                     " zero files for source layout " + src_3d_.Desc());
    }
    out.push_back(file_list_[i]);
  }
  return out;
}

Result<c10::IValue> ZeROCheckpoint::GetStateForRank(int pp, int tp, int dp,
                                                    const std::vector<std::string>& keys_to_ignore,
                                                    bool strip_tensor_paddings,
                                                    const MergeOptions& merge) const {
  ASSIGN_OR_RETURN(auto files, GetFilesForRank(pp, tp, dp));
  std::optional<c10::IValue> merged;
  for (const auto& file : files) {
    ASSIGN_OR_RETURN(c10::IValue sd, loader_(file));
    const std::string where = FileName(tag_, file);
    if (sd.isGenericDict()) {
      auto dict = sd.toGenericDict();
      for (const auto& key : keys_to_ignore) (void)dict.erase(c10::IValue(key));
    }
    if (strip_tensor_paddings) RETURN_IF_ERROR(StripTensorPaddings(sd, where));
    if (!merged) {
      merged = std::move(sd);
    } else {
      auto m = MergeState(*merged, sd, merge);
      if (!m.ok()) return m.status().WithContext("merging " + where + " into rank's state");
      merged = std::move(m).value();
    }
    // _update_partition_count / _clear_group_paddings. (ZeRO-3's int
    // partition_count is left alone; DeepSpeed's len() would fail on it.)
    auto osd = Get(*merged, "optimizer_state_dict");
    if (osd && osd->isGenericDict()) {
      auto osd_dict = osd->toGenericDict();
      auto counts = Get(*osd, "partition_count");
      if (NonEmptyList(counts)) {
        const auto n = counts->toListRef().size();
        osd_dict.insert_or_assign(c10::IValue("partition_count"),
                                  c10::List<int64_t>(std::vector<int64_t>(n, target_3d_.dp)));
      }
      auto paddings = Get(*osd, "group_paddings");
      if (strip_tensor_paddings && NonEmptyList(paddings)) {
        const auto n = paddings->toListRef().size();
        osd_dict.insert_or_assign(c10::IValue("group_paddings"),
                                  c10::List<int64_t>(std::vector<int64_t>(n, 0)));
      }
    }
  }
  if (!merged) return Status::InvalidArgument("rank has no zero files");
  return *merged;
}

}  // namespace ckptkv::checkpoint
