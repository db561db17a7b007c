#include "checkpoint/query/synth.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "store/digest.h"

namespace ckptkv::checkpoint {

namespace {

using c10::IValue;
using GenericDict = c10::impl::GenericDict;

uint64_t SplitMix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t NameHash(const std::string& s) {
  Digest d = Digest::Of(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  return d.lo ^ d.hi;
}

GenericDict StrDict() { return GenericDict(c10::StringType::get(), c10::AnyType::get()); }

}  // namespace

SynthSource::SynthSource(const ModelSpec& spec, const GptConfig& model, uint64_t seed)
    : spec_(spec), model_(model), seed_(seed) {}

Status SynthSource::Fill(const std::string& param, const std::string& state, const Rect& rect,
                         at::Tensor out) {
  const ParamSpec* p = spec_.Find(param);
  if (p == nullptr) return Status::NotFound("synthetic model has no parameter " + param);
  // Training weights are the master weights rounded to the training dtype.
  const std::string s = state == "param" ? "fp32" : state;
  float scale = 0.02f, center = 0.0f;
  if (s == "exp_avg") {
    scale = 1e-3f;
  } else if (s == "exp_avg_sq") {
    scale = 5e-7f;
    center = 5e-7f;
  } else if (s != "fp32") {
    return Status::NotFound("synthetic model has no optimizer state " + state);
  } else if (param.find("layernorm.weight") != std::string::npos ||
             (p->kind == ParamKind::kFinal && param.size() > 7 &&
              param.compare(param.size() - 7, 7, ".weight") == 0)) {
    center = 1.0f;
  }
  const uint64_t key = SplitMix(seed_ ^ NameHash(param) ^ (NameHash(s) << 1));
  const auto& g = p->global_shape;
  const size_t rank = g.size();
  const int64_t inner = rank ? rect.shape[rank - 1] : 1;
  const int64_t rows = inner ? rect.numel() / inner : 0;
  at::Tensor buf = at::empty(rect.shape, at::kFloat);
  float* dst = buf.data_ptr<float>();
  const int64_t vocab_rows = p->vocab ? model_.vocab : -1;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> idx(rank);
    for (int64_t row = begin; row < end; ++row) {
      // Global index of the row's first element.
      int64_t rem = row;
      for (size_t d = rank - 1; d-- > 0;) {
        idx[d] = rect.offsets[d] + rem % rect.shape[d];
        rem /= rect.shape[d];
      }
      int64_t flat = 0;
      for (size_t d = 0; d + 1 < rank; ++d) flat = flat * g[d] + idx[d];
      if (rank) flat = flat * g[rank - 1] + rect.offsets[rank - 1];
      float* o = dst + row * inner;
      if (vocab_rows >= 0 && rank >= 2 && idx[0] >= vocab_rows) {
        std::fill(o, o + inner, 0.0f);
        continue;
      }
      for (int64_t k = 0; k < inner; ++k) {
        const uint64_t x = SplitMix(key + static_cast<uint64_t>(flat + k));
        const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);
        o[k] = center + (u - 0.5f) * 2.0f * scale;
      }
    }
  });
  out.copy_(buf);
  return Status::OK();
}

CheckpointMeta SynthMeta(const SynthOptions& o) {
  CheckpointMeta m;
  const auto& c = o.model;
  const auto& L = o.layout;
  GenericDict ds = StrDict();
  ds.insert("train_batch_size", IValue(int64_t{512}));
  ds.insert("gradient_clipping", IValue(1.0));
  GenericDict bf16 = StrDict();
  bf16.insert("enabled", IValue(L.bf16));
  ds.insert("bf16", bf16);
  GenericDict zero = StrDict();
  zero.insert("stage", IValue(int64_t{L.zero_stage}));
  ds.insert("zero_optimization", zero);
  m.ds_config = ds;

  GenericDict sched = StrDict();
  sched.insert("last_epoch", IValue(o.iteration));
  sched.insert("_step_count", IValue(o.iteration + 1));
  sched.insert("base_lrs", IValue(c10::List<double>({1e-4, 1e-4})));
  auto& x = m.model_extra;
  x.insert("lr_scheduler", sched);
  x.insert("data_sampler", IValue());
  x.insert("random_ltd", IValue());
  x.insert("sparse_tensor_module_names", IValue(c10::List<std::string>()));
  x.insert("skipped_steps", IValue(int64_t{0}));
  x.insert("global_steps", IValue(o.iteration));
  x.insert("global_samples", IValue(o.iteration * 512));
  x.insert("dp_world_size", IValue(int64_t{L.dp}));
  x.insert("mp_world_size", IValue(int64_t{L.tp} * L.pp));
  x.insert("checkpoint_parallel_dimensions", IValue());
  x.insert("ds_config", m.ds_config);
  x.insert("ds_version", IValue(m.ds_version));
  GenericDict uci = StrDict();
  uci.insert("universal_checkpoint_version", IValue(0.2));
  uci.insert("vocabulary_parameter_patterns",
             IValue(c10::List<std::string>({"tied_modules.embed.word_embeddings.weight"})));
  uci.insert("tp_replicated_parameter_patterns",
             IValue(c10::List<std::string>(
                 {"tied_modules.embed.position_embeddings.weight", R"(\d+.input_layernorm.weight)",
                  R"(\d+.input_layernorm.bias)", R"(\d+.post_attention_layernorm.weight)",
                  R"(\d+.post_attention_layernorm.bias)", R"(\d+.self_attention.dense.bias)",
                  R"(\d+.mlp.dense_4h_to_h.bias)", R"(\d+.weight)", R"(\d+.bias)"})));
  uci.insert("parameter_with_row_parallelism_patterns",
             IValue(c10::List<std::string>(
                 {R"(\d+.mlp.dense_4h_to_h.weight)", R"(\d+.self_attention.dense.weight)"})));
  uci.insert("pipeline_replicated_parameter_patterns",
             IValue(c10::List<std::string>({"tied_modules.embed.word_embeddings.weight",
                                            "tied_modules.embed.position_embeddings.weight"})));
  uci.insert("original_vocab_size", IValue(c.vocab));
  uci.insert("padded_vocab_size", IValue(c.padded_vocab()));
  x.insert("universal_checkpoint_info", uci);
  x.insert("iteration", IValue(o.iteration));
  GenericDict args = StrDict();
  args.insert("num_layers", IValue(int64_t{c.layers}));
  args.insert("hidden_size", IValue(c.hidden));
  args.insert("ffn_hidden_size", IValue(4 * c.hidden));
  args.insert("padded_vocab_size", IValue(c.padded_vocab()));
  args.insert("max_position_embeddings", IValue(c.max_positions));
  args.insert("seed", IValue(static_cast<int64_t>(o.seed)));
  args.insert("lr", IValue(1e-4));
  args.insert("weight_decay", IValue(0.1));
  args.insert("bf16", IValue(L.bf16));
  args.insert("tensor_model_parallel_size", IValue(int64_t{L.tp}));
  args.insert("pipeline_model_parallel_size", IValue(int64_t{L.pp}));
  args.insert("data_parallel_size", IValue(int64_t{L.dp}));
  x.insert("args", args);
  x.insert("checkpoint_version", IValue(3.0));

  GenericDict scaler = StrDict();
  scaler.insert("type", IValue(std::string(L.bf16 ? "LossScaler" : "DynamicLossScaler")));
  scaler.insert("cur_scale", IValue(L.bf16 ? 1.0 : 65536.0));
  scaler.insert("cur_iter", IValue(o.iteration));
  m.zero_extra.insert("loss_scaler", scaler);
  m.zero_extra.insert("dynamic_loss_scale", IValue(!L.bf16));
  m.zero_extra.insert("overflow", IValue(false));
  m.zero_extra.insert("clip_grad", IValue(1.0));
  for (double wd : {0.1, 0.0}) {
    GenericDict pg = StrDict();
    pg.insert("lr", IValue(1e-4));
    pg.insert("betas", IValue(c10::List<double>({0.9, 0.95})));
    pg.insert("eps", IValue(1e-8));
    pg.insert("weight_decay", IValue(wd));
    pg.insert("amsgrad", IValue(false));
    m.param_groups.emplace_back(pg);
    m.steps.push_back(at::scalar_tensor(static_cast<double>(o.iteration), at::kFloat));
  }
  return m;
}

Result<WriteReport> Synth(Store& store, const std::string& tag, const SynthOptions& o,
                          const WriteOptions& write) {
  ModelSpec spec = ModelSpec::Gpt(o.model, ShardingRules::MegatronDefaults());
  CheckpointMeta meta = SynthMeta(o);
  ASSIGN_OR_RETURN(std::vector<PlannedFile> files, PlanFiles(spec, o.layout, meta));
  SynthSource source(spec, o.model, o.seed);
  WriteOptions w = write;
  if (!w.layout) w.layout = o.layout.stored();
  return WriteTag(store, tag, spec, files, source, w);
}

}  // namespace ckptkv::checkpoint
