// The files DeepSpeed writes for a model at a (tp, pp, dp) layout and ZeRO
// stage, planned before any tensor byte exists.
//
// PlanFiles returns, for every file, its state dict with the names, keys and
// nesting DeepSpeed uses (see docs/fragments.md): tensors that hold model
// data are meta-device placeholders, each with the Placement that says
// which fragment of which global tensor it is; the small tensors that are
// not fragments (optimizer steps) are real. A writer then fills every
// placeholder from a FragmentSource, one tensor at a time.
#ifndef CKPTKV_CHECKPOINT_QUERY_LAYOUT_H_
#define CKPTKV_CHECKPOINT_QUERY_LAYOUT_H_

#include <ATen/core/ivalue.h>

#include <map>
#include <string>
#include <vector>

#include "checkpoint/core/model_spec.h"
#include "checkpoint/core/zero_layout.h"
#include "store/store.h"

namespace ckptkv::checkpoint {

// How the model's weights are saved: in the `module` of the mp_rank files
// (DeepSpeedEngine), or, as PipelineModule saves them, one file per layer
// and TP rank with the layer's own state dict and `module` None in the
// mp_rank files: layer_XX-model_YY-model_states.pt (a topology with a
// model axis, as Megatron-DeepSpeed's) or layer_XX-model_states.pt (no
// model axis; tp 1 only, a wider TP gets the model axis).
enum class LayerFiles { kNone, kModelAxis, kNoModelAxis };

// A training run's layout: the store's Layout (the degrees and ZeRO stage a
// commit records; DeepSpeed's Model3dDesc is its (pp, tp, dp)), the
// training dtype and where the weights are saved.
// TrainLayout{tp, pp, dp, zero_stage, bf16, layer_files}.
struct TrainLayout : Layout {
  bool bf16 = true;  // training weights in bf16 (else fp32), bf16_ file prefix
  LayerFiles layer_files = LayerFiles::kNone;

  TrainLayout(int tp = 1, int pp = 1, int dp = 1, int zero_stage = 2, bool bf16 = true,
              LayerFiles layer_files = LayerFiles::kNone)
      : Layout{tp, pp, dp, zero_stage}, bf16(bf16), layer_files(layer_files) {}
  // What a commit records (everything but the dtype).
  const Layout& stored() const { return *this; }
  std::string ToString() const;
};

// What every file of a checkpoint carries besides its fragments.
struct CheckpointMeta {
  // Top-level keys of model-state files after DeepSpeed's own (lr_scheduler,
  // global_steps, ds_config, client state such as iteration and args), in
  // order. dp_world_size, mp_world_size and checkpoint_parallel_dimensions
  // are replaced with the layout's values.
  c10::impl::GenericDict model_extra{c10::StringType::get(), c10::AnyType::get()};
  // Optimizer-file values: loss_scaler, dynamic_loss_scale, overflow,
  // clip_grad (copied into every ZeRO file) ...
  c10::impl::GenericDict zero_extra{c10::StringType::get(), c10::AnyType::get()};
  // ... the inner optimizer's param_groups without "params", and the step
  // of each group.
  std::vector<c10::IValue> param_groups;
  std::vector<at::Tensor> steps;
  c10::IValue ds_config;
  std::string ds_version = "0.16.5";
};

struct PlannedFile {
  std::string name;
  c10::IValue state;
  std::map<const c10::TensorImpl*, Placement> placements;
};

// With layout.layer_files, each stage's layer files (in layer order) come
// before its mp_rank files, as PipelineModule saves them; ZeRO-3 with layer
// files is refused (DeepSpeed's pipeline engine does not run ZeRO-3).
// REQUIRES: spec.CheckLayout(layout.tp, layout.pp) is OK.
Result<std::vector<PlannedFile>> PlanFiles(const ModelSpec& spec, const TrainLayout& layout,
                                           const CheckpointMeta& meta);

// The placement of TP rank `tp_rank`'s shard of `p` at TP degree `tp`:
// state "param", "placeholder" (ZeRO-3's empty module tensors) or an
// optimizer state name.
Placement ShardPlacement(const ParamSpec& p, int tp_rank, int tp, const std::string& state);

// The placement of one rank's flat ZeRO buffer of parameter group `group`,
// `numel` elements long, whose parameters in buffer order are `names`
// (stage 1/2: the buffer sits at dp_rank * partition_size of the group's
// flat buffer; stage 3: each rank's buffer is its own).
Placement FlatPlacement(const std::vector<std::string>& names, const FlatLayout& fl, int group,
                        int dp_rank, int tp_rank, int tp, int zero_stage, const std::string& state,
                        int64_t numel);

// A meta-device tensor standing for a stored tensor of this shape and type.
at::Tensor Placeholder(const std::vector<int64_t>& shape, c10::ScalarType dtype);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_LAYOUT_H_
