// A realistic synthetic DeepSpeed checkpoint: a GPT model (Megatron-
// DeepSpeed GPTModelPipe names) at a chosen (tp, pp, dp), ZeRO stage and
// dtype, written into a store as one tag.
//
// Every value is a function of (seed, parameter, state, global element
// index) only, so the global tensors do not depend on the layout: a tag
// synthesized at one layout and reshaped to another equals, bit for bit, the
// tag synthesized at the other. Rows of the embedding beyond the original
// vocabulary (Megatron's padding) are zero. The training weights are the
// fp32 master weights rounded to bf16 (or equal to them in fp32).
#ifndef CKPTKV_CHECKPOINT_QUERY_SYNTH_H_
#define CKPTKV_CHECKPOINT_QUERY_SYNTH_H_

#include <cstdint>
#include <string>

#include "checkpoint/query/fragments.h"
#include "checkpoint/query/layout.h"
#include "checkpoint/query/writer.h"

namespace ckptkv::checkpoint {

struct SynthOptions {
  GptConfig model;
  TrainLayout layout;
  uint64_t seed = 1;
  int64_t iteration = 1000;
};

class SynthSource : public FragmentSource {
 public:
  SynthSource(const ModelSpec& spec, const GptConfig& model, uint64_t seed);
  Status Fill(const std::string& param, const std::string& state, const Rect& rect,
              at::Tensor out) override;

 private:
  const ModelSpec& spec_;
  GptConfig model_;
  uint64_t seed_;
};

// The metadata of a synthetic checkpoint (iteration, args, ds_config, ...).
CheckpointMeta SynthMeta(const SynthOptions& options);

Result<WriteReport> Synth(Store& store, const std::string& tag, const SynthOptions& options,
                          const WriteOptions& write);

}  // namespace ckptkv::checkpoint

#endif  // CKPTKV_CHECKPOINT_QUERY_SYNTH_H_
