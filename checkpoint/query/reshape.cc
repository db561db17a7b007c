#include "checkpoint/query/reshape.h"

#include <ATen/ATen.h>

#include <chrono>
#include <functional>
#include <set>

#include "checkpoint/core/file_names.h"
#include "engine/state_codec.h"
#include "schema/records.h"
#include "store/names.h"

namespace ckptkv::checkpoint {

namespace {

using c10::IValue;
using GenericDict = c10::impl::GenericDict;

GenericDict StrDict() { return GenericDict(c10::StringType::get(), c10::AnyType::get()); }

double Seconds(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Answers "param" with the master weights, as DeepSpeed's universal load
// sets the training weights from them. Elements outside every fragment of
// a parameter (the vocabulary padding a universal tensor crops) are left
// as they are: zero in a filled placement.
class UniversalSource : public FragmentSource {
 public:
  UniversalSource(const TagIndex& index, FragmentSource& inner) : index_(index), inner_(inner) {}
  Status Fill(const std::string& param, const std::string& state, const Rect& rect,
              at::Tensor out) override {
    const std::string s = state == "param" ? "fp32" : state;
    std::optional<Rect> bounds = index_.Bounds(param, s);
    if (!bounds || bounds->shape.size() != rect.shape.size() ||
        rect.offsets.size() != rect.shape.size()) {
      return inner_.Fill(param, s, rect, out);
    }
    const Rect part = Intersect(rect, *bounds);
    if (part.empty()) return Status::OK();
    at::Tensor dst = out;
    for (size_t d = 0; d < part.shape.size(); ++d) {
      dst = dst.narrow(static_cast<int64_t>(d), part.offsets[d] - rect.offsets[d], part.shape[d]);
    }
    return inner_.Fill(param, s, part, dst);
  }
  void Prefer(int tp_rank, int tp_degree) override { inner_.Prefer(tp_rank, tp_degree); }

 private:
  const TagIndex& index_;
  FragmentSource& inner_;
};

// Records the reads a fill would make, without reading.
class PlanningSource : public FragmentSource {
 public:
  explicit PlanningSource(TagIndex& index) : index_(index) {}
  void Prefer(int tp_rank, int tp_degree) override { index_.Prefer(tp_rank, tp_degree); }
  Status Fill(const std::string& param, const std::string& state, const Rect& rect,
              at::Tensor) override {
    ASSIGN_OR_RETURN(std::vector<ReadStep> s, index_.Plan(param, state, rect));
    steps.insert(steps.end(), s.begin(), s.end());
    return Status::OK();
  }
  std::vector<ReadStep> steps;

 private:
  TagIndex& index_;
};

// Plans every placed tensor of `files` from `index` (through
// UniversalSource when `universal`), and shows each to `visit` with the
// stored tensor a writer links instead (nullptr if none) and the reads that
// fill it. The first tensor that cannot be planned (fragments that do not
// cover it exactly once) ends it with that error.
using PlanVisitor = std::function<Status(const PlannedFile& file, const StoredTensor* linked,
                                         const std::vector<ReadStep>& steps)>;
Status PlanTensors(TagIndex& index, const ModelSpec& spec, const std::vector<PlannedFile>& files,
                   bool universal, const PlanVisitor& visit) {
  for (const PlannedFile& f : files) {
    for (const auto& [impl, pl] : f.placements) {
      const c10::ScalarType type = c10::typeMetaToScalarType(impl->dtype());
      ASSIGN_OR_RETURN(fb::DType dtype, ToDType(type, f.name));
      // WriteTag links what its source has verbatim; UniversalSource has nothing.
      if (const StoredTensor* same = universal ? nullptr : index.ExactStored(pl, dtype)) {
        RETURN_IF_ERROR(visit(f, same, {}));
        continue;
      }
      PlanningSource ps(index);
      UniversalSource us(index, ps);
      at::Tensor meta =
          Placeholder(std::vector<int64_t>(impl->sizes().begin(), impl->sizes().end()), type);
      RETURN_IF_ERROR(
          FillFromPlacement(spec, pl, universal ? static_cast<FragmentSource&>(us) : ps, meta)
              .WithContext(f.name));
      RETURN_IF_ERROR(visit(f, nullptr, ps.steps));
    }
  }
  return Status::OK();
}

// Plans every tensor first, so that a source that cannot fill them fails
// before a block is written, then writes the tag.
Result<ReshapeReport> WritePlanned(Store& store, TagIndex& index, const SourceInfo& info,
                                   const std::vector<PlannedFile>& files, bool universal,
                                   const TrainLayout& to, const std::string& out_tag,
                                   const WriteOptions& write) {
  const auto t0 = std::chrono::steady_clock::now();
  RETURN_IF_ERROR(PlanTensors(index, info.spec, files, universal,
                              [](const PlannedFile&, const StoredTensor*,
                                 const std::vector<ReadStep>&) { return Status::OK(); }));
  const uint64_t read0 = store.BlockBytesRead();
  WriteOptions w = write;
  if (!w.layout) w.layout = to.stored();
  ReshapeReport r;
  r.from = info.layout;
  r.to = to;
  r.out_tag = out_tag;
  UniversalSource us(index, index);
  FragmentSource& source = universal ? static_cast<FragmentSource&>(us) : index;
  ASSIGN_OR_RETURN(r.write, WriteTag(store, out_tag, info.spec, files, source, w));
  r.bytes_read = store.BlockBytesRead() - read0;
  r.seconds = Seconds(t0);
  return r;
}

}  // namespace

Result<PlannedFile> LoadPlanned(const Store& store, const std::string& tag,
                                const std::string& file) {
  const std::string where = FileName(tag, file);
  ASSIGN_OR_RETURN(std::string tree_bytes, store.GetFileTree(tag, file));
  const fb::StateTree* tree = VerifiedStateTree(tree_bytes);
  if (tree == nullptr) return Status::Corruption(where + ": state tree fails verification");
  PlannedFile pf;
  pf.name = file;
  TensorLoader loader = [&](const std::string& param, const std::string&) -> Result<at::Tensor> {
    ASSIGN_OR_RETURN(TensorRecordRef rec, store.GetTensorRecord(tag, file, param));
    std::vector<int64_t> shape;
    if (rec->shape()) shape.assign(rec->shape()->begin(), rec->shape()->end());
    const c10::ScalarType type = ToScalarType(rec->dtype());
    if (rec->placement() != nullptr) {
      at::Tensor t = Placeholder(shape, type);
      pf.placements[t.unsafeGetTensorImpl()] = PlacementOf(*rec->placement());
      return t;
    }
    at::Tensor t = at::empty(shape, type);
    RETURN_IF_ERROR(store.ReadTensor(*rec.get(), static_cast<uint8_t*>(t.data_ptr()),
                                     rec->byte_length(), TensorName(tag, file, param)));
    return t;
  };
  ASSIGN_OR_RETURN(pf.state, DecodeState(*tree, loader, where));
  return pf;
}

namespace {

// The model of a tag: parameters in module order (the model files of dp
// rank 0, stage by stage), groups from param_shapes, shapes and sharding
// from the fragment placements.
Result<ModelSpec> ModelOf(const Store& store, const TagIndex& index, const DeepSpeedFiles& files,
                          const TrainLayout& L) {
  const std::string& tag = index.tag();
  std::vector<ParamSpec> params;
  std::set<std::string> seen;
  // Where PipelineModule saved each parameter's weights: its layer file's
  // index and the key in that file (from the placed layer-file tensors).
  std::map<std::string, std::pair<int, std::string>> layer_of;
  for (const StoredTensor& st : index.tensors()) {
    if (st.placement.param.empty() || st.placement.state != "param") continue;
    std::optional<FileCoordinates> c = ParseFileName(st.file);
    if (c && c->kind == FileKind::kLayer) {
      layer_of.try_emplace(st.placement.param, c->layer, st.path);
    }
  }
  for (int s = 0; s < L.pp; ++s) {
    auto it = files.model_by_mp.find(MpRank(s, 0, L.tp));
    if (it == files.model_by_mp.end()) {
      return Status::Corruption("tag " + tag + " lacks the model file of stage " +
                                std::to_string(s));
    }
    ASSIGN_OR_RETURN(PlannedFile mf, LoadPlanned(store, tag, it->second));
    const IValue* shapes = DictField(mf.state, "param_shapes");
    if (shapes == nullptr || !shapes->isList()) {
      return Status::InvalidArgument(FileName(tag, it->second) +
                                     " has no param_shapes (a ZeRO checkpoint records them); "
                                     "cannot tell its parameter groups");
    }
    auto groups = shapes->toList();
    for (size_t g = 0; g < groups.size(); ++g) {
      IValue gv = groups.get(g);
      if (!gv.isGenericDict()) continue;
      for (const auto& kv : gv.toGenericDict()) {
        const std::string name = kv.key().toStringRef();
        if (!seen.insert(name).second) continue;
        auto pi = index.params().find(name);
        if (pi == index.params().end()) {
          return Status::Corruption("parameter " + name + " of " + FileName(tag, it->second) +
                                    " has no fragment placement");
        }
        ParamSpec p;
        p.name = name;
        p.global_shape = pi->second.global_shape;
        p.shard_dim = pi->second.shard_dim;
        p.group = static_cast<int>(g);
        if (auto l = layer_of.find(name); l != layer_of.end()) {
          p.layer_index = l->second.first;
          p.layer_key = l->second.second;
        }
        params.push_back(std::move(p));
      }
    }
  }
  return ModelSpec::FromParams(std::move(params));
}

// The training dtype and the model files' metadata besides DeepSpeed's own
// per-rank keys, from the first model file.
// `weights` is the file whose tensors have the training dtype: the first
// model file, or with PipelineModule layer files the first of them.
void ReadModelMeta(const PlannedFile& m0, const PlannedFile& weights, SourceInfo* info) {
  info->layout.bf16 = true;  // the first module tensor's dtype
  for (const auto& [impl, pl] : weights.placements) {
    if (pl.state == "param" || pl.state == "placeholder") {
      info->layout.bf16 = impl->dtype() == caffe2::TypeMeta::Make<c10::BFloat16>();
      break;
    }
  }
  static const std::set<std::string> kRankKeys = {
      "module",        "buffer_names",          "optimizer", "param_shapes", "frozen_param_shapes",
      "shared_params", "frozen_param_fragments"};
  const IValue& sd = m0.state;
  for (const auto& kv : sd.toGenericDict()) {
    if (!kRankKeys.count(kv.key().toStringRef()))
      info->meta.model_extra.insert(kv.key(), kv.value());
  }
  if (const IValue* v = DictField(sd, "ds_config")) info->meta.ds_config = *v;
  if (const IValue* v = DictField(sd, "ds_version"); v && v->isString()) {
    info->meta.ds_version = v->toStringRef();
  }
}

// The ZeRO stage and the optimizer's metadata: from dp 0 / mp 0's
// optimizer file, or a universal tag's optimizer_state.pt and steps.
Status ReadOptimMeta(const Store& store, const std::string& tag, const DeepSpeedFiles& files,
                     SourceInfo* info) {
  static const std::set<std::string> kFlatKeys = {
      "base_optimizer_state", "single_partition_of_fp32_groups",
      "zero_stage",           "group_paddings",
      "partition_count",      "ds_version",
      "param_slice_mappings", "optimizer_state_dict",
      "fp32_flat_groups",     "param_groups"};
  IValue osd;
  IValue inner;
  if (info->universal) {
    ASSIGN_OR_RETURN(PlannedFile u, LoadPlanned(store, tag, files.universal_optim));
    osd = u.state;
    inner = u.state;
  } else {
    auto it = files.optim_by_rank.find({0, 0});
    if (it == files.optim_by_rank.end()) {
      return Status::InvalidArgument("tag " + tag +
                                     " has no ZeRO optimizer file for dp 0, mp 0; reshape needs "
                                     "a ZeRO checkpoint (stage 1, 2 or 3)");
    }
    ASSIGN_OR_RETURN(PlannedFile of, LoadPlanned(store, tag, it->second));
    if (const IValue* v = DictField(of.state, "optimizer_state_dict")) osd = *v;
    if (const IValue* v = DictField(of.state, "ds_config")) info->meta.ds_config = *v;
    const IValue* in = DictField(osd, "base_optimizer_state");
    if (in == nullptr) in = DictField(osd, "optimizer_state_dict");
    if (in != nullptr) inner = *in;
  }
  info->layout.zero_stage = static_cast<int>(DictInt(osd, "zero_stage").value_or(1));
  if (osd.isGenericDict()) {
    for (const auto& kv : osd.toGenericDict()) {
      if (!kFlatKeys.count(kv.key().toStringRef()))
        info->meta.zero_extra.insert(kv.key(), kv.value());
    }
  }
  if (const IValue* pg = DictField(inner, "param_groups"); pg && pg->isList()) {
    for (const auto& g : pg->toList()) info->meta.param_groups.push_back(g);
  }
  const int groups = info->spec.groups();
  if (info->universal) {
    // DeepSpeed keeps one step per parameter; every parameter of a group has the same.
    for (int g = 0; g < groups; ++g) {
      for (const auto& p : info->spec.params()) {
        if (p.group != g) continue;
        std::string f = "zero/" + p.name + "/step.pt";
        auto pf = LoadPlanned(store, tag, f);
        if (pf.ok() && pf->state.isTensor()) info->meta.steps.push_back(pf->state.toTensor());
        break;
      }
    }
  } else if (const IValue* st = DictField(inner, "state"); st && st->isGenericDict()) {
    for (int g = 0; g < groups; ++g) {
      auto d = st->toGenericDict();
      auto it = d.find(IValue(int64_t{g}));
      if (it == d.end()) continue;
      if (const IValue* step = DictField(it->value(), "step"); step && step->isTensor()) {
        info->meta.steps.push_back(step->toTensor());
      }
    }
  }
  return Status::OK();
}

}  // namespace

Result<SourceInfo> DescribeTag(const Store& store, const TagIndex& index) {
  const std::string& tag = index.tag();
  ASSIGN_OR_RETURN(TagLayout tl, DiscoverTagLayout(store, tag));
  SourceInfo info;
  info.universal = tl.universal;
  info.files = tl.files;
  TrainLayout& L = info.layout;
  L.tp = tl.degrees.tp;
  L.pp = tl.degrees.pp;
  L.dp = tl.degrees.dp;
  const DeepSpeedFiles& files = info.files;
  if (static_cast<int>(files.model_by_mp.size()) != L.tp * L.pp) {
    return Status::Corruption("tag " + tag + " has " + std::to_string(files.model_by_mp.size()) +
                              " model-state files of dp rank 0 but its layout is tp " +
                              std::to_string(L.tp) + " x pp " + std::to_string(L.pp));
  }
  ASSIGN_OR_RETURN(PlannedFile m0, LoadPlanned(store, tag, files.model_by_mp.begin()->second));
  ASSIGN_OR_RETURN(info.spec, ModelOf(store, index, files, L));
  // PipelineModule layer files: the weights are there, `module` is None.
  PlannedFile weights;
  std::string first_layer;
  for (const std::string& f : files.layer) {
    std::optional<FileCoordinates> c = ParseFileName(f);
    if (!c || c->kind != FileKind::kLayer) continue;  // MoE expert files share the prefix
    if (first_layer.empty()) first_layer = f;
    if (L.layer_files == LayerFiles::kNone) L.layer_files = LayerFiles::kNoModelAxis;
    if (c->tp_rank >= 0) L.layer_files = LayerFiles::kModelAxis;
  }
  if (!first_layer.empty()) {
    ASSIGN_OR_RETURN(weights, LoadPlanned(store, tag, first_layer));
  }
  ReadModelMeta(m0, first_layer.empty() ? m0 : weights, &info);
  RETURN_IF_ERROR(ReadOptimMeta(store, tag, files, &info));
  return info;
}

Result<ReshapeReport> Reshape(Store& store, const std::string& tag, const ReshapeOptions& o) {
  ASSIGN_OR_RETURN(std::unique_ptr<TagIndex> index, TagIndex::Build(store, tag));
  ASSIGN_OR_RETURN(SourceInfo info, DescribeTag(store, *index));
  if (info.universal) {
    return Status::InvalidArgument("tag " + tag +
                                   " is a universal checkpoint; load it with import-universal");
  }
  TrainLayout to = info.layout;
  to.tp = o.tp;
  to.pp = o.pp;
  to.dp = o.dp;
  if (o.layer_files) to.layer_files = *o.layer_files;
  ASSIGN_OR_RETURN(std::vector<PlannedFile> files, PlanFiles(info.spec, to, info.meta));
  std::string out = o.out_tag.empty() ? tag + "_tp" + std::to_string(o.tp) + "_pp" +
                                            std::to_string(o.pp) + "_dp" + std::to_string(o.dp)
                                      : o.out_tag;
  return WritePlanned(store, *index, info, files, /*universal=*/false, to, out, o.write);
}

Result<ReshapePlan> PlanReshape(const Store& store, const std::string& tag, int tp, int pp,
                                int dp) {
  ASSIGN_OR_RETURN(std::unique_ptr<TagIndex> index, TagIndex::Build(store, tag));
  ASSIGN_OR_RETURN(SourceInfo info, DescribeTag(store, *index));
  ReshapePlan plan;
  plan.from = info.layout;
  plan.to = info.layout;
  plan.to.tp = tp;
  plan.to.pp = pp;
  plan.to.dp = dp;
  ASSIGN_OR_RETURN(std::vector<PlannedFile> files, PlanFiles(info.spec, plan.to, info.meta));
  const TrainLayout& from = plan.from;
  plan.zero_files.resize(dp);
  std::set<std::tuple<size_t, uint64_t>> chunks;
  // Each name parsed once: source files (the model-file index mp, and for
  // optimizer files the zero-file index dp * (tp * pp) + mp; -1 if none) ...
  std::map<std::string, std::pair<int, int>> source_index;  // file -> (model, zero)
  // A layer file's mp index is its stage's (the stage that saves the layer
  // at that pp) with the TP rank of its name: mp_rank file and layer files
  // of one rank map alike.
  auto stages_of_layers = [&](int pp) {
    std::map<int, int> out;
    for (const ParamSpec& p : info.spec.params()) {
      if (p.layer_index < 0 || out.count(p.layer_index)) continue;
      auto st = info.spec.StagesOf(p, pp);
      if (st.ok() && !st->empty()) out[p.layer_index] = st->front();
    }
    return out;
  };
  const std::map<int, int> from_stage = stages_of_layers(from.pp);
  const std::map<int, int> to_stage = stages_of_layers(pp);
  auto layer_mp = [](const FileCoordinates& c, const std::map<int, int>& stage, int tp_degree) {
    auto it = stage.find(c.layer);
    return it == stage.end() ? -1 : MpRank(it->second, std::max(0, c.tp_rank), tp_degree);
  };
  auto source_of = [&](const std::string& file) {
    auto [it, fresh] = source_index.try_emplace(file, -1, -1);
    if (fresh) {
      if (auto sc = ParseFileName(file)) {
        it->second.first =
            sc->kind == FileKind::kLayer ? layer_mp(*sc, from_stage, from.tp) : sc->mp_rank;
        if (sc->kind == FileKind::kOptimStates) {
          it->second.second = sc->dp_rank * from.tp * from.pp + sc->mp_rank;
        }
      }
    }
    return it->second;
  };
  // ... and the planned files, with the sources each reads.
  std::map<const PlannedFile*, std::pair<std::optional<FileCoordinates>, std::set<int>>> sources;
  for (const PlannedFile& f : files) sources[&f].first = ParseFileName(f.name);
  RETURN_IF_ERROR(PlanTensors(
      *index, info.spec, files, /*universal=*/false,
      [&](const PlannedFile& f, const StoredTensor* linked, const std::vector<ReadStep>& steps) {
        auto& [c, out] = sources[&f];
        const bool optim = c && c->kind == FileKind::kOptimStates;
        auto add_source = [&](const std::string& file) {
          const auto [model, zero] = source_of(file);
          const int i = optim ? zero : model;
          if (i >= 0) out.insert(i);
        };
        if (linked != nullptr) {
          plan.tensors_linked++;
          add_source(linked->file);
          return Status::OK();
        }
        for (const ReadStep& s : steps) {
          const StoredTensor& st = index->tensors()[s.tensor];
          for (uint64_t k = 0; k < s.chunks; ++k) {
            if (chunks.emplace(s.tensor, s.first_chunk + k).second) {
              plan.bytes_to_read += std::min<uint64_t>(
                  st.record->chunk_size(),
                  st.record->byte_length() - (s.first_chunk + k) * st.record->chunk_size());
            }
          }
          add_source(st.file);
        }
        return Status::OK();
      }));
  for (const PlannedFile& f : files) {
    const auto& [c, from_files] = sources[&f];
    if (!c) continue;
    const int mp = c->kind == FileKind::kLayer ? layer_mp(*c, to_stage, tp) : c->mp_rank;
    if (mp < 0) continue;
    const int new_pp = PpOfMp(mp, tp), new_tp = TpOfMp(mp, tp);
    const std::string key = std::to_string(new_pp) + "," + std::to_string(new_tp);
    const bool optim = c->kind == FileKind::kOptimStates;
    auto& target = optim ? plan.zero_files[c->dp_rank][key] : plan.model_files[key];
    target.insert(target.end(), from_files.begin(), from_files.end());
    std::sort(target.begin(), target.end());
    target.erase(std::unique(target.begin(), target.end()), target.end());
  }
  return plan;
}

Result<ReshapeReport> ExportUniversal(Store& store, const std::string& tag,
                                      const std::string& out_tag, const WriteOptions& write) {
  ASSIGN_OR_RETURN(std::unique_ptr<TagIndex> index, TagIndex::Build(store, tag));
  ASSIGN_OR_RETURN(SourceInfo info, DescribeTag(store, *index));
  if (info.universal) return Status::InvalidArgument("tag " + tag + " is already universal");
  std::vector<PlannedFile> files;
  // The model-state files, as they are (linked).
  for (const auto& f : info.files.all_model) {
    ASSIGN_OR_RETURN(PlannedFile pf, LoadPlanned(store, tag, f));
    files.push_back(std::move(pf));
  }
  int64_t original_vocab = -1;
  if (const IValue* uci = DictField(IValue(info.meta.model_extra), "universal_checkpoint_info")) {
    original_vocab = DictInt(*uci, "original_vocab_size").value_or(-1);
  }
  for (const ParamSpec& p : info.spec.params()) {
    std::vector<int64_t> shape = p.global_shape;
    const bool vocab = p.vocab && original_vocab > 0 && original_vocab < shape[0];
    if (vocab) shape[0] = original_vocab;
    for (const char* state : {"fp32", "exp_avg", "exp_avg_sq"}) {
      PlannedFile f;
      f.name = "zero/" + p.name + "/" + state + ".pt";
      Placement pl;
      pl.param = p.name;
      pl.state = state;
      pl.global_shape = p.global_shape;
      pl.offsets.assign(shape.size(), 0);
      pl.shard_shape = shape;
      at::Tensor t = Placeholder(shape, at::kFloat);
      f.placements[t.unsafeGetTensorImpl()] = pl;
      GenericDict d = StrDict();
      d.insert("param", t);
      if (p.shard_dim >= 0) d.insert("cat_dim", IValue(int64_t{p.shard_dim}));
      if (vocab) d.insert("vocab_tensor", IValue(true));
      f.state = d;
      files.push_back(std::move(f));
    }
    if (p.group < static_cast<int>(info.meta.steps.size())) {
      PlannedFile f;
      f.name = "zero/" + p.name + "/step.pt";
      f.state = info.meta.steps[p.group].clone();
      files.push_back(std::move(f));
    }
  }
  PlannedFile opt;
  opt.name = "zero/optimizer_state.pt";
  GenericDict od = StrDict();
  for (const auto& kv : info.meta.zero_extra) od.insert(kv.key(), kv.value());
  od.insert("zero_stage", IValue(int64_t{info.layout.zero_stage}));
  od.insert("ds_version", IValue(info.meta.ds_version));
  c10::impl::GenericList groups(c10::AnyType::get());
  for (const auto& g : info.meta.param_groups) groups.push_back(g);
  od.insert("param_groups", groups);
  od.insert("ds_config", info.meta.ds_config);
  opt.state = od;
  files.push_back(std::move(opt));
  WriteOptions w = write;
  w.layout = info.layout.stored();
  return WritePlanned(store, *index, info, files, /*universal=*/false, info.layout, out_tag, w);
}

Result<ReshapeReport> ImportUniversal(Store& store, const std::string& tag, const TrainLayout& to,
                                      const std::string& out_tag, const WriteOptions& write) {
  ASSIGN_OR_RETURN(std::unique_ptr<TagIndex> index, TagIndex::Build(store, tag));
  ASSIGN_OR_RETURN(SourceInfo info, DescribeTag(store, *index));
  if (!info.universal) {
    return Status::InvalidArgument("tag " + tag +
                                   " is not a universal checkpoint (no zero/optimizer_state.pt); "
                                   "export it first or use reshape");
  }
  ASSIGN_OR_RETURN(std::vector<PlannedFile> files, PlanFiles(info.spec, to, info.meta));
  return WritePlanned(store, *index, info, files, /*universal=*/true, to, out_tag, write);
}

}  // namespace ckptkv::checkpoint
