// DeepSpeed's reshape maps: every worked example of reshape_meg_2d.py and
// reshape_3d_utils.py (DeepSpeed's tests/unit/checkpoint/test_reshape_checkpoint.py
// and the module run by hand), and the errors for reshapes it rejects.
#include <catch2/catch.hpp>

#include "checkpoint/core/tag_layout.h"
#include "checkpoint/core/reshape_maps.h"

using namespace ckptkv::checkpoint;
using V = std::vector<int>;

namespace {

V Data(const Meg2dParallelMap& m, int pp, int tp) { return m.GetData(pp, tp).value(); }

}  // namespace

TEST_CASE("partition_data cuts into equal contiguous chunks", "[unit][checkpoint]") {
  auto p = PartitionData({0, 1, 2, 3, 4, 5}, 3);
  REQUIRE(p.ok());
  CHECK(p.value() == std::vector<V>{{0, 1}, {2, 3}, {4, 5}});
  CHECK(PartitionData({}, 2).value() == std::vector<V>{});
  auto bad = PartitionData({0, 1, 2, 3, 4, 5}, 4);
  REQUIRE(!bad.ok());
  CHECK(bad.status().IsInvalidArgument());
  CHECK_THAT(bad.status().message(), Catch::Contains("valid part counts: 1, 2, 3, 6"));
  CHECK(!PartitionData({0}, 0).ok());
}

TEST_CASE("meg_2d_parallel_map: simple_init, add_data, get_data", "[unit][checkpoint]") {
  Meg2dParallelMap m(2, 4);
  m.SimpleInit();
  for (int i = 0; i < 8; ++i) CHECK(Data(m, i / 4, i % 4) == V{i});
  CHECK(m.GetData().value() == V{0, 1, 2, 3, 4, 5, 6, 7});
  CHECK(m.GetData(1, std::nullopt).value() == V{4, 5, 6, 7});
  CHECK(m.GetData(std::nullopt, 2).value() == V{2, 6});
  REQUIRE(m.AddData(0, 1, {9, 10}).ok());
  CHECK(Data(m, 0, 1) == V{1, 9, 10});
  CHECK(!m.AddData(2, 0, {1}).ok());
  CHECK(!m.GetData(0, 4).ok());
  CHECK(Meg2dParallelMap::Key(1, 3) == "1,3");
  auto cells = m.Cells();
  REQUIRE(cells.size() == 8);
  CHECK((cells[5].pp == 1 && cells[5].tp == 1 && cells[5].indices == V{5}));
  CHECK(Meg2dParallelMap(1, 2).ToString() == "0,0=[] 0,1=[]");
}

TEST_CASE("reshape_meg_2d_parallel: tp4 pp2 -> tp2 pp1 (TP first, then PP)", "[unit][checkpoint]") {
  auto after_tp = ReshapeMeg2dParallel(2, 4, 2, 2);
  REQUIRE(after_tp.ok());
  CHECK(Data(after_tp.value(), 0, 0) == V{0, 1});
  CHECK(Data(after_tp.value(), 0, 1) == V{2, 3});
  CHECK(Data(after_tp.value(), 1, 0) == V{4, 5});
  CHECK(Data(after_tp.value(), 1, 1) == V{6, 7});
  auto m = ReshapeMeg2dParallel(2, 4, 1, 2);
  REQUIRE(m.ok());
  CHECK(m->pp_degree() == 1);
  CHECK(m->tp_degree() == 2);
  CHECK(Data(m.value(), 0, 0) == V{0, 1, 4, 5});
  CHECK(Data(m.value(), 0, 1) == V{2, 3, 6, 7});
  CHECK(m->ToString() == "0,0=[0, 1, 4, 5] 0,1=[2, 3, 6, 7]");
  // Identity.
  auto same = ReshapeMeg2dParallel(2, 2, 2, 2);
  REQUIRE(same.ok());
  Meg2dParallelMap simple(2, 2);
  simple.SimpleInit();
  CHECK(same.value() == simple);
}

TEST_CASE("reshape_meg_2d_parallel: PP is cut per tp column, as DeepSpeed does",
          "[unit][checkpoint]") {
  // pp 3 -> 2 is accepted when TP contraction leaves a column of 6 files:
  // DeepSpeed's partition_data only needs the column to divide.
  auto m = ReshapeMeg2dParallel(3, 2, 2, 1);
  REQUIRE(m.ok());
  CHECK(Data(m.value(), 0, 0) == V{0, 1, 2});
  CHECK(Data(m.value(), 1, 0) == V{3, 4, 5});
}

TEST_CASE("reshape_meg_2d_parallel rejects expansion and uneven splits", "[unit][checkpoint]") {
  auto tp32 = ReshapeMeg2dParallel(1, 3, 1, 2);
  REQUIRE(!tp32.ok());
  CHECK(tp32.status().IsInvalidArgument());
  CHECK_THAT(tp32.status().message(), Catch::Contains("tp 3 -> 2"));
  CHECK_THAT(tp32.status().message(), Catch::Contains("valid target tp degrees: 1, 3"));
  auto grow = ReshapeMeg2dParallel(1, 2, 1, 4);
  REQUIRE(!grow.ok());
  CHECK_THAT(grow.status().message(), Catch::Contains("expansion"));
  auto pp32 = ReshapeMeg2dParallel(3, 1, 2, 1);
  REQUIRE(!pp32.ok());
  CHECK_THAT(pp32.status().message(), Catch::Contains("pp 3 -> 2"));
  CHECK_THAT(pp32.status().message(), Catch::Contains("valid target pp degrees for tp 1: 1, 3"));
  CHECK(!ReshapeMeg2dParallel(2, 2, 4, 1).ok());
  CHECK(!ReshapeMeg2dParallel(0, 2, 1, 1).ok());
}

TEST_CASE("model_3d_desc: world size, validity, can_reshape", "[unit][checkpoint]") {
  Model3dDesc d{2, 4, 2};
  CHECK(d.WorldSize() == 16);
  CHECK(d.Desc() == "PP,TP,DP = (2, 4, 2)");
  CHECK(d.IsValid(1, 3, 1).first);
  auto [ok, errors] = d.IsValid(2, 3, 5);
  CHECK(!ok);
  CHECK(errors == std::vector<std::string>{"PP indexing error: index 2 >= degree 2",
                                           "DP indexing error: index 5 >= degree 2"});
  CHECK(d.CanReshape({1, 1, 1}).first);
  auto [can, why] = d.CanReshape({4, 2, 4});
  CHECK(!can);
  CHECK(why == std::vector<std::string>{"Expansion reshape not supported - PP: 2 ---> 4",
                                        "Expansion reshape not supported - DP: 2 ---> 4"});
}

TEST_CASE("model_3d_desc.reshape: pp2 tp2 dp2 (DeepSpeed's test_reshape_checkpoint)",
          "[unit][checkpoint]") {
  const Model3dDesc src{2, 2, 2};
  SECTION("-> 1/1/1") {
    auto maps = src.Reshape({1, 1, 1});
    REQUIRE(maps.ok());
    REQUIRE(maps->size() == 1);
    CHECK(Data((*maps)[0], 0, 0) == V{0, 4, 1, 5, 2, 6, 3, 7});
  }
  SECTION("-> pp1 tp2 dp1") {
    auto maps = src.Reshape({1, 2, 1});
    REQUIRE(maps.ok());
    REQUIRE(maps->size() == 1);
    CHECK(Data((*maps)[0], 0, 0) == V{0, 4, 2, 6});
    CHECK(Data((*maps)[0], 0, 1) == V{1, 5, 3, 7});
  }
  SECTION("-> pp1 tp2 dp2") {
    auto maps = src.Reshape({1, 2, 2});
    REQUIRE(maps.ok());
    REQUIRE(maps->size() == 2);
    CHECK(Data((*maps)[0], 0, 0) == V{0, 4});
    CHECK(Data((*maps)[0], 0, 1) == V{1, 5});
    CHECK(Data((*maps)[1], 0, 0) == V{2, 6});
    CHECK(Data((*maps)[1], 0, 1) == V{3, 7});
  }
  SECTION("-> pp2 tp1 dp1") {
    auto maps = src.Reshape({2, 1, 1});
    REQUIRE(maps.ok());
    REQUIRE(maps->size() == 1);
    CHECK(Data((*maps)[0], 0, 0) == V{0, 4, 1, 5});
    CHECK(Data((*maps)[0], 1, 0) == V{2, 6, 3, 7});
  }
  SECTION("identity: each rank its own zero file dp * 4 + mp") {
    auto maps = src.Reshape(src);
    REQUIRE(maps.ok());
    REQUIRE(maps->size() == 2);
    for (int dp = 0; dp < 2; ++dp) {
      for (int pp = 0; pp < 2; ++pp) {
        for (int tp = 0; tp < 2; ++tp) CHECK(Data((*maps)[dp], pp, tp) == V{dp * 4 + pp * 2 + tp});
      }
    }
  }
}

TEST_CASE("model_3d_desc.reshape: pp2 tp4 dp2", "[unit][checkpoint]") {
  const Model3dDesc src{2, 4, 2};
  auto one = src.Reshape({1, 2, 1});
  REQUIRE(one.ok());
  REQUIRE(one->size() == 1);
  CHECK(Data((*one)[0], 0, 0) == V{0, 8, 1, 9, 4, 12, 5, 13});
  CHECK(Data((*one)[0], 0, 1) == V{2, 10, 3, 11, 6, 14, 7, 15});
  // Target DP slices are carved from the flattened (mp, dp) list, not by old
  // dp: dp0 takes stage-0 files, dp1 stage-1 files.
  auto two = src.Reshape({1, 2, 2});
  REQUIRE(two.ok());
  REQUIRE(two->size() == 2);
  CHECK(Data((*two)[0], 0, 0) == V{0, 8, 1, 9});
  CHECK(Data((*two)[0], 0, 1) == V{2, 10, 3, 11});
  CHECK(Data((*two)[1], 0, 0) == V{4, 12, 5, 13});
  CHECK(Data((*two)[1], 0, 1) == V{6, 14, 7, 15});
}

TEST_CASE("model_3d_desc.reshape rejects what DeepSpeed rejects", "[unit][checkpoint]") {
  auto grow = Model3dDesc{1, 2, 2}.Reshape({1, 2, 4});
  REQUIRE(!grow.ok());
  CHECK(grow.status().IsInvalidArgument());
  CHECK_THAT(grow.status().message(),
             Catch::Contains("Expansion reshape not supported - DP: 2 ---> 4"));
  // dp 3 -> 2 with nothing else merged: 3 files per cell cannot be halved.
  auto dp32 = Model3dDesc{1, 1, 3}.Reshape({1, 1, 2});
  REQUIRE(!dp32.ok());
  CHECK_THAT(dp32.status().message(), Catch::Contains("DP 3 -> 2"));
  CHECK_THAT(dp32.status().message(), Catch::Contains("valid part counts: 1, 3"));
  // ... but it works when TP contraction doubles the list (6 files per cell).
  auto ok = Model3dDesc{1, 2, 3}.Reshape({1, 1, 2});
  REQUIRE(ok.ok());
  CHECK(Data((*ok)[0], 0, 0) == V{0, 2, 4});
  CHECK(Data((*ok)[1], 0, 0) == V{1, 3, 5});
  auto tp = Model3dDesc{1, 3, 1}.Reshape({1, 2, 1});
  REQUIRE(!tp.ok());
  CHECK_THAT(tp.status().message(), Catch::Contains("valid target tp degrees: 1, 3"));
}

TEST_CASE("get_zero_files: first prefix with files, numeric (dp, mp) order", "[unit][checkpoint]") {
  const std::vector<std::string> files = {
      "mp_rank_01_model_states.pt",
      "zero_pp_rank_10_mp_rank_00_optim_states.pt",
      "zero_pp_rank_2_mp_rank_01_optim_states.pt",
      "zero_pp_rank_2_mp_rank_00_optim_states.pt",
      "zero_pp_rank_0_mp_rank_00_model_states.pt",
      "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
      "mp_rank_00_model_states.pt",
  };
  CHECK(GetZeroFiles(files) ==
        std::vector<std::string>{"zero_pp_rank_2_mp_rank_00_optim_states.pt",
                                 "zero_pp_rank_2_mp_rank_01_optim_states.pt",
                                 "zero_pp_rank_10_mp_rank_00_optim_states.pt"});
  CHECK(GetZeroFiles({"bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                      "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"}) ==
        std::vector<std::string>{"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                 "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"});
  auto c = ClassifyFiles(files);
  CHECK(c.model ==
        std::vector<std::string>{"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"});
  CHECK(c.zero_model == std::vector<std::string>{"zero_pp_rank_0_mp_rank_00_model_states.pt"});
  CHECK(c.zero.size() == 3);
  // Lexicographic, as DeepSpeed's get_files_with_prefix sorts.
  CHECK(GetFilesWithPrefix({"a/mp_rank_10_model_states.pt", "a/mp_rank_100_model_states.pt",
                            "layer_01-model_00-model_states.pt"},
                           "mp_rank_") ==
        std::vector<std::string>{"a/mp_rank_100_model_states.pt", "a/mp_rank_10_model_states.pt"});
}
