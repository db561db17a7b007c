// DeepSpeed file names: generation matches DeepSpeed's spelling and parsing
// recovers the rank coordinates.
#include <catch2/catch.hpp>

#include "checkpoint/core/file_names.h"

using namespace ckptkv::checkpoint;

TEST_CASE("file names are spelled as DeepSpeed spells them", "[unit][checkpoint]") {
  CHECK(ModelFileName(0) == "mp_rank_00_model_states.pt");
  CHECK(ModelFileName(7) == "mp_rank_07_model_states.pt");
  CHECK(ModelFileName(123) == "mp_rank_123_model_states.pt");
  CHECK(ZeroOptimFileName(12, 3) == "zero_pp_rank_12_mp_rank_03_optim_states.pt");
  CHECK(ZeroOptimFileName(0, 0, true) == "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt");
  CHECK(ZeroModelFileName(5, 1) == "zero_pp_rank_5_mp_rank_01_model_states.pt");
  CHECK(LayerFileName(3, 1) == "layer_03-model_01-model_states.pt");
  CHECK(LayerFileName(105, std::nullopt) == "layer_105-model_states.pt");
}

TEST_CASE("file names parse back into rank coordinates", "[unit][checkpoint]") {
  for (int dp : {0, 3, 17}) {
    for (int mp : {0, 5, 12}) {
      for (bool bf16 : {false, true}) {
        auto c = ParseFileName(ZeroOptimFileName(dp, mp, bf16));
        REQUIRE(c);
        CHECK(c->kind == FileKind::kOptimStates);
        CHECK(c->dp_rank == dp);
        CHECK(c->mp_rank == mp);
        CHECK(c->prefix == (bf16 ? "bf16_" : ""));
      }
      auto z = ParseFileName(ZeroModelFileName(dp, mp));
      REQUIRE(z);
      CHECK(z->kind == FileKind::kZeroModelStates);
      CHECK((z->dp_rank == dp && z->mp_rank == mp));
    }
  }
  auto m = ParseFileName("ckpt/global_step10/mp_rank_05_model_states.pt");
  REQUIRE(m);
  CHECK(m->kind == FileKind::kModelStates);
  CHECK(m->mp_rank == 5);
  CHECK(PpOfMp(5, 4) == 1);
  CHECK(TpOfMp(5, 4) == 1);
  CHECK(MpRank(1, 1, 4) == 5);
  // Both layer spellings (PipelineModule "-model_states", utils "_model_states").
  for (const char* name :
       {"layer_07-model_02-model_states.pt", "layer_07-model_02_model_states.pt"}) {
    auto l = ParseFileName(name);
    REQUIRE(l);
    CHECK(l->kind == FileKind::kLayer);
    CHECK((l->layer == 7 && l->tp_rank == 2));
  }
  auto moe = ParseFileName("layer_3_expert_11_mp_rank_00_model_states.pt");
  REQUIRE(moe);
  CHECK((moe->kind == FileKind::kExpert && moe->moe_layer == 3 && moe->expert == 11));
  auto expp = ParseFileName("expp_rank_2_mp_rank_01_optim_states.pt");
  REQUIRE(expp);
  CHECK((expp->kind == FileKind::kExpertOptim && expp->ep_rank == 2 && expp->mp_rank == 1));
  // Legacy ZeRO name without the underscore before optim_states.
  CHECK(ParseFileName("zero_pp_rank_1_mp_rank_00optim_states.pt"));
  CHECK(!ParseFileName("model.safetensors"));
  CHECK(!ParseFileName("mp_rank_xx_model_states.pt"));
  CHECK(!ParseFileName("mp_rank_99999999999999999999_model_states.pt"));
}
