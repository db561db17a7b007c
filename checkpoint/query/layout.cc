#include "checkpoint/query/layout.h"

#include <ATen/ATen.h>

#include "checkpoint/core/file_names.h"
#include "checkpoint/query/fragments.h"
#include "checkpoint/core/zero_layout.h"

namespace ckptkv::checkpoint {

namespace {

using c10::IValue;
using GenericDict = c10::impl::GenericDict;
using GenericList = c10::impl::GenericList;

GenericDict StrDict() { return GenericDict(c10::StringType::get(), c10::AnyType::get()); }
GenericDict IntDict() { return GenericDict(c10::IntType::get(), c10::AnyType::get()); }
GenericList AnyList() { return GenericList(c10::AnyType::get()); }

IValue Shape(const std::vector<int64_t>& s) { return IValue(c10::List<int64_t>(s)); }

struct Builder {
  const ModelSpec& spec;
  const TrainLayout& L;
  const CheckpointMeta& meta;
  // Group(pp, g) of every stage and group, made once (not once per DP rank).
  std::vector<std::vector<std::pair<std::vector<std::string>, FlatLayout>>> groups;
  c10::ScalarType lp_dtype() const { return L.bf16 ? at::kBFloat16 : at::kFloat; }

  Status MakeGroups() {
    groups.assign(L.pp, {});
    for (int pp = 0; pp < L.pp; ++pp) {
      for (int g = 0; g < spec.groups(); ++g) {
        ASSIGN_OR_RETURN(auto grp, Group(pp, g));
        groups[pp].push_back(std::move(grp));
      }
    }
    return Status::OK();
  }

  Placement RectPlacement(const ParamSpec& p, int tp_rank, const std::string& state) const {
    return ShardPlacement(p, tp_rank, L.tp, state);
  }

  // Layout of group g of stage pp (the TP shard sizes are the same on every
  // TP rank) and the names of its parameters in buffer order.
  Result<std::pair<std::vector<std::string>, FlatLayout>> Group(int pp, int g) const {
    ASSIGN_OR_RETURN(std::vector<int> idx, spec.StageGroup(pp, g, L.pp));
    std::vector<std::string> names;
    std::vector<int64_t> numels;
    for (int i : idx) {
      ASSIGN_OR_RETURN(auto shape, spec.ShardShape(spec.params()[i], L.tp));
      names.push_back(spec.params()[i].name);
      numels.push_back(Numel(shape));
    }
    FlatLayout fl = L.zero_stage == 3 ? Zero3Layout(numels, L.dp) : Zero12Layout(numels, L.dp);
    return std::make_pair(std::move(names), std::move(fl));
  }

  IValue Add(PlannedFile& f, const std::vector<int64_t>& shape, c10::ScalarType dtype,
             Placement pl) const {
    at::Tensor t = Placeholder(shape, dtype);
    f.placements[t.unsafeGetTensorImpl()] = std::move(pl);
    return t;
  }

  Result<IValue> ParamShapes(int pp) const {
    GenericList groups = AnyList();
    for (int g = 0; g < spec.groups(); ++g) {
      ASSIGN_OR_RETURN(std::vector<int> idx, spec.StageGroup(pp, g, L.pp));
      GenericDict d = StrDict();
      for (int i : idx) {
        ASSIGN_OR_RETURN(auto shape, spec.ShardShape(spec.params()[i], L.tp));
        d.insert(spec.params()[i].name, Shape(shape));
      }
      groups.push_back(d);
    }
    return IValue(groups);
  }

  Result<PlannedFile> ModelFile(int pp, int tp, int dp_rank) const {
    PlannedFile f;
    const int mp = MpRank(pp, tp, L.tp);
    const bool z3 = L.zero_stage == 3;
    f.name = z3 ? ZeroModelFileName(dp_rank, mp) : ModelFileName(mp);
    GenericDict module = StrDict();
    ASSIGN_OR_RETURN(std::vector<int> idx, spec.Stage(pp, L.pp));
    if (L.layer_files != LayerFiles::kNone) idx.clear();  // the weights are in layer files
    for (int i : idx) {
      const ParamSpec& p = spec.params()[i];
      ASSIGN_OR_RETURN(auto shape, spec.ShardShape(p, L.tp));
      if (z3) {
        // ZeRO-3 saves partitioned parameters as empty placeholders.
        module.insert(p.name, Add(f, {0}, lp_dtype(), RectPlacement(p, tp, "placeholder")));
      } else {
        module.insert(p.name, Add(f, shape, lp_dtype(), RectPlacement(p, tp, "param")));
      }
    }
    GenericDict sd = StrDict();
    // PipelineModule saves the weights in layer files; `module` is None.
    if (L.layer_files != LayerFiles::kNone) {
      sd.insert("module", IValue());
    } else {
      sd.insert("module", module);
    }
    sd.insert("buffer_names", IValue(c10::List<std::string>()));
    sd.insert("optimizer", IValue());
    ASSIGN_OR_RETURN(IValue shapes, ParamShapes(pp));
    sd.insert("param_shapes", shapes);
    sd.insert("frozen_param_shapes", IValue());
    sd.insert("shared_params", IValue(StrDict()));
    sd.insert("frozen_param_fragments", IValue());
    GenericDict dims = StrDict();
    dims.insert("pp_degree", IValue(int64_t{L.pp}));
    dims.insert("tp_degree", IValue(int64_t{L.tp}));
    bool dp_set = false, mp_set = false, dims_set = false;
    for (const auto& kv : meta.model_extra) {
      const std::string k = kv.key().toStringRef();
      if (k == "dp_world_size") {
        sd.insert(k, IValue(int64_t{L.dp}));
        dp_set = true;
      } else if (k == "mp_world_size") {
        sd.insert(k, IValue(int64_t{L.tp} * L.pp));
        mp_set = true;
      } else if (k == "checkpoint_parallel_dimensions") {
        sd.insert(k, dims);
        dims_set = true;
      } else if (k == "args" && kv.value().isGenericDict()) {
        // Megatron's args name the degrees the checkpoint was trained at.
        GenericDict args = StrDict();
        for (const auto& a : kv.value().toGenericDict()) {
          const std::string ak = a.key().toStringRef();
          if (ak == "tensor_model_parallel_size") {
            args.insert(a.key(), IValue(int64_t{L.tp}));
          } else if (ak == "pipeline_model_parallel_size") {
            args.insert(a.key(), IValue(int64_t{L.pp}));
          } else if (ak == "data_parallel_size") {
            args.insert(a.key(), IValue(int64_t{L.dp}));
          } else {
            args.insert(a.key(), a.value());
          }
        }
        sd.insert(k, args);
      } else if (!sd.contains(k)) {
        sd.insert(k, kv.value());
      }
    }
    if (!dp_set) sd.insert("dp_world_size", IValue(int64_t{L.dp}));
    if (!mp_set) sd.insert("mp_world_size", IValue(int64_t{L.tp} * L.pp));
    if (!dims_set) sd.insert("checkpoint_parallel_dimensions", dims);
    if (!sd.contains("ds_config")) sd.insert("ds_config", meta.ds_config);
    if (!sd.contains("ds_version")) sd.insert("ds_version", IValue(meta.ds_version));
    f.state = sd;
    return f;
  }

  // The layer files stage `pp` saves at TP rank `tp`: each layer's own
  // state dict (keys relative to the layer), its tensors TP shards.
  Result<std::vector<PlannedFile>> StageLayerFiles(int pp, int tp) const {
    ASSIGN_OR_RETURN(auto layers, spec.StageLayers(pp, L.pp));
    std::vector<PlannedFile> out;
    const bool axis = L.layer_files == LayerFiles::kModelAxis || L.tp > 1;
    for (const auto& [layer, idx] : layers) {
      PlannedFile f;
      f.name = LayerFileName(layer, axis ? std::optional<int>(tp) : std::nullopt);
      GenericDict sd = StrDict();
      for (int i : idx) {
        const ParamSpec& p = spec.params()[i];
        if (sd.contains(p.layer_key)) {
          return Status::InvalidArgument("parameters " + p.name + " and another of layer " +
                                         std::to_string(layer) + " share the key " + p.layer_key);
        }
        ASSIGN_OR_RETURN(auto shape, spec.ShardShape(p, L.tp));
        sd.insert(p.layer_key, Add(f, shape, lp_dtype(), RectPlacement(p, tp, "param")));
      }
      f.state = sd;
      out.push_back(std::move(f));
    }
    return out;
  }

  IValue GroupState(int g, const IValue& exp_avg, const IValue& exp_avg_sq) const {
    GenericDict st = StrDict();
    if (g < static_cast<int>(meta.steps.size())) st.insert("step", meta.steps[g].clone());
    st.insert("exp_avg", exp_avg);
    st.insert("exp_avg_sq", exp_avg_sq);
    return st;
  }

  IValue ParamGroups() const {
    GenericList groups = AnyList();
    for (size_t g = 0; g < meta.param_groups.size(); ++g) {
      GenericDict d = StrDict();
      if (meta.param_groups[g].isGenericDict()) {
        for (const auto& kv : meta.param_groups[g].toGenericDict()) {
          if (kv.key().toStringRef() != "params") d.insert(kv.key(), kv.value());
        }
      }
      d.insert("params", IValue(c10::List<int64_t>({static_cast<int64_t>(g)})));
      groups.push_back(d);
    }
    return groups;
  }

  Result<PlannedFile> OptimFile(int pp, int tp, int r) const {
    PlannedFile f;
    const int mp = MpRank(pp, tp, L.tp);
    f.name = ZeroOptimFileName(r, mp, L.bf16);
    GenericDict osd = StrDict();
    const bool z3 = L.zero_stage == 3;
    if (z3) osd.insert("zero_stage", IValue(int64_t{3}));
    for (const auto& kv : meta.zero_extra) osd.insert(kv.key(), kv.value());
    GenericDict state = IntDict();
    GenericList fp32 = AnyList();
    GenericList paddings = AnyList();
    GenericList counts = AnyList();
    GenericList mappings = AnyList();
    for (int g = 0; g < static_cast<int>(groups[pp].size()); ++g) {
      const auto& [names, fl] = groups[pp][g];
      const int64_t P = fl.partition_size;
      const int64_t pad = fl.paddings[r];
      auto flat = [&](const std::string& s, int64_t n) {
        return Add(f, {n}, at::kFloat,
                   FlatPlacement(names, fl, g, r, tp, L.tp, L.zero_stage, s, n));
      };
      state.insert(IValue(int64_t{g}), GroupState(g, flat("exp_avg", P), flat("exp_avg_sq", P)));
      // Stage 1/2 strip the padding of the fp32 partition; stage 3 keeps it.
      fp32.push_back(flat("fp32", z3 ? P : P - pad));
      paddings.push_back(IValue(pad));
      counts.push_back(IValue(int64_t{L.dp}));
      GenericDict m = StrDict();
      for (const FlatPiece& pc : fl.pieces[r]) {
        GenericDict fa = StrDict();
        fa.insert("numel", IValue(pc.numel));
        fa.insert("start", IValue(pc.start));
        m.insert(names[pc.param], fa);
      }
      mappings.push_back(m);
    }
    GenericDict inner = StrDict();
    inner.insert("state", state);
    inner.insert("param_groups", ParamGroups());
    if (z3) {
      osd.insert("partition_count", IValue(int64_t{L.dp}));
      osd.insert("optimizer_state_dict", inner);
      osd.insert("fp32_flat_groups", fp32);
    } else {
      osd.insert("base_optimizer_state", inner);
      osd.insert("single_partition_of_fp32_groups", fp32);
      osd.insert("zero_stage", IValue(int64_t{L.zero_stage}));
      osd.insert("group_paddings", paddings);
      osd.insert("partition_count", counts);
      osd.insert("ds_version", IValue(meta.ds_version));
      osd.insert("param_slice_mappings", mappings);
    }
    GenericDict top = StrDict();
    top.insert("optimizer_state_dict", osd);
    top.insert("ds_config", meta.ds_config);
    top.insert("ds_version", IValue(meta.ds_version));
    f.state = top;
    return f;
  }
};

}  // namespace

Placement ShardPlacement(const ParamSpec& p, int tp_rank, int tp, const std::string& state) {
  Placement pl;
  pl.param = p.name;
  pl.state = state;
  pl.global_shape = p.global_shape;
  Rect r = ShardRect(p, tp_rank, tp);
  pl.offsets = std::move(r.offsets);
  pl.shard_shape = std::move(r.shape);
  pl.tp_rank = tp_rank;
  pl.tp_degree = tp;
  pl.shard_dim = p.shard_dim;
  return pl;
}

Placement FlatPlacement(const std::vector<std::string>& names, const FlatLayout& fl, int group,
                        int dp_rank, int tp_rank, int tp, int zero_stage, const std::string& state,
                        int64_t numel) {
  Placement pl;
  pl.state = state;
  pl.flat_group = group;
  pl.flat_offset = zero_stage == 3 ? 0 : dp_rank * fl.partition_size;
  pl.flat_numel = numel;
  pl.tp_rank = tp_rank;
  pl.tp_degree = tp;
  for (const FlatPiece& pc : fl.pieces[dp_rank]) {
    if (pc.start >= numel) continue;
    pl.segments.push_back(PlacementSegment{names[pc.param], pc.start, pc.numel, pc.param_offset});
  }
  return pl;
}

std::string TrainLayout::ToString() const {
  return "tp" + std::to_string(tp) + " x pp" + std::to_string(pp) + " x dp" + std::to_string(dp) +
         " ZeRO-" + std::to_string(zero_stage) + (bf16 ? " bf16" : " fp32") +
         (layer_files == LayerFiles::kNone ? "" : " layer files");
}

at::Tensor Placeholder(const std::vector<int64_t>& shape, c10::ScalarType dtype) {
  return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
}

Result<std::vector<PlannedFile>> PlanFiles(const ModelSpec& spec, const TrainLayout& layout,
                                           const CheckpointMeta& meta) {
  if (layout.zero_stage < 1 || layout.zero_stage > 3) {
    return Status::InvalidArgument("ZeRO stage " + std::to_string(layout.zero_stage) +
                                   " is not supported; give 1, 2 or 3");
  }
  if (layout.dp < 1) return Status::InvalidArgument("dp must be >= 1");
  RETURN_IF_ERROR(spec.CheckLayout(layout.tp, layout.pp));
  if (layout.layer_files != LayerFiles::kNone && layout.zero_stage == 3) {
    return Status::InvalidArgument(
        "PipelineModule layer files with ZeRO-3: DeepSpeed's pipeline engine runs ZeRO 0-2 only");
  }
  Builder b{spec, layout, meta, {}};
  RETURN_IF_ERROR(b.MakeGroups());
  std::vector<PlannedFile> files;
  for (int pp = 0; pp < layout.pp; ++pp) {
    for (int tp = 0; tp < layout.tp; ++tp) {
      if (layout.zero_stage == 3) {
        for (int r = 0; r < layout.dp; ++r) {
          ASSIGN_OR_RETURN(PlannedFile f, b.ModelFile(pp, tp, r));
          files.push_back(std::move(f));
        }
      } else {
        if (layout.layer_files != LayerFiles::kNone) {
          ASSIGN_OR_RETURN(std::vector<PlannedFile> layers, b.StageLayerFiles(pp, tp));
          for (auto& f : layers) files.push_back(std::move(f));
        }
        ASSIGN_OR_RETURN(PlannedFile f, b.ModelFile(pp, tp, 0));
        files.push_back(std::move(f));
      }
    }
  }
  for (int r = 0; r < layout.dp; ++r) {
    for (int pp = 0; pp < layout.pp; ++pp) {
      for (int tp = 0; tp < layout.tp; ++tp) {
        ASSIGN_OR_RETURN(PlannedFile f, b.OptimFile(pp, tp, r));
        files.push_back(std::move(f));
      }
    }
  }
  return files;
}

}  // namespace ckptkv::checkpoint
