// The parameters of a sharded model: global shapes, how tensor parallelism
// splits each one, which ZeRO parameter group it belongs to and which
// pipeline stage holds it.
//
// Names follow Megatron-DeepSpeed's GPTModelPipe: `tied_modules.embed.*`
// (the embedding, held by the first and the last stage), `<i>.<sub>.<name>`
// for transformer layer i, `<i>.weight` / `<i>.bias` for the final norm.
// Transformer layers are spread evenly over the pipeline stages in index
// order, as PipelineModule's "type:transformer" partitioning does.
#ifndef CKPTKV_CHECKPOINT_CORE_MODEL_SPEC_H_
#define CKPTKV_CHECKPOINT_CORE_MODEL_SPEC_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "store/names.h"
#include "store/status.h"

namespace ckptkv::checkpoint {

// Partition dimension by parameter name: the first rule whose regex matches
// (std::regex_search) decides; -1 means replicated on every TP rank.
struct ShardingRule {
  std::string pattern;
  int dim = 0;
};

class ShardingRules {
 public:
  // Megatron defaults: layer norms, biases of row-parallel layers and
  // position embeddings replicated; row-parallel weights (attention output,
  // MLP 4h->h) split on dim 1; everything else on dim 0.
  static ShardingRules MegatronDefaults();
  // Rules in "REGEX=DIM" lines (DIM -1 = replicated), default dim last.
  static Result<ShardingRules> Parse(const std::string& text, int default_dim = 0);
  int DimFor(const std::string& name) const;
  const std::vector<ShardingRule>& rules() const { return rules_; }

 private:
  std::vector<ShardingRule> rules_;
  int default_dim_ = 0;
};

enum class ParamKind { kTied, kLayer, kFinal, kOther };

struct ParamSpec {
  std::string name;
  std::vector<int64_t> global_shape;
  int shard_dim = -1;  // -1: replicated across TP
  int group = 0;       // ZeRO / optimizer parameter group
  ParamKind kind = ParamKind::kOther;
  int layer = -1;  // kLayer: ordinal among transformer layers
  bool vocab = false;
  // Where PipelineModule saves it: the layer index of its
  // layer_XX-model_YY-model_states.pt file and its key in that file's
  // state dict; -1 when the name places it in no layer. `<i>.<key>` is
  // layer i; a tied module's `tied_modules.<m>.<key>` is saved with the
  // layer that first uses the module (GPTModelPipe's embedding: layer 1;
  // without a recorded index, the layer before the first numbered one).
  int layer_index = -1;
  std::string layer_key;
};

struct GptConfig {
  int layers = 4;
  int64_t hidden = 256;
  int64_t vocab = 1000;           // original vocabulary
  int64_t vocab_multiple = 1024;  // padded vocab = vocab rounded up to this
  int64_t max_positions = 512;
  int64_t padded_vocab() const {
    return (vocab + vocab_multiple - 1) / vocab_multiple * vocab_multiple;
  }
};

class ModelSpec {
 public:
  // GPTModelPipe with two optimizer groups (weight decay: matrices and
  // embeddings; no weight decay: biases and norms), in module order.
  static ModelSpec Gpt(const GptConfig& config, const ShardingRules& rules);
  // From parameter names in module order, their global shapes and groups.
  static ModelSpec FromParams(std::vector<ParamSpec> params);

  const std::vector<ParamSpec>& params() const { return params_; }
  const ParamSpec* Find(const std::string& name) const;
  int transformer_layers() const { return transformer_layers_; }
  int groups() const;
  // Stages that hold a parameter for a pipeline degree.
  Result<std::vector<int>> StagesOf(const ParamSpec& p, int pp) const;
  // Parameter indices of one stage and group, in module order.
  Result<std::vector<int>> StageGroup(int stage, int group, int pp) const;
  // Global parameter indices held by a stage, in module order.
  Result<std::vector<int>> Stage(int stage, int pp) const;
  // Shape of each TP rank's shard (fragments' ShardRect places it).
  Result<std::vector<int64_t>> ShardShape(const ParamSpec& p, int tp) const;
  // Checks that every parameter splits evenly for tp and layers for pp.
  Status CheckLayout(int tp, int pp) const;
  // The PipelineModule layer files a stage saves: layer index -> the
  // parameters (indices, module order) of that layer file. A layer's file
  // is saved by the first stage holding its parameters (a tied module's
  // only by the first of its stages). InvalidArgument naming a parameter
  // that belongs to no layer.
  Result<std::map<int, std::vector<int>>> StageLayers(int stage, int pp) const;

 private:
  void Index();
  std::vector<ParamSpec> params_;
  std::map<std::string, int> by_name_;
  int transformer_layers_ = 0;
};

int64_t Numel(const std::vector<int64_t>& shape);
// "[2, 3]" (store/names.h).
using ::ckptkv::ShapeString;

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_CORE_MODEL_SPEC_H_
