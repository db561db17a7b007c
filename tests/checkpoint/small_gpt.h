// The GPT the checkpoint tests synthesize: small enough to write in
// milliseconds, with every kind of parameter (tied embedding, padded
// vocabulary, column- and row-parallel weights, replicated norms).
#ifndef CKPTKV_TESTS_CHECKPOINT_SMALL_GPT_H_
#define CKPTKV_TESTS_CHECKPOINT_SMALL_GPT_H_

#include "checkpoint/core/model_spec.h"

namespace ckptkv::testing {

inline checkpoint::GptConfig SmallGpt() {
  checkpoint::GptConfig c;
  c.layers = 4;
  c.hidden = 64;
  c.vocab = 1000;
  c.vocab_multiple = 128;
  c.max_positions = 32;
  return c;
}

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_CHECKPOINT_SMALL_GPT_H_
