#include "checkpoint/query/placer.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "checkpoint/core/file_names.h"
#include "checkpoint/core/tag_layout.h"
#include "checkpoint/query/layout.h"
#include "checkpoint/core/zero_layout.h"
#include "engine/state_codec.h"
#include "checkpoint/query/tag_index.h"
#include "schema/records.h"
#include "store/names.h"

namespace ckptkv::checkpoint {

namespace {

using c10::IValue;

// torch.Size / tuple / list of ints.
std::optional<std::vector<int64_t>> ShapeOf(const IValue& v) {
  std::vector<int64_t> s;
  if (v.isIntList()) return v.toIntVector();
  if (v.isTuple()) {
    for (const IValue& e : v.toTupleRef().elements()) {
      if (!e.isInt()) return std::nullopt;
      s.push_back(e.toInt());
    }
    return s;
  }
  if (v.isList()) {
    for (const IValue& e : v.toListRef()) {
      if (!e.isInt()) return std::nullopt;
      s.push_back(e.toInt());
    }
    return s;
  }
  return std::nullopt;
}

std::vector<IValue> ListOf(const IValue* v) {
  std::vector<IValue> out;
  if (v == nullptr) return out;
  if (v->isList()) {
    for (const IValue& e : v->toListRef()) out.push_back(e);
  } else if (v->isTuple()) {
    for (const IValue& e : v->toTupleRef().elements()) out.push_back(e);
  }
  return out;
}

std::string Str(const std::vector<int64_t>& v) { return ShapeString(v); }

// A fragment_address saved as {"numel", "start"} or as (numel, start).
std::optional<std::pair<int64_t, int64_t>> FragmentAddress(const IValue& v) {
  if (v.isGenericDict()) {
    auto numel = DictInt(v, "numel");
    auto start = DictInt(v, "start");
    if (numel && start) return std::make_pair(*numel, *start);
    return std::nullopt;
  }
  std::vector<IValue> l = ListOf(&v);
  if (l.size() == 2 && l[0].isInt() && l[1].isInt()) {
    return std::make_pair(l[0].toInt(), l[1].toInt());
  }
  return std::nullopt;
}

ParamSpec SpecOf(const ShardingRules& rules, const std::string& name,
                 const std::vector<int64_t>& local_shape, int tp) {
  ParamSpec p;
  p.name = name;
  p.shard_dim = rules.DimFor(name);
  if (p.shard_dim >= static_cast<int>(local_shape.size())) p.shard_dim = -1;
  p.global_shape = local_shape;
  if (p.shard_dim >= 0) p.global_shape[p.shard_dim] *= tp;
  return p;
}

}  // namespace

DeepSpeedPlacer::DeepSpeedPlacer(ShardingRules rules) : rules_(std::move(rules)) {}

void DeepSpeedPlacer::PlaceAfterCommit(const std::string& tag) {
  if (std::find(unplaced_layers_.begin(), unplaced_layers_.end(), tag) == unplaced_layers_.end()) {
    unplaced_layers_.push_back(tag);
    if (unplaced_layers_.size() > kUnplacedTags) unplaced_layers_.pop_front();
  }
}

TensorPlacer::Placements DeepSpeedPlacer::Place(const std::string& tag, const std::string& file,
                                                const IValue& state) {
  Result<Placements> r = TryPlace(tag, file, state);
  if (r.ok()) return std::move(r).value();
  if (std::optional<FileCoordinates> c = ParseFileName(file); c && c->kind == FileKind::kLayer) {
    std::lock_guard<std::mutex> lock(mu_);
    PlaceAfterCommit(tag);
    spdlog::info("[ckptkv] {}/{}: saved without fragment placements for now ({})", tag, file,
                 r.status().ToString());
    return {};
  }
  spdlog::warn(
      "[ckptkv] {}/{}: saved without fragment placements ({}); reshape and universal export "
      "of tag {} will refuse it",
      tag, file, r.status().ToString(), tag);
  return {};
}

void DeepSpeedPlacer::EndTag(const std::string& tag) {
  std::lock_guard<std::mutex> lock(mu_);
  guessed_.erase(tag);
  auto it = tags_.find(tag);
  if (it == tags_.end()) return;
  if (!it->second.empty()) last_ = std::move(it->second);
  tags_.erase(it);
}

namespace {

int PlacementRank(const std::string& file) {
  std::optional<FileCoordinates> c = ParseFileName(file);
  if (!c) return 2;
  switch (c->kind) {
    case FileKind::kModelStates:
    case FileKind::kZeroModelStates:
      return 0;
    case FileKind::kLayer:
      return 1;
    case FileKind::kOptimStates:
      return 3;
    default:
      return 2;
  }
}

}  // namespace

bool PlacedBefore(const std::string& a, const std::string& b) {
  return PlacementRank(a) < PlacementRank(b);
}

Result<TensorPlacer::Placements> DeepSpeedPlacer::TryPlace(const std::string& tag,
                                                           const std::string& file,
                                                           const IValue& state) {
  std::optional<FileCoordinates> c = ParseFileName(file);
  if (!c || (c->mp_rank < 0 && c->kind != FileKind::kLayer)) return Placements{};
  const std::string where = FileName(tag, file);
  if (!state.isGenericDict()) {
    return Status::InvalidArgument(where + " is not a dict; DeepSpeed files are");
  }
  Result<Placements> r = Placements{};
  if (c->kind == FileKind::kLayer) {
    r = PlaceLayer(tag, c->layer, std::max(0, c->tp_rank), state);
  } else if (c->kind == FileKind::kModelStates || c->kind == FileKind::kZeroModelStates) {
    r = PlaceModel(tag, c->mp_rank, state);
  } else if (c->kind == FileKind::kOptimStates) {
    r = PlaceOptim(tag, c->mp_rank, c->dp_rank, state);
  }
  if (!r.ok()) return r.status().WithContext(where);
  return r;
}

Result<TensorPlacer::Placements> DeepSpeedPlacer::PlaceModel(const std::string& tag, int mp,
                                                             const IValue& state) {
  ModelInfo info;
  SavedDims saved;
  if (const IValue* dims = DictField(state, "checkpoint_parallel_dimensions");
      dims != nullptr && !dims->isNone()) {
    saved.has_parallel_dims = true;
    saved.pp_degree = DictInt(*dims, "pp_degree");
    saved.tp_degree = DictInt(*dims, "tp_degree");
  }
  saved.mp_world_size = DictInt(state, "mp_world_size");
  saved.dp_world_size = DictInt(state, "dp_world_size");
  ASSIGN_OR_RETURN(info.tp, SavedTpDegree(saved));
  const IValue* module = DictField(state, "module");
  if (!saved.has_parallel_dims && module != nullptr && module->isNone() && info.tp > 1) {
    // PipelineEngine's file (weights in layer files): mp_world_size is
    // pp * tp there. Megatron's args name tp; without them it is unknown.
    std::optional<int64_t> args_tp;
    if (const IValue* args = DictField(state, "args"); args != nullptr && args->isGenericDict()) {
      args_tp = DictInt(*args, "tensor_model_parallel_size");
    }
    if (!args_tp || *args_tp < 1 || info.tp % *args_tp != 0) {
      return Status::InvalidArgument(
          "a pipeline model-state file (module None) without checkpoint_parallel_dimensions: "
          "mp_world_size " +
          std::to_string(info.tp) + " is pp x tp, and tp is not recorded");
    }
    info.tp = static_cast<int>(*args_tp);
  }
  if (std::optional<int> dp = SavedDpDegree(saved)) info.dp = *dp;
  const int tp_rank = TpOfMp(mp, info.tp);
  std::map<std::string, std::vector<int64_t>> shapes;
  if (const IValue* ps = DictField(state, "param_shapes"); ps != nullptr && !ps->isNone()) {
    std::vector<IValue> groups = ListOf(ps);
    if (groups.empty() && ps->isGenericDict()) groups.push_back(*ps);
    for (size_t g = 0; g < groups.size(); ++g) {
      if (!groups[g].isGenericDict()) {
        return Status::InvalidArgument("param_shapes[" + std::to_string(g) +
                                       "] is not a dict of parameter name -> shape");
      }
      auto& group = info.groups.emplace_back();
      for (const auto& kv : groups[g].toGenericDict()) {
        auto shape = ShapeOf(kv.value());
        if (!kv.key().isString() || !shape) {
          return Status::InvalidArgument("param_shapes[" + std::to_string(g) +
                                         "] has an entry that is not name -> list of ints");
        }
        group.emplace_back(kv.key().toStringRef(), *shape);
        shapes[kv.key().toStringRef()] = *shape;
      }
    }
  }
  Placements out;
  // Module tensors, nested dicts joined with '.', as named_parameters does.
  std::vector<std::pair<std::string, IValue>> todo;
  if (module != nullptr && module->isGenericDict()) todo.emplace_back("", *module);
  while (!todo.empty()) {
    auto [prefix, v] = std::move(todo.back());
    todo.pop_back();
    for (const auto& kv : v.toGenericDict()) {
      if (!kv.key().isString()) continue;
      const std::string name = prefix + kv.key().toStringRef();
      const IValue& x = kv.value();
      if (x.isGenericDict()) {
        todo.emplace_back(name + ".", x);
        continue;
      }
      if (!x.isTensor()) continue;
      const at::Tensor& t = x.toTensor();
      std::vector<int64_t> local = t.sizes().vec();
      std::string what = "param";
      auto it = shapes.find(name);
      if (it == shapes.end()) {
        if (!shapes.empty()) continue;  // a buffer or frozen parameter: not sharded by ZeRO
      } else if (it->second != local) {
        if (t.numel() != 0) {
          return Status::InvalidArgument("module tensor " + name + " has shape " + Str(local) +
                                         " but param_shapes says " + Str(it->second));
        }
        what = "placeholder";  // ZeRO-3 saves partitioned parameters empty
        local = it->second;
      }
      out[t.unsafeGetTensorImpl()] =
          ShardPlacement(SpecOf(rules_, name, local, info.tp), tp_rank, info.tp, what);
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  // Layer files of this tag placed from the last tag's layout must agree
  // with this one's; they cannot be re-placed now: the tag is placed again
  // after its commit (FinishTag).
  for (const auto& [name, shape_tp] : guessed_[tag]) {
    auto it = shapes.find(name);
    if (it == shapes.end()) continue;
    if (it->second != shape_tp.first || info.tp != shape_tp.second) {
      spdlog::warn(
          "[ckptkv] {}: layer files were placed from the last tag's layout (tp {}), which {} "
          "contradicts for {} (tp {}); tag {} is placed again after its commit",
          tag, shape_tp.second, ModelFileName(mp), name, info.tp, tag);
      PlaceAfterCommit(tag);
      break;
    }
  }
  tags_[tag][mp] = std::move(info);
  return out;
}

Result<TensorPlacer::Placements> DeepSpeedPlacer::PlaceOptim(const std::string& tag, int mp,
                                                             int dp_rank, const IValue& state) {
  ModelInfo info;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto t = tags_.find(tag);
    auto m = t == tags_.end() ? decltype(t->second)::iterator{} : t->second.find(mp);
    if (t == tags_.end() || m == t->second.end()) {
      return Status::InvalidArgument("the model-state file of mp rank " + std::to_string(mp) +
                                     " was not saved before it in this tag; save " +
                                     ModelFileName(mp) + " first, as DeepSpeed does");
    }
    info = m->second;
  }
  if (info.groups.empty()) {
    return Status::InvalidArgument(ModelFileName(mp) +
                                   " has no param_shapes, which lay out the flat buffers");
  }
  const IValue* osd = DictField(state, "optimizer_state_dict");
  if (osd == nullptr || !osd->isGenericDict()) {
    return Status::InvalidArgument("no optimizer_state_dict dict");
  }
  const bool z3 = DictField(*osd, "fp32_flat_groups") != nullptr;
  const int stage = z3 ? 3 : static_cast<int>(DictInt(*osd, "zero_stage").value_or(2));
  if (stage < 1 || stage > 3) {
    return Status::InvalidArgument("zero_stage " + std::to_string(stage) + " is not 1, 2 or 3");
  }
  const IValue* inner = DictField(*osd, z3 ? "optimizer_state_dict" : "base_optimizer_state");
  std::vector<IValue> flats =
      ListOf(DictField(*osd, z3 ? "fp32_flat_groups" : "single_partition_of_fp32_groups"));
  std::vector<IValue> paddings = ListOf(DictField(*osd, "group_paddings"));
  std::vector<IValue> mappings = ListOf(DictField(*osd, "param_slice_mappings"));
  const IValue* counts = DictField(*osd, "partition_count");
  const IValue* moments = inner ? DictField(*inner, "state") : nullptr;
  if (flats.size() != info.groups.size()) {
    return Status::InvalidArgument(std::to_string(flats.size()) +
                                   " flat fp32 groups but the model file's param_shapes has " +
                                   std::to_string(info.groups.size()) + " groups");
  }
  const int tp_rank = TpOfMp(mp, info.tp);
  Placements out;
  for (size_t g = 0; g < flats.size(); ++g) {
    const std::string gs = "group " + std::to_string(g);
    int dp = info.dp;
    if (counts && counts->isInt()) dp = static_cast<int>(counts->toInt());
    if (std::vector<IValue> c = ListOf(counts); g < c.size() && c[g].isInt()) {
      dp = static_cast<int>(c[g].toInt());
    }
    if (dp_rank >= dp) {
      return Status::InvalidArgument("dp rank " + std::to_string(dp_rank) +
                                     " is outside partition_count " + std::to_string(dp));
    }
    std::vector<std::string> names;
    std::vector<int64_t> numels;
    for (const auto& [name, shape] : info.groups[g]) {
      names.push_back(name);
      numels.push_back(Numel(shape));
    }
    const FlatLayout fl = z3 ? Zero3Layout(numels, dp) : Zero12Layout(numels, dp);
    const int64_t P = fl.partition_size;
    const int64_t pad = fl.paddings[dp_rank];
    if (!flats[g].isTensor()) return Status::InvalidArgument(gs + ": fp32 partition is no tensor");
    const at::Tensor& fp32 = flats[g].toTensor();
    const int64_t want = z3 ? P : P - pad;
    if (fp32.numel() != want) {
      return Status::InvalidArgument(gs + ": fp32 partition has " + std::to_string(fp32.numel()) +
                                     " elements; the ZeRO-" + std::to_string(stage) +
                                     " layout of param_shapes at dp " + std::to_string(dp) +
                                     " gives " + std::to_string(want));
    }
    if (!z3) {
      if (g >= paddings.size() || !paddings[g].isInt() || paddings[g].toInt() != pad) {
        return Status::InvalidArgument(gs + ": group_paddings disagrees with the layout (" +
                                       std::to_string(pad) + " expected)");
      }
      if (g >= mappings.size() || !mappings[g].isGenericDict()) {
        return Status::InvalidArgument(gs + ": no param_slice_mappings dict");
      }
      const auto m = mappings[g].toGenericDict();
      if (m.size() != fl.pieces[dp_rank].size()) {
        return Status::InvalidArgument(gs + ": param_slice_mappings names " +
                                       std::to_string(m.size()) + " parameters, the layout " +
                                       std::to_string(fl.pieces[dp_rank].size()));
      }
      for (const FlatPiece& pc : fl.pieces[dp_rank]) {
        auto it = m.find(names[pc.param]);
        auto fa = it == m.end() ? std::nullopt : FragmentAddress(it->value());
        if (!fa || fa->first != pc.numel || fa->second != pc.start) {
          return Status::InvalidArgument(gs + ": param_slice_mappings of " + names[pc.param] +
                                         " disagrees with the layout (expected numel " +
                                         std::to_string(pc.numel) + ", start " +
                                         std::to_string(pc.start) + ")");
        }
      }
    }
    out[fp32.unsafeGetTensorImpl()] = FlatPlacement(names, fl, static_cast<int>(g), dp_rank,
                                                    tp_rank, info.tp, stage, "fp32", fp32.numel());
    // Adam moments (every tensor state of the group but the step).
    const IValue* gstate = nullptr;
    if (moments != nullptr && moments->isGenericDict()) {
      for (const auto& kv : moments->toGenericDict()) {
        if (kv.key().isInt() && kv.key().toInt() == static_cast<int64_t>(g)) gstate = &kv.value();
      }
    }
    if (gstate == nullptr || !gstate->isGenericDict()) continue;
    for (const auto& kv : gstate->toGenericDict()) {
      if (!kv.key().isString() || !kv.value().isTensor() || kv.key().toStringRef() == "step") {
        continue;
      }
      const at::Tensor& t = kv.value().toTensor();
      if (t.numel() != P) {
        return Status::InvalidArgument(gs + ": optimizer state " + kv.key().toStringRef() +
                                       " has " + std::to_string(t.numel()) +
                                       " elements, the partition " + std::to_string(P));
      }
      out[t.unsafeGetTensorImpl()] =
          FlatPlacement(names, fl, static_cast<int>(g), dp_rank, tp_rank, info.tp, stage,
                        kv.key().toStringRef(), t.numel());
    }
  }
  return out;
}

Result<TensorPlacer::Placements> DeepSpeedPlacer::PlaceLayer(const std::string& tag, int layer,
                                                             int tp_rank, const IValue& state) {
  // The layer's tensors, by key (a layer's state dict is flat; nested
  // dicts are joined with '.' as named_parameters does).
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  std::vector<std::pair<std::string, IValue>> todo{{"", state}};
  while (!todo.empty()) {
    auto [prefix, v] = std::move(todo.back());
    todo.pop_back();
    for (const auto& kv : v.toGenericDict()) {
      if (!kv.key().isString()) continue;
      const std::string key = prefix + kv.key().toStringRef();
      if (kv.value().isGenericDict()) {
        todo.emplace_back(key + ".", kv.value());
      } else if (kv.value().isTensor()) {
        tensors.emplace_back(key, kv.value().toTensor());
      }
    }
  }
  if (tensors.empty()) return Placements{};
  // (from the last tag, model infos by mp rank): this tag's first.
  std::vector<std::pair<bool, std::map<int, ModelInfo>>> sources;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto t = tags_.find(tag); t != tags_.end() && !t->second.empty()) {
      sources.emplace_back(false, t->second);
    }
    if (!last_.empty()) sources.emplace_back(true, last_);
  }
  const std::string index = std::to_string(layer) + ".";
  for (const auto& [from_last, infos] : sources) {
    for (const auto& [mp, info] : infos) {
      // Every TP rank of a stage has the same names and local shapes: any
      // model file of the stage will do; the TP rank is the file's.
      if (tp_rank >= info.tp) continue;
      // This stage's parameter names and local shapes, and its tied ones.
      std::map<std::string, const std::vector<int64_t>*> shapes;
      std::vector<std::string> tied;
      for (const auto& group : info.groups) {
        for (const auto& [name, shape] : group) {
          shapes[name] = &shape;
          if (name.rfind("tied_modules.", 0) == 0) tied.push_back(name);
        }
      }
      // Each key to its parameter: `<layer>.<key>`, or the one tied
      // parameter `tied_modules.<m>.<key>`.
      std::vector<std::pair<const at::Tensor*, std::string>> named;
      for (const auto& [key, t] : tensors) {
        std::string name;
        if (shapes.count(index + key)) {
          name = index + key;
        } else {
          int found = 0;
          for (const std::string& n : tied) {
            const size_t dot = n.find('.', 13);
            if (dot != std::string::npos && n.compare(dot + 1, std::string::npos, key) == 0) {
              name = n;
              found++;
            }
          }
          if (found != 1) name.clear();
        }
        if (!name.empty()) named.emplace_back(&t, name);
      }
      if (named.empty()) continue;  // another stage's model file
      Placements out;
      for (const auto& [t, name] : named) {
        std::vector<int64_t> local = t->sizes().vec();
        if (local != *shapes[name]) {
          return Status::InvalidArgument("layer tensor for " + name + " has shape " + Str(local) +
                                         " but param_shapes of " + ModelFileName(mp) + " says " +
                                         Str(*shapes[name]));
        }
        out[t->unsafeGetTensorImpl()] =
            ShardPlacement(SpecOf(rules_, name, local, info.tp), tp_rank, info.tp, "param");
      }
      if (from_last) {
        std::lock_guard<std::mutex> lock(mu_);
        for (const auto& [t, name] : named) guessed_[tag][name] = {t->sizes().vec(), info.tp};
      }
      return out;
    }
  }
  return Status::InvalidArgument(
      "no model-state file with TP rank " + std::to_string(tp_rank) +
      " saved before it (in this tag or the last one) names a parameter of layer " +
      std::to_string(layer) + " (" + index + tensors.front().first + " or tied_modules.<module>." +
      tensors.front().first +
      " in param_shapes); DeepSpeed saves layer files before their mp_rank file, so "
      "place the tag after its commit (ckptkv place)");
}

Result<std::optional<PlaceTagReport>> DeepSpeedPlacer::FinishTag(Store& store,
                                                                 const std::string& tag) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = std::find(unplaced_layers_.begin(), unplaced_layers_.end(), tag);
    if (it == unplaced_layers_.end()) return std::optional<PlaceTagReport>();
    unplaced_layers_.erase(it);
  }
  ASSIGN_OR_RETURN(PlaceTagReport report, PlaceTag(store, tag, "", *this));
  if (!report.unplaced_files.empty()) {
    spdlog::warn("[ckptkv] {}: {} files still without fragment placements after the commit", tag,
                 report.unplaced_files.size());
  }
  return std::optional<PlaceTagReport>(std::move(report));
}

Status DeepSpeedPlacer::AfterCommit(Store& store, const std::string& tag) {
  return FinishTag(store, tag).status();
}

Result<PlaceTagReport> PlaceTag(Store& store, const std::string& tag, const std::string& out_tag,
                                DeepSpeedPlacer& placer) {
  PlaceTagReport report;
  report.out_tag = out_tag.empty() ? tag : out_tag;
  ASSIGN_OR_RETURN(TagInfo info, store.GetTag(tag));
  ASSIGN_OR_RETURN(std::optional<std::string> latest, store.Latest());
  std::vector<std::string> files = info.files;
  // Model-state files first: layer and optimizer files are placed from them.
  std::stable_sort(files.begin(), files.end(), PlacedBefore);
  const std::string work = "\x01place:" + tag;  // the placer's cache key for this pass
  if (store.IsPending(report.out_tag)) {
    return Status::FailedPrecondition("tag '" + report.out_tag +
                                      "' has saves pending; place it after its commit");
  }
  RETURN_IF_ERROR(store.BeginTag(report.out_tag, /*overwrite=*/true));
  auto staged = [&]() -> Status {
    for (const std::string& file : files) {
      const std::string where = FileName(tag, file);
      ASSIGN_OR_RETURN(std::string tree_bytes, store.GetFileTree(tag, file));
      const fb::StateTree* tree = VerifiedStateTree(tree_bytes);
      if (tree == nullptr) return Status::Corruption(where + ": state tree fails verification");
      // Tensors as meta-device stand-ins: shapes and types, no bytes. Each
      // record is read once, here, and kept for the link below.
      struct Loaded {
        TensorRecordRef rec;
        const c10::TensorImpl* impl = nullptr;
      };
      std::map<std::string, Loaded> loaded;
      TensorLoader loader = [&](const std::string& param,
                                const std::string&) -> Result<at::Tensor> {
        ASSIGN_OR_RETURN(TensorRecordRef rec, store.GetTensorRecord(tag, file, param));
        std::vector<int64_t> shape;
        if (rec->shape()) shape.assign(rec->shape()->begin(), rec->shape()->end());
        at::Tensor t = Placeholder(shape, ToScalarType(rec->dtype()));
        loaded[param] = Loaded{std::move(rec), t.unsafeGetTensorImpl()};
        return t;
      };
      ASSIGN_OR_RETURN(c10::IValue state, DecodeState(*tree, loader, where));
      Result<TensorPlacer::Placements> placed = placer.TryPlace(work, file, state);
      if (!placed.ok()) report.unplaced_files.emplace_back(file, placed.status().ToString());
      ASSIGN_OR_RETURN(std::vector<std::string> params, store.ListParams(tag, file));
      for (const std::string& param : params) {
        auto l = loaded.find(param);
        if (l == loaded.end()) {  // a record the tree does not name
          ASSIGN_OR_RETURN(TensorRecordRef rec, store.GetTensorRecord(tag, file, param));
          l = loaded.emplace(param, Loaded{std::move(rec), nullptr}).first;
        }
        const fb::TensorRecord& rec = *l->second.rec.get();
        std::optional<Placement> pl;
        if (rec.placement() != nullptr) pl = PlacementOf(*rec.placement());
        if (placed.ok()) {
          auto it = placed->find(l->second.impl);
          if (it != placed->end()) {
            pl = it->second;
            report.placed_tensors++;
          }
        }
        RETURN_IF_ERROR(store.LinkTensor(report.out_tag, file, param, rec, pl).status());
        report.tensors++;
      }
      RETURN_IF_ERROR(store.PutFile(report.out_tag, file, std::move(tree_bytes)));
      report.files++;
    }
    CommitOptions co;
    co.overwrite = true;
    co.layout = info.layout;
    if (report.out_tag == tag) {
      // In place: `latest` is left where it is (a commit since the read
      // above may have moved it on), the record keeps its history.
      co.set_latest = false;
      co.restates = info;
    } else {
      co.set_latest = latest && *latest == tag;
    }
    return store.CommitTag(report.out_tag, co).status();
  }();
  placer.EndTag(work);
  if (!staged.ok()) {
    store.AbortTag(report.out_tag);
    return staged.WithContext("placing tag " + tag);
  }
  return report;
}

}  // namespace ckptkv::checkpoint
