#include "checkpoint/core/model_spec.h"

#include <regex>
#include <set>
#include <sstream>

namespace ckptkv::checkpoint {

int64_t Numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

ShardingRules ShardingRules::MegatronDefaults() {
  ShardingRules r;
  r.rules_ = {
      {R"(layernorm\.(weight|bias)$)", -1},     {R"(position_embeddings\.weight$)", -1},
      {R"(self_attention\.dense\.bias$)", -1},  {R"(mlp\.dense_4h_to_h\.bias$)", -1},
      {R"(^\d+\.(weight|bias)$)", -1},  // final norm of GPTModelPipe
      {R"(self_attention\.dense\.weight$)", 1}, {R"(mlp\.dense_4h_to_h\.weight$)", 1},
  };
  r.default_dim_ = 0;
  return r;
}

Result<ShardingRules> ShardingRules::Parse(const std::string& text, int default_dim) {
  ShardingRules r;
  r.default_dim_ = default_dim;
  std::istringstream in(text);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty() || line[0] == '#') continue;
    auto eq = line.rfind('=');
    if (eq == std::string::npos) {
      return Status::InvalidArgument("sharding rule line " + std::to_string(n) + " '" + line +
                                     "' has no '='; expected REGEX=DIM (DIM -1 = replicated)");
    }
    ShardingRule rule{line.substr(0, eq), 0};
    try {
      rule.dim = std::stoi(line.substr(eq + 1));
      std::regex check(rule.pattern);
    } catch (const std::exception& e) {
      return Status::InvalidArgument("sharding rule line " + std::to_string(n) + " '" + line +
                                     "': " + e.what() + "; expected REGEX=DIM");
    }
    r.rules_.push_back(rule);
  }
  return r;
}

int ShardingRules::DimFor(const std::string& name) const {
  for (const auto& rule : rules_) {
    if (std::regex_search(name, std::regex(rule.pattern))) return rule.dim;
  }
  return default_dim_;
}

ModelSpec ModelSpec::Gpt(const GptConfig& c, const ShardingRules& rules) {
  std::vector<ParamSpec> ps;
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    ParamSpec p;
    p.name = name;
    p.global_shape = std::move(shape);
    p.shard_dim = rules.DimFor(name);
    if (p.shard_dim >= static_cast<int>(p.global_shape.size())) p.shard_dim = -1;
    // Megatron's groups: weight decay for matrices, none for biases and norms.
    p.group = p.global_shape.size() >= 2 ? 0 : 1;
    ps.push_back(std::move(p));
  };
  const int64_t h = c.hidden;
  add("tied_modules.embed.word_embeddings.weight", {c.padded_vocab(), h});
  add("tied_modules.embed.position_embeddings.weight", {c.max_positions, h});
  for (ParamSpec& p : ps) p.layer_index = 1;  // GPTModelPipe's specs: 0 a cast, 1 the embedding
  for (int l = 0; l < c.layers; ++l) {
    const std::string p = std::to_string(l + 2) + ".";
    add(p + "input_layernorm.weight", {h});
    add(p + "input_layernorm.bias", {h});
    add(p + "self_attention.query_key_value.weight", {3 * h, h});
    add(p + "self_attention.query_key_value.bias", {3 * h});
    add(p + "self_attention.dense.weight", {h, h});
    add(p + "self_attention.dense.bias", {h});
    add(p + "post_attention_layernorm.weight", {h});
    add(p + "post_attention_layernorm.bias", {h});
    add(p + "mlp.dense_h_to_4h.weight", {4 * h, h});
    add(p + "mlp.dense_h_to_4h.bias", {4 * h});
    add(p + "mlp.dense_4h_to_h.weight", {h, 4 * h});
    add(p + "mlp.dense_4h_to_h.bias", {h});
  }
  const std::string fin = std::to_string(c.layers + 3) + ".";
  add(fin + "weight", {h});
  add(fin + "bias", {h});
  return FromParams(std::move(ps));
}

ModelSpec ModelSpec::FromParams(std::vector<ParamSpec> params) {
  ModelSpec m;
  m.params_ = std::move(params);
  m.Index();
  return m;
}

void ModelSpec::Index() {
  static const std::regex kLayerRe(R"(^(\d+)\.(.+)$)");
  std::set<int> layer_ids;
  std::vector<int> ids(params_.size(), -1);
  for (size_t i = 0; i < params_.size(); ++i) {
    ParamSpec& p = params_[i];
    std::smatch m;
    if (p.name.rfind("tied_modules.", 0) == 0) {
      p.kind = ParamKind::kTied;
    } else if (std::regex_match(p.name, m, kLayerRe)) {
      if (m[2].str().find('.') != std::string::npos) {
        p.kind = ParamKind::kLayer;
        ids[i] = std::stoi(m[1].str());
        layer_ids.insert(ids[i]);
      } else {
        p.kind = ParamKind::kFinal;
      }
    } else {
      p.kind = ParamKind::kOther;
    }
    p.vocab = p.name.find("word_embeddings") != std::string::npos;
    by_name_[p.name] = static_cast<int>(i);
  }
  std::map<int, int> ordinal;
  for (int id : layer_ids) ordinal.emplace(id, static_cast<int>(ordinal.size()));
  for (size_t i = 0; i < params_.size(); ++i) {
    if (ids[i] >= 0) params_[i].layer = ordinal[ids[i]];
  }
  // PipelineModule layer files: `<i>.<key>` in layer i, a tied module's
  // parameters in the layer before the first numbered one unless recorded.
  int first_layer = -1;
  for (const ParamSpec& p : params_) {
    std::smatch m;
    if (p.kind != ParamKind::kTied && std::regex_match(p.name, m, kLayerRe) &&
        m[1].str().size() < 9) {
      const int id = std::stoi(m[1].str());
      if (first_layer < 0 || id < first_layer) first_layer = id;
    }
  }
  for (ParamSpec& p : params_) {
    if (!p.layer_key.empty() && p.layer_index >= 0) continue;
    std::smatch m;
    if (p.kind == ParamKind::kTied) {
      const size_t module_end = p.name.find('.', 13);  // after "tied_modules."
      if (module_end == std::string::npos) continue;
      p.layer_key = p.name.substr(module_end + 1);
      if (p.layer_index < 0) p.layer_index = std::max(0, first_layer - 1);
    } else if (std::regex_match(p.name, m, kLayerRe) && m[1].str().size() < 9) {
      p.layer_index = std::stoi(m[1].str());
      p.layer_key = m[2].str();
    }
  }
  transformer_layers_ = static_cast<int>(layer_ids.size());
}

const ParamSpec* ModelSpec::Find(const std::string& name) const {
  auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &params_[it->second];
}

int ModelSpec::groups() const {
  int g = 0;
  for (const auto& p : params_) g = std::max(g, p.group + 1);
  return g;
}

Status ModelSpec::CheckLayout(int tp, int pp) const {
  if (tp < 1 || pp < 1) {
    return Status::InvalidArgument("parallel degrees must be >= 1 (tp " + std::to_string(tp) +
                                   ", pp " + std::to_string(pp) + ")");
  }
  if (pp > 1 && transformer_layers_ % pp != 0) {
    return Status::InvalidArgument("cannot spread " + std::to_string(transformer_layers_) +
                                   " transformer layers evenly over " + std::to_string(pp) +
                                   " pipeline stages; pp must divide the layer count");
  }
  for (const auto& p : params_) {
    if (p.shard_dim >= 0 && p.global_shape[p.shard_dim] % tp != 0) {
      return Status::InvalidArgument(
          "parameter " + p.name + " of shape " + ShapeString(p.global_shape) + " cannot be split " +
          std::to_string(tp) + " ways on dim " + std::to_string(p.shard_dim) + "; tp must divide " +
          std::to_string(p.global_shape[p.shard_dim]));
    }
  }
  return Status::OK();
}

Result<std::vector<int>> ModelSpec::StagesOf(const ParamSpec& p, int pp) const {
  switch (p.kind) {
    case ParamKind::kTied:
      if (pp == 1) return std::vector<int>{0};
      return std::vector<int>{0, pp - 1};
    case ParamKind::kFinal:
      return std::vector<int>{pp - 1};
    case ParamKind::kLayer: {
      if (transformer_layers_ % pp != 0) {
        return Status::InvalidArgument("pp " + std::to_string(pp) + " does not divide " +
                                       std::to_string(transformer_layers_) + " layers");
      }
      return std::vector<int>{p.layer / (transformer_layers_ / pp)};
    }
    case ParamKind::kOther:
      return std::vector<int>{0};
  }
  return std::vector<int>{0};
}

Result<std::vector<int>> ModelSpec::Stage(int stage, int pp) const {
  std::vector<int> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    ASSIGN_OR_RETURN(std::vector<int> st, StagesOf(params_[i], pp));
    for (int s : st) {
      if (s == stage) {
        out.push_back(static_cast<int>(i));
        break;
      }
    }
  }
  return out;
}

Result<std::map<int, std::vector<int>>> ModelSpec::StageLayers(int stage, int pp) const {
  std::map<int, std::vector<int>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    const ParamSpec& p = params_[i];
    ASSIGN_OR_RETURN(std::vector<int> st, StagesOf(p, pp));
    if (st.empty() || st.front() != stage) continue;
    if (p.layer_index < 0 || p.layer_key.empty()) {
      return Status::InvalidArgument("parameter " + p.name +
                                     " belongs to no PipelineModule layer (names are "
                                     "<layer>.<key> or tied_modules.<module>.<key>); cannot plan "
                                     "layer files for it");
    }
    out[p.layer_index].push_back(static_cast<int>(i));
  }
  return out;
}

Result<std::vector<int>> ModelSpec::StageGroup(int stage, int group, int pp) const {
  ASSIGN_OR_RETURN(std::vector<int> all, Stage(stage, pp));
  std::vector<int> out;
  for (int i : all) {
    if (params_[i].group == group) out.push_back(i);
  }
  return out;
}

Result<std::vector<int64_t>> ModelSpec::ShardShape(const ParamSpec& p, int tp) const {
  std::vector<int64_t> s = p.global_shape;
  if (p.shard_dim >= 0) {
    if (s[p.shard_dim] % tp != 0) {
      return Status::InvalidArgument("parameter " + p.name + " dim " + std::to_string(p.shard_dim) +
                                     " (" + std::to_string(s[p.shard_dim]) +
                                     ") does not split into " + std::to_string(tp) + " shards");
    }
    s[p.shard_dim] /= tp;
  }
  return s;
}

}  // namespace ckptkv::checkpoint
