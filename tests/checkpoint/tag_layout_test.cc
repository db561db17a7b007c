// checkpoint/core/tag_layout: the one reading of what a model file records
// about its layout, and the files of a tag by rank.
#include "checkpoint/core/tag_layout.h"

#include <catch2/catch.hpp>

using namespace ckptkv;
using namespace ckptkv::checkpoint;

TEST_CASE("ParallelDims: checkpoint_parallel_dimensions is both degrees >= 1, or absent",
          "[unit][checkpoint]") {
  SavedDims none;
  auto absent = ParallelDims(none);
  REQUIRE(absent.ok());
  CHECK_FALSE(absent->has_value());

  SavedDims ok;
  ok.has_parallel_dims = true;
  ok.pp_degree = 2;
  ok.tp_degree = 4;
  auto both = ParallelDims(ok);
  REQUIRE(both.ok());
  CHECK(**both == std::make_pair(2, 4));

  for (auto [pp, tp] : std::vector<std::pair<std::optional<int64_t>, std::optional<int64_t>>>{
           {std::nullopt, 2}, {2, std::nullopt}, {0, 2}, {2, -1}, {int64_t{1} << 40, 1}}) {
    SavedDims bad;
    bad.has_parallel_dims = true;
    bad.pp_degree = pp;
    bad.tp_degree = tp;
    auto r = ParallelDims(bad);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsInvalidArgument());
    CHECK_THAT(r.status().message(), Catch::Contains("pp_degree: int >= 1, tp_degree: int >= 1"));
  }
}

TEST_CASE("SavedTpDegree: tp_degree, else mp_world_size, else 1", "[unit][checkpoint]") {
  SavedDims d;
  CHECK(SavedTpDegree(d).value() == 1);
  d.mp_world_size = 4;
  CHECK(SavedTpDegree(d).value() == 4);
  d.mp_world_size = 0;  // not a degree: ignored
  CHECK(SavedTpDegree(d).value() == 1);
  d.has_parallel_dims = true;
  d.pp_degree = 2;
  d.tp_degree = 8;
  d.mp_world_size = 16;
  CHECK(SavedTpDegree(d).value() == 8);
  d.tp_degree = std::nullopt;
  CHECK(SavedTpDegree(d).status().IsInvalidArgument());
}

TEST_CASE("SavedDpDegree: dp_world_size when it is a degree", "[unit][checkpoint]") {
  SavedDims d;
  CHECK_FALSE(SavedDpDegree(d).has_value());
  for (int64_t bad : {int64_t{0}, int64_t{-3}, int64_t{1} << 40}) {
    d.dp_world_size = bad;
    CHECK_FALSE(SavedDpDegree(d).has_value());
  }
  d.dp_world_size = 4;
  CHECK(SavedDpDegree(d) == 4);
}

TEST_CASE("ClassifyFiles: top-level files by rank, the universal optimizer file by name",
          "[unit][checkpoint]") {
  const auto c = ClassifyFiles({
      "mp_rank_01_model_states.pt",
      "mp_rank_00_model_states.pt",
      "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
      "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt",
      "sub/mp_rank_02_model_states.pt",
      "zero/optimizer_state.pt",
      "zero/w/step.pt",
      "zero/w/fp32.pt",
  });
  CHECK(c.model_by_mp ==
        std::map<int, std::string>{{0, "mp_rank_00_model_states.pt"},
                                   {1, "mp_rank_01_model_states.pt"}});  // not sub/
  CHECK(c.all_model ==
        std::vector<std::string>{"mp_rank_01_model_states.pt", "mp_rank_00_model_states.pt"});
  CHECK(c.optim_by_rank == std::map<std::pair<int, int>, std::string>{
                               {{0, 1}, "bf16_zero_pp_rank_0_mp_rank_01_optim_states.pt"},
                               {{1, 0}, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"}});
  CHECK(c.universal_optim == "zero/optimizer_state.pt");

  // ZeRO-3: dp rank 0's model file stands for each MP rank.
  const auto z3 = ClassifyFiles(
      {"zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"});
  CHECK(z3.model_by_mp ==
        std::map<int, std::string>{{0, "zero_pp_rank_0_mp_rank_00_model_states.pt"}});
  CHECK(z3.all_model.size() == 2);
}
