#include "checkpoint/core/tag_layout.h"

#include <algorithm>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <tuple>

#include "checkpoint/core/file_names.h"
#include "checkpoint/core/state_view.h"
#include "store/names.h"
#include "store/store.h"

namespace ckptkv::checkpoint {
namespace {

std::string Join(const std::vector<std::string>& v, size_t max = 8) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < max; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > max) s += ", ... (" + std::to_string(v.size()) + " files)";
  return s.empty() ? "none" : s;
}

struct PpTp {
  int pp = 0;
  int tp = 0;
};

// How an inconsistency is reported: DeepSpeed's descriptor calls the tag a
// wrong argument (InvalidArgument); the queries, reading a tag this store
// committed, call it damaged (Corruption). A tag without any DeepSpeed model
// file is InvalidArgument under both.
enum class Rule { kDeepSpeed, kStored };

// Reads the model files of one tag, once each, and reports by `rule`.
class ModelFiles {
 public:
  ModelFiles(const Store& store, const std::string& tag, Rule rule)
      : store_(store), tag_(tag), rule_(rule) {}

  Status Bad(std::string msg) const {
    return rule_ == Rule::kDeepSpeed ? Status::InvalidArgument(std::move(msg))
                                     : Status::Corruption(std::move(msg));
  }
  // What `file` records; read at most once.
  Result<const SavedDims*> Saved(const std::string& file) {
    auto it = saved_.find(file);
    if (it == saved_.end()) {
      ASSIGN_OR_RETURN(SavedDims d, ReadSavedDims(store_, tag_, file));
      it = saved_.emplace(file, d).first;
    }
    return &it->second;
  }
  // checkpoint_parallel_dimensions of one model file: nullopt when absent.
  Result<std::optional<PpTp>> Dims(const std::string& file) {
    ASSIGN_OR_RETURN(const SavedDims* saved, Saved(file));
    auto dims = ParallelDims(*saved);
    if (!dims.ok()) return Bad(FileName(tag_, file) + ": " + dims.status().message());
    if (!dims->has_value()) return std::optional<PpTp>();
    return std::optional<PpTp>(PpTp{(*dims)->first, (*dims)->second});
  }
  // The agreed dims of `files`, nullopt when none has them; an error when
  // only some have them or they disagree.
  Result<std::optional<PpTp>> Agreed(const std::vector<std::string>& files) {
    std::optional<PpTp> agreed;
    std::string agreed_file;
    std::vector<std::string> without;
    for (const auto& f : files) {
      ASSIGN_OR_RETURN(auto dims, Dims(f));
      if (!dims) {
        without.push_back(f);
        continue;
      }
      if (!agreed) {
        agreed = dims;
        agreed_file = f;
      } else if (dims->pp != agreed->pp || dims->tp != agreed->tp) {
        std::string msg = "tag '" + tag_ + "': ";
        msg += f;
        msg += " has checkpoint_parallel_dimensions (pp " + std::to_string(dims->pp) + ", tp " +
               std::to_string(dims->tp) + ") but ";
        msg += agreed_file;
        msg += " has (pp " + std::to_string(agreed->pp) + ", tp " + std::to_string(agreed->tp) +
               "); every model file must agree";
        return Bad(msg);
      }
    }
    if (agreed && !without.empty()) {
      return Bad("tag '" + tag_ + "': " + agreed_file + " has checkpoint_parallel_dimensions but " +
                 Join(without) + " do not; every model file must have it, or none");
    }
    return agreed;
  }

 private:
  const Store& store_;
  const std::string& tag_;
  const Rule rule_;
  std::map<std::string, SavedDims> saved_;
};

}  // namespace

std::vector<std::string> GetFilesWithPrefix(const std::vector<std::string>& files,
                                            const std::string& prefix) {
  std::vector<std::string> out;
  for (const auto& f : files) {
    if (StartsWith(Basename(f), prefix)) out.push_back(f);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> GetZeroFiles(const std::vector<std::string>& files) {
  for (const char* prefix : {"zero_pp_rank_", "fp16_zero_pp_rank_", "bf16_zero_pp_rank_"}) {
    std::vector<std::tuple<int, int, std::string>> ranked;
    for (const auto& f : GetFilesWithPrefix(files, prefix)) {
      auto c = ParseFileName(f);
      if (!c || c->kind != FileKind::kOptimStates) continue;
      ranked.emplace_back(c->dp_rank, c->mp_rank, f);
    }
    if (ranked.empty()) continue;
    std::sort(ranked.begin(), ranked.end());
    std::vector<std::string> out;
    out.reserve(ranked.size());
    for (auto& r : ranked) out.push_back(std::move(std::get<2>(r)));
    return out;
  }
  return {};
}

DeepSpeedFiles ClassifyFiles(const std::vector<std::string>& files) {
  DeepSpeedFiles out;
  out.all = files;
  for (const auto& f : GetFilesWithPrefix(files, "mp_rank_")) {
    auto c = ParseFileName(f);
    if (c && c->kind == FileKind::kModelStates) out.model.push_back(f);
  }
  std::vector<std::tuple<int, int, std::string>> zm;
  for (const auto& f : files) {
    auto c = ParseFileName(f);
    if (c && c->kind == FileKind::kZeroModelStates) zm.emplace_back(c->dp_rank, c->mp_rank, f);
  }
  std::sort(zm.begin(), zm.end());
  for (auto& z : zm) out.zero_model.push_back(std::move(std::get<2>(z)));
  out.zero = GetZeroFiles(files);
  out.layer = GetFilesWithPrefix(files, "layer_");
  for (const auto& f : files) {
    if (f == "zero/optimizer_state.pt") out.universal_optim = f;
    if (f.find('/') != std::string::npos) continue;
    auto c = ParseFileName(f);
    if (!c) continue;
    if (c->kind == FileKind::kModelStates ||
        (c->kind == FileKind::kZeroModelStates && c->dp_rank == 0)) {
      out.model_by_mp[c->mp_rank] = f;
    }
    if (c->kind == FileKind::kModelStates || c->kind == FileKind::kZeroModelStates) {
      out.all_model.push_back(f);
    }
  }
  for (const auto& f : out.zero) {
    if (f.find('/') != std::string::npos) continue;
    auto c = ParseFileName(f);
    out.optim_by_rank[{c->dp_rank, c->mp_rank}] = f;
  }
  return out;
}

Result<SavedDims> ReadSavedDims(const Store& store, const std::string& tag,
                                const std::string& file) {
  ASSIGN_OR_RETURN(StoredState state, StoredState::Read(store, tag, file));
  SavedDims d;
  const fb::Node* dims = state.Find({"checkpoint_parallel_dimensions"});
  d.has_parallel_dims = !IsNone(dims);
  if (d.has_parallel_dims) {
    d.pp_degree = AsInt(Child(dims, "pp_degree"));
    d.tp_degree = AsInt(Child(dims, "tp_degree"));
  }
  d.mp_world_size = AsInt(state.Find({"mp_world_size"}));
  d.dp_world_size = AsInt(state.Find({"dp_world_size"}));
  return d;
}

Result<std::optional<std::pair<int, int>>> ParallelDims(const SavedDims& d) {
  if (!d.has_parallel_dims) return std::optional<std::pair<int, int>>();
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  if (!d.pp_degree || !d.tp_degree || *d.pp_degree < 1 || *d.tp_degree < 1 || *d.pp_degree > kMax ||
      *d.tp_degree > kMax) {
    return Status::InvalidArgument(
        "checkpoint_parallel_dimensions must be {pp_degree: int >= 1, tp_degree: int >= 1}");
  }
  return std::optional<std::pair<int, int>>(
      std::make_pair(static_cast<int>(*d.pp_degree), static_cast<int>(*d.tp_degree)));
}

Result<int> SavedTpDegree(const SavedDims& d) {
  ASSIGN_OR_RETURN(auto dims, ParallelDims(d));
  if (dims) return dims->second;
  if (d.mp_world_size && *d.mp_world_size >= 1 &&
      *d.mp_world_size <= std::numeric_limits<int>::max()) {
    return static_cast<int>(*d.mp_world_size);
  }
  return 1;
}

std::optional<int> SavedDpDegree(const SavedDims& d) {
  if (!d.dp_world_size || *d.dp_world_size < 1 ||
      *d.dp_world_size > std::numeric_limits<int>::max()) {
    return std::nullopt;
  }
  return static_cast<int>(*d.dp_world_size);
}

Result<DeepSpeedFiles> ListDeepSpeedFiles(const Store& store, const std::string& tag) {
  ASSIGN_OR_RETURN(auto files, store.ListFiles(tag));
  return ClassifyFiles(files);
}

namespace {

// get_model_3d_descriptor over the classified `files` of a tag, its model
// files read through `reader`. Under Rule::kDeepSpeed a ZeRO file count that
// is not a multiple of pp * tp is an error; under kStored (the queries, which
// take dp from what the files record and prove exact cover themselves) it
// is not. Degrees are multiplied in 64 bits: a file may record any int.
Result<Model3dDesc> Model3dDescriptorOf(ModelFiles& reader, const std::string& tag,
                                        const DeepSpeedFiles& files, Rule rule) {
  const bool check_zero_count = rule == Rule::kDeepSpeed;
  const int num_zero = static_cast<int>(files.zero.size());
  Model3dDesc d;
  if (files.model.empty() && !files.zero_model.empty()) {
    // ZeRO-3: one model file per (dp, mp) rank instead of mp_rank_* files.
    std::set<int> mp_ranks;
    for (const auto& f : files.zero_model) mp_ranks.insert(ParseFileName(f)->mp_rank);
    ASSIGN_OR_RETURN(auto dims, reader.Agreed(files.zero_model));
    const int num_mp = static_cast<int>(mp_ranks.size());
    if (dims) {
      if (int64_t{dims->pp} * dims->tp != num_mp) {
        return reader.Bad("tag '" + tag + "': checkpoint_parallel_dimensions say pp " +
                          std::to_string(dims->pp) + " x tp " + std::to_string(dims->tp) +
                          " but the ZeRO-3 " + "model files name " + std::to_string(num_mp) +
                          " MP ranks: " + Join(files.zero_model));
      }
      d.pp = dims->pp;
      d.tp = dims->tp;
    } else {
      d.pp = 1;
      d.tp = num_mp;
    }
    const int count = num_zero > 0 ? num_zero : static_cast<int>(files.zero_model.size());
    if (check_zero_count && count % (d.pp * d.tp) != 0) {
      return reader.Bad(
          "tag '" + tag + "': " + std::to_string(count) +
          " ZeRO-3 files are not a multiple of pp*tp = " + std::to_string(d.pp * d.tp));
    }
    d.dp = std::max(1, count / (d.pp * d.tp));
    return d;
  }
  if (files.model.empty()) {
    return Status::InvalidArgument("tag '" + tag +
                                   "' is not a DeepSpeed checkpoint: it has no "
                                   "mp_rank_*_model_states.pt (or ZeRO-3 model) files; files: " +
                                   Join(files.all));
  }
  const int num_mp = static_cast<int>(files.model.size());
  ASSIGN_OR_RETURN(auto dims, reader.Agreed(files.model));
  if (dims) {
    const int64_t mp = int64_t{dims->pp} * dims->tp;
    if (num_mp != mp) {
      return reader.Bad("tag '" + tag + "': checkpoint_parallel_dimensions say pp " +
                        std::to_string(dims->pp) + " x tp " + std::to_string(dims->tp) + " = " +
                        std::to_string(mp) + " model files, but the tag has " +
                        std::to_string(num_mp) + ": " + Join(files.model));
    }
    if (check_zero_count && num_zero % mp != 0) {
      return reader.Bad("tag '" + tag + "': " + std::to_string(num_zero) +
                        " ZeRO files are not a multiple of pp*tp = " + std::to_string(mp) + ": " +
                        Join(files.zero));
    }
    d.pp = dims->pp;
    d.tp = dims->tp;
  } else {
    // Legacy heuristic (Megatron: layer_01 is the embedding, one per TP rank).
    const int num_layer01 = static_cast<int>(GetFilesWithPrefix(files.all, "layer_01").size());
    if (num_layer01 > 0) {
      d.tp = num_layer01;
      d.pp = num_mp / d.tp;
      if (d.pp < 1) {
        return reader.Bad("tag '" + tag + "': " + std::to_string(num_layer01) +
                          " layer_01 files but only " + std::to_string(num_mp) +
                          " model files; expected a multiple of " + std::to_string(num_layer01));
      }
    } else {
      d.tp = num_mp;
      d.pp = 1;
    }
  }
  d.dp = std::max(1, num_zero / (d.pp * d.tp));
  return d;
}

}  // namespace

Result<Model3dDesc> GetModel3dDescriptor(const Store& store, const std::string& tag) {
  ASSIGN_OR_RETURN(DeepSpeedFiles files, ListDeepSpeedFiles(store, tag));
  ModelFiles reader(store, tag, Rule::kDeepSpeed);
  return Model3dDescriptorOf(reader, tag, files, Rule::kDeepSpeed);
}

Result<TagLayout> DiscoverTagLayout(const Store& store, const std::string& tag) {
  TagLayout t;
  ASSIGN_OR_RETURN(t.files, ListDeepSpeedFiles(store, tag));
  ModelFiles reader(store, tag, Rule::kStored);
  ASSIGN_OR_RETURN(t.degrees, Model3dDescriptorOf(reader, tag, t.files, Rule::kStored));
  t.universal = !t.files.universal_optim.empty();
  if (!t.files.model_by_mp.empty()) {
    // Read already: it is one of the model files the descriptor agreed on.
    ASSIGN_OR_RETURN(const SavedDims* d, reader.Saved(t.files.model_by_mp.begin()->second));
    if (std::optional<int> dp = SavedDpDegree(*d)) t.degrees.dp = *dp;
  }
  return t;
}

}  // namespace ckptkv::checkpoint
