// A small store with known contents for the kv-browser tests, written
// through the public Store API (no LibTorch): three tags, two files, state
// trees with non-tensor state, tensors of several dtypes, multi-chunk
// tensors, a changed chunk, an added, a removed and a reshaped parameter.
//
//   step1  mp_rank_00_model_states.pt:
//            module/embed.weight        bfloat16 [256, 16]  (2 chunks, frozen)
//            module/layers.{0,1}.weight float32 [64, 32]    (2 chunks each)
//            module/layers.{0,1}.bias   float32 [32]        (inline)
//            module/special             float32 [8]  {nan, inf, 0, 0, 1, -1, 2, 3}
//            module/steps               int64   [4]  {1, 2, 3, 4}
//          zero_pp_rank_1_mp_rank_00_optim_states.pt:
//            optimizer/state/0/exp_avg  float32 [1024]      (1 chunk)
//          state: iteration 100, args {lr 0.001, name "tiny"}, ds_config
//   step2  as step1, but layers.1.weight elements 5 (+1.0) and 2000 (+0.5)
//          changed, module/special removed, module/head.weight float16 [4]
//          {1, 0.5, -2, 65504} added, module/steps reshaped to [2, 2];
//          iteration 200.
//   step3  the tensors of step2 again; iteration 300. latest = step3.
#ifndef CKPTKV_TESTS_TOOLS_KV_BROWSER_FIXTURE_H_
#define CKPTKV_TESTS_TOOLS_KV_BROWSER_FIXTURE_H_

#include <string>
#include <vector>

#include "store/status.h"

namespace ckptkv::testing {

inline constexpr uint32_t kFixtureChunk = 4096;
inline constexpr const char* kModelFile = "mp_rank_00_model_states.pt";
inline constexpr const char* kOptimFile = "zero_pp_rank_1_mp_rank_00_optim_states.pt";

// Values of module/layers.<layer>.weight in step1 (64 x 32, row-major).
std::vector<float> LayerWeight(int layer);
// module/embed.weight as float (the stored bfloat16 values, exactly).
std::vector<float> EmbedWeight();
// optimizer/state/0/exp_avg.
std::vector<float> ExpAvg();

// Writes the store described above into `dir` (a new directory).
Status WriteFixtureStore(const std::string& dir);

}  // namespace ckptkv::testing

#endif  // CKPTKV_TESTS_TOOLS_KV_BROWSER_FIXTURE_H_
