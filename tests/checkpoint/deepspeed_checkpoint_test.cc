// DeepSpeed's merge_state, ZeROCheckpoint and DeepSpeedCheckpoint over
// small hand-built DeepSpeed-shaped tags saved through KvCheckpointEngine:
// merged tensors equal at::cat of the inputs in DeepSpeed's file order,
// paddings are stripped, and DeepSpeed's quirks hold (keys only in the
// first dict dropped, scalars from the first file).
#include <ATen/ATen.h>

#include <catch2/catch.hpp>
#include <memory>
#include <string>
#include <vector>

#include "checkpoint/deepspeed/deepspeed_checkpoint.h"
#include "checkpoint/core/tag_layout.h"
#include "checkpoint/core/file_names.h"
#include "checkpoint/deepspeed/merge_state.h"
#include "checkpoint/deepspeed/naive_reshape.h"
#include "checkpoint/core/state_view.h"
#include "checkpoint/deepspeed/zero_checkpoint.h"
#include "engine/kv_checkpoint_engine.h"
#include "tests/test_util.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;
using ckptkv::testing::TempDir;

namespace {

using Dict = c10::impl::GenericDict;

Dict StrDict() { return Dict(c10::StringType::get(), c10::AnyType::get()); }
Dict IntDict() { return Dict(c10::IntType::get(), c10::AnyType::get()); }

c10::impl::GenericList AnyList(std::vector<c10::IValue> items) {
  c10::impl::GenericList l(c10::AnyType::get());
  for (auto& i : items) l.push_back(std::move(i));
  return l;
}

c10::IValue At(const c10::IValue& v, const std::vector<std::string>& path) {
  c10::IValue cur = v;
  for (const auto& p : path) {
    if (cur.isGenericDict()) {
      auto d = cur.toGenericDict();
      auto it = d.find(c10::IValue(p));
      if (it == d.end()) it = d.find(c10::IValue(static_cast<int64_t>(std::stoll(p))));
      REQUIRE(it != d.end());
      cur = it->value();
    } else {
      REQUIRE(cur.isList());
      cur = cur.toListRef().at(std::stoul(p));
    }
  }
  return cur;
}

bool Has(const c10::IValue& dict, const std::string& key) {
  auto d = dict.toGenericDict();
  return d.find(c10::IValue(key)) != d.end();
}

at::Tensor T(const c10::IValue& v) {
  REQUIRE(v.isTensor());
  return v.toTensor();
}

bool Equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.dtype() == b.dtype() && at::equal(a, b);
}

// A distinct, recognizable tensor per (seed, shape).
at::Tensor Fill(double seed, at::IntArrayRef shape) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  return (at::arange(n, at::kFloat) + seed * 1000).reshape(shape);
}

// A DeepSpeed-shaped store: files saved through the engine into one tag.
class TagBuilder {
 public:
  explicit TagBuilder(const std::string& dir) : dir_(dir) {
    KvEngineConfig config;
    config.db = dir;
    engine_ = std::make_unique<KvCheckpointEngine>(config);
    engine_->makedirs(dir, true);
  }
  void Begin(const std::string& tag) {
    tag_ = tag;
    engine_->create(dir_, tag);
  }
  void Save(const std::string& file, const c10::IValue& state) {
    engine_->save(state, dir_ + "/" + tag_ + "/" + file);
  }
  void Commit() { engine_->commit(tag_); }
  Store& store() { return *engine_->store(); }
  KvCheckpointEngine& engine() { return *engine_; }

 private:
  std::string dir_;
  std::string tag_;
  std::unique_ptr<KvCheckpointEngine> engine_;
};

constexpr int64_t kHidden = 4;
constexpr int64_t kVocab = 8;
constexpr int64_t kSeq = 3;
constexpr int kLayers = 2;  // transformer layers 2, 3; final norm 5 (L + 3)

// An mp_rank file of a Megatron GPTModelPipe run at (pp, tp) with 2 stages
// at most: stage 0 holds the embedding and layer 2, the last stage layer 3,
// the final norm and the tied embedding.
c10::IValue ModelState(int pp_rank, int tp_rank, int pp, int tp, bool with_dims = true,
                       std::optional<std::pair<int, int>> dims_override = std::nullopt) {
  const double seed = 10 * (pp_rank * tp + tp_rank + 1);
  Dict module = StrDict();
  auto embed = [&] {
    module.insert("tied_modules.embed.word_embeddings.weight",
                  Fill(seed + 1, {kVocab / tp, kHidden}));
    module.insert("tied_modules.embed.position_embeddings.weight", Fill(seed + 2, {kSeq, kHidden}));
  };
  auto layer = [&](int i) {
    const std::string p = std::to_string(i) + ".";
    module.insert(p + "input_layernorm.weight", Fill(seed + 3 + i, {kHidden}));
    module.insert(p + "self_attention.query_key_value.weight",
                  Fill(seed + 4 + i, {3 * kHidden / tp, kHidden}));
    module.insert(p + "self_attention.dense.weight", Fill(seed + 5 + i, {kHidden, kHidden / tp}));
    module.insert(p + "mlp.dense_h_to_4h.weight", Fill(seed + 6 + i, {4 * kHidden / tp, kHidden}));
    module.insert(p + "mlp.dense_4h_to_h.weight", Fill(seed + 7 + i, {kHidden, 4 * kHidden / tp}));
  };
  const bool first = pp_rank == 0, last = pp_rank == pp - 1;
  if (first) embed();
  for (int i = 2; i < 2 + kLayers; ++i) {
    const int stage = pp == 1 ? 0 : (i - 2) * pp / kLayers;
    if (stage == pp_rank) layer(i);
  }
  if (last) {
    module.insert(std::to_string(kLayers + 3) + ".weight", Fill(seed + 9, {kHidden}));
    if (!first) embed();
  }
  Dict sd = StrDict();
  sd.insert("module", module);
  sd.insert("buffer_names", AnyList({}));
  sd.insert("optimizer", c10::IValue());
  sd.insert("global_steps", static_cast<int64_t>(100 + pp_rank * tp + tp_rank));
  sd.insert("dp_world_size", static_cast<int64_t>(2));
  sd.insert("mp_world_size", static_cast<int64_t>(pp * tp));
  if (with_dims) {
    Dict dims = StrDict();
    auto d = dims_override.value_or(std::make_pair(pp, tp));
    dims.insert("pp_degree", static_cast<int64_t>(d.first));
    dims.insert("tp_degree", static_cast<int64_t>(d.second));
    sd.insert("checkpoint_parallel_dimensions", dims);
  }
  sd.insert("ds_version", std::string("0.19.6"));
  sd.insert("iteration", static_cast<int64_t>(100));
  Dict args = StrDict();
  args.insert("num_layers", static_cast<int64_t>(kLayers));
  args.insert("hidden_size", kHidden);
  args.insert("lr", 1e-3);
  sd.insert("args", args);
  if (pp_rank == 0 && tp_rank == 0) sd.insert("only_in_first", static_cast<int64_t>(7));
  return sd;
}

constexpr int64_t kPartition = 6;

// Padding of a zero file: the last DP rank of each MP rank pads 2 elements.
int64_t PaddingOf(int dp_rank, int dp) { return dp_rank == dp - 1 ? 2 : 0; }

double ZeroSeed(int dp_rank, int mp_rank) { return 100 + 10 * dp_rank + mp_rank; }

// A ZeRO-2 optimizer file (one param group) of (dp_rank, mp_rank).
c10::IValue ZeroState(int dp_rank, int mp_rank, int dp) {
  const double seed = ZeroSeed(dp_rank, mp_rank);
  const int64_t pad = PaddingOf(dp_rank, dp);
  Dict group = StrDict();
  group.insert("step", static_cast<int64_t>(50 + dp_rank));
  group.insert("exp_avg", Fill(seed + 0.1, {kPartition}));
  group.insert("exp_avg_sq", Fill(seed + 0.2, {kPartition}));
  Dict state = IntDict();
  state.insert(static_cast<int64_t>(0), group);
  Dict pg = StrDict();
  pg.insert("lr", 1e-3);
  pg.insert("params", c10::List<int64_t>({0}));
  Dict base = StrDict();
  base.insert("state", state);
  base.insert("param_groups", AnyList({pg}));
  Dict frag = StrDict();
  Dict mappings = StrDict();
  // Each DP rank holds a different param first: "p<dp>" plus the shared "w".
  Dict own = StrDict();
  own.insert("start", static_cast<int64_t>(0));
  own.insert("numel", static_cast<int64_t>(2));
  mappings.insert("p" + std::to_string(dp_rank), own);
  Dict shared = StrDict();
  shared.insert("start", static_cast<int64_t>(2 + dp_rank));
  shared.insert("numel", kPartition - 2 - pad);
  mappings.insert("w", shared);
  Dict osd = StrDict();
  osd.insert("dynamic_loss_scale", false);
  osd.insert("overflow", false);
  osd.insert("clip_grad", 1.0);
  osd.insert("base_optimizer_state", base);
  osd.insert("single_partition_of_fp32_groups", AnyList({Fill(seed + 0.3, {kPartition - pad})}));
  osd.insert("zero_stage", static_cast<int64_t>(2));
  osd.insert("group_paddings", c10::List<int64_t>({pad}));
  osd.insert("partition_count", c10::List<int64_t>({dp}));
  osd.insert("ds_version", std::string("0.19.6"));
  osd.insert("param_slice_mappings", AnyList({mappings}));
  Dict sd = StrDict();
  sd.insert("optimizer_state_dict", osd);
  Dict config = StrDict();
  config.insert("train_batch_size", static_cast<int64_t>(8));
  sd.insert("ds_config", config);
  sd.insert("ds_version", std::string("0.19.6"));
  sd.insert("param_shapes", AnyList({}));
  return sd;
}

// A tag at (pp, tp, dp) with mp_rank and zero files.
void BuildTag(TagBuilder& b, const std::string& tag, int pp, int tp, int dp,
              bool with_dims = true) {
  b.Begin(tag);
  for (int p = 0; p < pp; ++p) {
    for (int t = 0; t < tp; ++t) {
      b.Save(ModelFileName(MpRank(p, t, tp)), ModelState(p, t, pp, tp, with_dims));
    }
  }
  for (int d = 0; d < dp; ++d) {
    for (int mp = 0; mp < pp * tp; ++mp) b.Save(ZeroOptimFileName(d, mp), ZeroState(d, mp, dp));
  }
  b.Commit();
}

// exp_avg of zero file (dp, mp) with its padding stripped.
at::Tensor Stripped(int dp_rank, int mp_rank, int dp, double offset) {
  return Fill(ZeroSeed(dp_rank, mp_rank) + offset, {kPartition})
      .narrow(0, 0, kPartition - PaddingOf(dp_rank, dp));
}

}  // namespace

TEST_CASE("merge_state follows DeepSpeed, quirks included", "[unit][checkpoint]") {
  Dict a = StrDict();
  a.insert("x", Fill(1, {2, 3}));
  a.insert("only_a", static_cast<int64_t>(1));
  a.insert("s", static_cast<int64_t>(5));
  a.insert("lst", AnyList({Fill(2, {2}), static_cast<int64_t>(3)}));
  a.insert("tup", c10::ivalue::Tuple::create({Fill(3, {1}), std::string("a")}));
  Dict b = StrDict();
  b.insert("only_b", std::string("b"));
  b.insert("x", Fill(4, {1, 3}));
  b.insert("s", static_cast<int64_t>(7));
  b.insert("lst", AnyList({Fill(5, {3}), static_cast<int64_t>(4)}));
  b.insert("tup", c10::ivalue::Tuple::create({Fill(6, {2}), std::string("b")}));

  auto merged = MergeState(a, b);
  REQUIRE(merged.ok());
  const c10::IValue& m = merged.value();
  // Iterates b's keys: only_a is dropped, only_b copied, order is b's.
  auto d = m.toGenericDict();
  std::vector<std::string> keys;
  for (const auto& e : d) keys.push_back(e.key().toStringRef());
  CHECK(keys == std::vector<std::string>{"only_b", "x", "s", "lst", "tup"});
  CHECK(Equal(T(At(m, {"x"})), at::cat({Fill(1, {2, 3}), Fill(4, {1, 3})}, 0)));
  CHECK(At(m, {"s"}).toInt() == 5);
  CHECK(At(m, {"only_b"}).toStringRef() == "b");
  CHECK(Equal(T(At(m, {"lst", "0"})), at::cat({Fill(2, {2}), Fill(5, {3})})));
  CHECK(At(m, {"lst", "1"}).toInt() == 3);
  const c10::IValue tup = At(m, {"tup"});
  REQUIRE(tup.isTuple());
  CHECK(Equal(T(tup.toTupleRef().elements()[0]), at::cat({Fill(3, {1}), Fill(6, {2})})));
  CHECK(tup.toTupleRef().elements()[1].toStringRef() == "a");

  // The later upstream revision keeps a-only keys.
  MergeOptions keep;
  keep.keep_first_only_keys = true;
  auto kept = MergeState(a, b, keep);
  REQUIRE(kept.ok());
  CHECK(Has(kept.value(), "only_a"));
  CHECK(Has(kept.value(), "only_b"));

  SECTION("types must match") {
    auto bad = MergeState(c10::IValue(static_cast<int64_t>(1)), c10::IValue(1.0));
    REQUIRE(!bad.ok());
    CHECK(bad.status().IsInvalidArgument());
    CHECK_THAT(bad.status().message(), Catch::Contains("types int and float"));
    Dict x = StrDict(), y = StrDict();
    x.insert("k", AnyList({static_cast<int64_t>(1)}));
    y.insert("k", c10::ivalue::Tuple::create({static_cast<int64_t>(1)}));
    auto nested = MergeState(x, y);
    REQUIRE(!nested.ok());
    CHECK_THAT(nested.status().message(), Catch::Contains("at k"));
  }
  SECTION("lists must have one length") {
    auto bad = MergeState(AnyList({static_cast<int64_t>(1)}),
                          AnyList({static_cast<int64_t>(1), static_cast<int64_t>(2)}));
    REQUIRE(!bad.ok());
    CHECK_THAT(bad.status().message(), Catch::Contains("different lengths, a = 1 b = 2"));
  }
  SECTION("0-dim tensors cannot be concatenated unless taken from the first") {
    auto bad = MergeState(at::scalar_tensor(1.0), at::scalar_tensor(2.0));
    REQUIRE(!bad.ok());
    MergeOptions first;
    first.scalar_tensors_from_first = true;
    auto ok = MergeState(at::scalar_tensor(1.0), at::scalar_tensor(2.0), first);
    REQUIRE(ok.ok());
    CHECK(T(ok.value()).item<double>() == 1.0);
  }
  SECTION("None, strings and ints come from the first") {
    CHECK(MergeState(c10::IValue(), c10::IValue()).value().isNone());
    CHECK(MergeState(std::string("a"), std::string("b")).value().toStringRef() == "a");
  }
}

TEST_CASE("state trees are read without LibTorch values", "[unit][checkpoint]") {
  TempDir dir;
  TagBuilder b(dir.path());
  BuildTag(b, "t", 1, 2, 2);
  auto s = StoredState::Read(b.store(), "t", "mp_rank_01_model_states.pt");
  REQUIRE(s.ok());
  CHECK(s->GetInt({"checkpoint_parallel_dimensions", "tp_degree"}).value() == 2);
  CHECK(s->GetInt({"iteration"}).value() == 100);
  CHECK(s->GetDouble({"args", "lr"}).value() == 1e-3);
  CHECK(s->GetDouble({"args", "hidden_size"}).value() == 4.0);
  CHECK(s->GetString({"ds_version"}).value() == "0.19.6");
  CHECK(s->GetInt({"nope"}).status().IsNotFound());
  CHECK(s->GetInt({"ds_version"}).status().IsInvalidArgument());
  CHECK(IsNone(s->Find({"optimizer"})));
  auto module = s->Find({"module"});
  auto entries = DictEntries(module);
  REQUIRE(!entries.empty());
  CHECK(KeyText(entries[0].first) == "tied_modules.embed.word_embeddings.weight");
  CHECK(TensorParam(entries[0].second).value() ==
        "module/tied_modules.embed.word_embeddings.weight");
  auto z = StoredState::Read(b.store(), "t", ZeroOptimFileName(1, 0));
  REQUIRE(z.ok());
  // Int dict keys and list indices in paths.
  CHECK(z->GetInt({"optimizer_state_dict", "base_optimizer_state", "state", "0", "step"}).value() ==
        51);
  CHECK(z->GetInt({"optimizer_state_dict", "group_paddings", "0"}).value() == 2);
  CHECK(z->GetInt({"optimizer_state_dict", "param_slice_mappings", "0", "w", "numel"}).value() ==
        2);
  CHECK(Items(z->Find({"optimizer_state_dict", "partition_count"})).size() == 1);
}

TEST_CASE("the 3D descriptor of a stored tag", "[unit][checkpoint]") {
  TempDir dir;
  TagBuilder b(dir.path());
  BuildTag(b, "pp2tp2dp2", 2, 2, 2);
  CHECK(GetModel3dDescriptor(b.store(), "pp2tp2dp2").value() == Model3dDesc{2, 2, 2});
  // Legacy heuristic: no parallel dimensions, no layer files -> tp = #mp files.
  BuildTag(b, "legacy", 2, 2, 2, /*with_dims=*/false);
  CHECK(GetModel3dDescriptor(b.store(), "legacy").value() == Model3dDesc{1, 4, 2});

  SECTION("disagreeing or missing dimensions are errors naming the files") {
    b.Begin("disagree");
    b.Save(ModelFileName(0), ModelState(0, 0, 1, 2));
    b.Save(ModelFileName(1), ModelState(0, 1, 1, 2, true, std::make_pair(2, 1)));
    b.Save(ZeroOptimFileName(0, 0), ZeroState(0, 0, 1));
    b.Save(ZeroOptimFileName(0, 1), ZeroState(0, 1, 1));
    b.Commit();
    auto d = GetModel3dDescriptor(b.store(), "disagree");
    REQUIRE(!d.ok());
    CHECK(d.status().IsInvalidArgument());
    CHECK_THAT(d.status().message(), Catch::Contains("mp_rank_01_model_states.pt"));
    CHECK_THAT(d.status().message(), Catch::Contains("must agree"));

    b.Begin("missing");
    b.Save(ModelFileName(0), ModelState(0, 0, 1, 2));
    b.Save(ModelFileName(1), ModelState(0, 1, 1, 2, false));
    b.Commit();
    auto m = GetModel3dDescriptor(b.store(), "missing");
    REQUIRE(!m.ok());
    CHECK_THAT(m.status().message(), Catch::Contains("mp_rank_01_model_states.pt"));

    b.Begin("count");
    b.Save(ModelFileName(0), ModelState(0, 0, 1, 2));
    b.Commit();
    auto c = GetModel3dDescriptor(b.store(), "count");
    REQUIRE(!c.ok());
    CHECK_THAT(c.status().message(), Catch::Contains("has 1"));
  }
  SECTION("ZeRO-3 tags: per-rank model files") {
    b.Begin("z3");
    for (int d = 0; d < 2; ++d) {
      for (int mp = 0; mp < 2; ++mp) {
        b.Save(ZeroModelFileName(d, mp), ModelState(0, mp, 1, 2));
        b.Save(ZeroOptimFileName(d, mp), ZeroState(d, mp, 2));
      }
    }
    b.Commit();
    CHECK(GetModel3dDescriptor(b.store(), "z3").value() == Model3dDesc{1, 2, 2});
  }
  CHECK(GetModel3dDescriptor(b.store(), "no-such-tag").status().IsNotFound());
}

TEST_CASE("regression: recorded degrees whose product overflows an int are refused",
          "[unit][checkpoint]") {
  TempDir dir;
  TagBuilder b(dir.path());
  // 65536 x 65536 wraps a 32-bit product to 0; the check must see 2^32.
  const auto huge = std::make_pair(65536, 65536);
  b.Begin("huge");
  b.Save(ModelFileName(0), ModelState(0, 0, 1, 2, true, huge));
  b.Save(ModelFileName(1), ModelState(0, 1, 1, 2, true, huge));
  b.Commit();
  auto d = GetModel3dDescriptor(b.store(), "huge");
  REQUIRE(!d.ok());
  CHECK(d.status().IsInvalidArgument());
  CHECK_THAT(d.status().message(), Catch::Contains("4294967296 model files"));
  // The queries read the same tag as damaged.
  auto t = DiscoverTagLayout(b.store(), "huge");
  REQUIRE(!t.ok());
  CHECK(t.status().IsCorruption());
  CHECK_THAT(t.status().message(), Catch::Contains("4294967296 model files"));
}

TEST_CASE("ZeROCheckpoint merges a target rank's files as DeepSpeed does", "[unit][checkpoint]") {
  TempDir dir;
  TagBuilder b(dir.path());
  BuildTag(b, "t", 1, 2, 2);  // pp 1, tp 2, dp 2: 4 zero files
  auto z = ZeROCheckpoint::Open(b.store(), "t");
  REQUIRE(z.ok());
  CHECK(z->src_3d() == Model3dDesc{1, 2, 2});
  CHECK(z->file_list() == std::vector<std::string>{ZeroOptimFileName(0, 0), ZeroOptimFileName(0, 1),
                                                   ZeroOptimFileName(1, 0),
                                                   ZeroOptimFileName(1, 1)});
  // Identity: each rank its own file.
  CHECK(z->GetFilesForRank(0, 1, 1).value() == std::vector<std::string>{ZeroOptimFileName(1, 1)});
  CHECK(!z->GetFilesForRank(0, 0, 2).ok());

  REQUIRE(z->Reshape({1, 1, 1}).ok());
  // 2D (pp1, tp2) -> (1, 1) gives model files [0, 1]; dp-interleaved: [0, 2, 1, 3].
  CHECK(z->GetFileIndicesForRank(0, 0, 0).value() == std::vector<int>{0, 2, 1, 3});
  LoadStats stats;
  auto z2 =
      ZeROCheckpoint::Open(b.store(), "t", std::nullopt, StoreFileLoader(b.store(), "t", &stats));
  REQUIRE(z2.ok());
  REQUIRE(z2->Reshape({1, 1, 1}).ok());
  auto state = z2->GetStateForRank(0, 0, 0, {"param_shapes"});
  REQUIRE(state.ok());
  const c10::IValue& sd = state.value();
  CHECK(stats.files == 4);
  CHECK(stats.tensor_bytes == 4 * 3 * kPartition * 4 - 2 * 2 * 4);  // fp32 partitions stripped
  CHECK(!Has(sd, "param_shapes"));
  const std::vector<std::pair<int, int>> order = {{0, 0}, {1, 0}, {0, 1}, {1, 1}};  // (dp, mp)
  for (auto [key, offset] : {std::make_pair("exp_avg", 0.1), std::make_pair("exp_avg_sq", 0.2)}) {
    std::vector<at::Tensor> parts;
    for (auto [dp, mp] : order) parts.push_back(Stripped(dp, mp, 2, offset));
    const at::Tensor got =
        T(At(sd, {"optimizer_state_dict", "base_optimizer_state", "state", "0", key}));
    CHECK(got.numel() == 4 * kPartition - 2 * 2);  // paddings of dp rank 1 stripped
    CHECK(Equal(got, at::cat(parts)));
  }
  std::vector<at::Tensor> fp32;
  for (auto [dp, mp] : order) {
    fp32.push_back(Fill(ZeroSeed(dp, mp) + 0.3, {kPartition - PaddingOf(dp, 2)}));
  }
  CHECK(Equal(T(At(sd, {"optimizer_state_dict", "single_partition_of_fp32_groups", "0"})),
              at::cat(fp32)));
  // Scalars from the first file; counts and paddings rewritten.
  CHECK(At(sd, {"optimizer_state_dict", "base_optimizer_state", "state", "0", "step"}).toInt() ==
        50);
  CHECK(At(sd, {"optimizer_state_dict", "partition_count"}).toIntVector() ==
        std::vector<int64_t>{1});
  CHECK(At(sd, {"optimizer_state_dict", "group_paddings"}).toIntVector() ==
        std::vector<int64_t>{0});
  CHECK(At(sd, {"optimizer_state_dict", "zero_stage"}).toInt() == 2);
  // param_slice_mappings merged with merge_state: "p0" (only in the first
  // file) is dropped, "p1" comes from the second, "w" from the first.
  const c10::IValue psm = At(sd, {"optimizer_state_dict", "param_slice_mappings", "0"});
  CHECK(!Has(psm, "p0"));
  CHECK(Has(psm, "p1"));
  CHECK(At(psm, {"w", "start"}).toInt() == 2);
  CHECK(At(psm, {"w", "numel"}).toInt() == 4);

  SECTION("without stripping, paddings stay") {
    auto raw = z2->GetStateForRank(0, 0, 0, {}, /*strip_tensor_paddings=*/false);
    REQUIRE(raw.ok());
    CHECK(T(At(raw.value(),
               {"optimizer_state_dict", "base_optimizer_state", "state", "0", "exp_avg"}))
              .numel() == 4 * kPartition);
    CHECK(At(raw.value(), {"optimizer_state_dict", "group_paddings"}).toIntVector() ==
          std::vector<int64_t>{0});  // from the first file, whose padding is 0
    CHECK(Has(raw.value(), "param_shapes"));
  }
  SECTION("expansion is refused") {
    auto grow = z2->Reshape({1, 4, 1});
    REQUIRE(!grow.ok());
    CHECK_THAT(grow.message(), Catch::Contains("Expansion reshape not supported - TP"));
  }
}

TEST_CASE("DeepSpeedCheckpoint: 2D model merge, zero state, global state", "[unit][checkpoint]") {
  TempDir dir;
  TagBuilder b(dir.path());
  BuildTag(b, "t", 2, 2, 2);
  DeepSpeedCheckpointOptions options;
  options.tp = 1;
  options.pp = 1;
  options.dp = 1;
  auto c = DeepSpeedCheckpoint::Open(b.store(), "t", options);
  REQUIRE(c.ok());
  CHECK(c->original_tp_degree() == 2);
  CHECK(c->original_pp_degree() == 2);
  CHECK(c->original_dp_degree() == 2);
  CHECK(c->IsChangeTpDegree());
  CHECK(c->IsChangePpDegree());
  CHECK(c->IsChangeDpDegree());
  CHECK(c->world_size() == 1);
  CHECK(c->GetIteration() == 100);
  auto args = c->GetArgs();
  REQUIRE(args.ok());
  CHECK(At(args.value(), {"num_layers"}).toInt() == kLayers);
  CHECK(c->GetCheckpointValue("checkpoint_info").value().isNone());
  CHECK(c->new_2d_map().GetData(0, 0).value() == std::vector<int>{0, 1, 2, 3});
  CHECK(c->Get2dParallelFiles(0, 0).value() ==
        std::vector<std::string>{ModelFileName(0), ModelFileName(1), ModelFileName(2),
                                 ModelFileName(3)});
  CHECK(!c->Get2dParallelFiles(1, 0).ok());

  auto merged = c->Get2dParallelState(0, 0);
  REQUIRE(merged.ok());
  const c10::IValue& sd = merged.value();
  // Keys only in the first file are dropped; scalars from the first.
  CHECK(!Has(sd, "only_in_first"));
  CHECK(At(sd, {"global_steps"}).toInt() == 100);
  // module: merge_state iterates the last file's keys; stage-0 layers are
  // dropped (only in the first files), the tied embedding of the last stage
  // is concatenated from all four files that... hold it: files 0, 1 (stage 0)
  // and 2, 3 (stage 1), in file order.
  const c10::IValue module = At(sd, {"module"});
  CHECK(!Has(module, "2.input_layernorm.weight"));
  CHECK(Has(module, "3.input_layernorm.weight"));
  std::vector<at::Tensor> words;
  for (int mp = 0; mp < 4; ++mp) {
    words.push_back(T(At(ModelState(mp / 2, mp % 2, 2, 2),
                         {"module", "tied_modules.embed.word_embeddings.weight"})));
  }
  CHECK(Equal(T(At(module, {"tied_modules.embed.word_embeddings.weight"})), at::cat(words)));
  // Layer 3 lives in files 2 and 3 only: cat of those two.
  CHECK(
      Equal(T(At(module, {"3.self_attention.dense.weight"})),
            at::cat({T(At(ModelState(1, 0, 2, 2), {"module", "3.self_attention.dense.weight"})),
                     T(At(ModelState(1, 1, 2, 2), {"module", "3.self_attention.dense.weight"}))})));

  // Zero state: the dp-interleaved 8 files of the single target rank.
  CHECK(c->GetZeroFiles(0, 0, 0).value().size() == 8);
  auto zs = c->GetZeroCheckpointState(0, 0, 0);
  REQUIRE(zs.ok());
  CHECK(!Has(zs.value(), "param_shapes"));
  CHECK(T(At(zs.value(), {"optimizer_state_dict", "base_optimizer_state", "state", "0", "exp_avg"}))
            .numel() == 8 * kPartition - 4 * 2);

  SECTION("module layer maps (GPTModelPipe names)") {
    const auto& layers = c->module_layers();
    REQUIRE(layers.size() == 4);  // embed, 2, 3, 5
    CHECK(layers[0].index == -1);
    CHECK(layers[3].index == kLayers + 3);
    CHECK(c->GetModuleEmbeddingFiles(0).value() ==
          std::vector<std::string>{ModelFileName(0), ModelFileName(1)});
    auto emb = c->GetModuleEmbeddingState(0);
    REQUIRE(emb.ok());
    CHECK(Equal(T(At(emb.value(), {"word_embeddings.weight"})), at::cat({words[0], words[1]})));
    // position_embeddings is replicated: from the first file.
    CHECK(Equal(T(At(emb.value(), {"position_embeddings.weight"})),
                T(At(ModelState(0, 0, 2, 2),
                     {"module", "tied_modules.embed.position_embeddings.weight"}))));
    auto tl = c->GetModuleTransformerState(0, 0);
    REQUIRE(tl.ok());
    REQUIRE(tl->size() == 2);
    auto src = [](int pp, int tp, const std::string& key) {
      return T(At(ModelState(pp, tp, 2, 2), {"module", key}));
    };
    // Layer 2 (stage 0): dense.weight on dim 1, qkv on dim 0, layernorm from tp 0.
    CHECK(Equal(T(At((*tl)[0], {"self_attention.dense.weight"})),
                at::cat({src(0, 0, "2.self_attention.dense.weight"),
                         src(0, 1, "2.self_attention.dense.weight")},
                        1)));
    CHECK(Equal(T(At((*tl)[0], {"self_attention.query_key_value.weight"})),
                at::cat({src(0, 0, "2.self_attention.query_key_value.weight"),
                         src(0, 1, "2.self_attention.query_key_value.weight")},
                        0)));
    CHECK(
        Equal(T(At((*tl)[0], {"input_layernorm.weight"})), src(0, 0, "2.input_layernorm.weight")));
    CHECK(Equal(
        T(At((*tl)[1], {"mlp.dense_4h_to_h.weight"})),
        at::cat({src(1, 0, "3.mlp.dense_4h_to_h.weight"), src(1, 1, "3.mlp.dense_4h_to_h.weight")},
                1)));
    auto norm = c->GetModuleFinalNormState(0);
    REQUIRE(norm.ok());
    CHECK(Equal(T(At(norm.value(), {"weight"})), src(1, 0, "5.weight")));
  }
}

TEST_CASE("DeepSpeedCheckpoint refuses what DeepSpeed refuses", "[unit][checkpoint]") {
  TempDir dir;
  TagBuilder b(dir.path());
  BuildTag(b, "t", 1, 2, 2);
  DeepSpeedCheckpointOptions grow;
  grow.tp = 4;
  auto g = DeepSpeedCheckpoint::Open(b.store(), "t", grow);
  REQUIRE(!g.ok());
  CHECK(g.status().IsInvalidArgument());
  CHECK_THAT(g.status().message(), Catch::Contains("valid target tp degrees: 1, 2"));
  // Identity is fine and changes nothing.
  auto same = DeepSpeedCheckpoint::Open(b.store(), "t");
  REQUIRE(same.ok());
  CHECK(!same->IsChangeTpDegree());
  CHECK(same->GetZeroFiles(0, 1, 1).value() == std::vector<std::string>{ZeroOptimFileName(1, 1)});
  // No zero files.
  b.Begin("nozero");
  b.Save(ModelFileName(0), ModelState(0, 0, 1, 1));
  b.Commit();
  auto nz = DeepSpeedCheckpoint::Open(b.store(), "nozero");
  REQUIRE(!nz.ok());
  CHECK_THAT(nz.status().message(), Catch::Contains("No ZeRO files"));
  // No model files.
  b.Begin("nomodel");
  b.Save(ZeroOptimFileName(0, 0), ZeroState(0, 0, 1));
  b.Commit();
  auto nm = DeepSpeedCheckpoint::Open(b.store(), "nomodel");
  REQUIRE(!nm.ok());
  CHECK_THAT(nm.status().message(), Catch::Contains("mp_rank_* files"));
}

TEST_CASE("DeepSpeedCheckpoint: PipelineModule layer-file maps", "[unit][checkpoint]") {
  TempDir dir;
  TagBuilder b(dir.path());
  b.Begin("layers");
  // pp 1, tp 2; layer files: 01 embedding, 03 and 04 transformers, 06 final norm.
  auto layer_state = [](int layer, int tp) {
    Dict sd = StrDict();
    const double seed = 10 * layer + tp;
    if (layer == 1) {
      sd.insert("word_embeddings.weight", Fill(seed, {kVocab / 2, kHidden}));
      sd.insert("position_embeddings.weight", Fill(seed + 0.5, {kSeq, kHidden}));
    } else if (layer == 6) {
      sd.insert("weight", Fill(seed, {kHidden}));
    } else {
      sd.insert("input_layernorm.weight", Fill(seed, {kHidden}));
      sd.insert("self_attention.dense.weight", Fill(seed + 0.5, {kHidden, kHidden / 2}));
    }
    return c10::IValue(sd);
  };
  for (int layer : {1, 3, 4, 6}) {
    for (int t = 0; t < 2; ++t) b.Save(LayerFileName(layer, t), layer_state(layer, t));
  }
  for (int t = 0; t < 2; ++t) {
    Dict sd = StrDict();
    sd.insert("module", c10::IValue());
    sd.insert("iteration", static_cast<int64_t>(9));
    b.Save(ModelFileName(t), sd);
    b.Save(ZeroOptimFileName(0, t), ZeroState(0, t, 1));
  }
  b.Commit();
  // Legacy heuristic: tp = #layer_01 files = 2, pp = 2 / 2 = 1.
  CHECK(GetModel3dDescriptor(b.store(), "layers").value() == Model3dDesc{1, 2, 1});
  DeepSpeedCheckpointOptions options;
  options.tp = 1;
  auto c = DeepSpeedCheckpoint::Open(b.store(), "layers", options);
  REQUIRE(c.ok());
  CHECK(c->GetIteration() == 9);
  CHECK(c->layer_keys() ==
        std::vector<std::string>{"layer_01", "layer_03", "layer_04", "layer_06"});
  CHECK(c->GetEmbeddingLayerId().value() == "layer_01");
  CHECK(c->GetFinalNormLayerId().value() == "layer_06");
  CHECK(c->GetPpTransformerMap(0).value() == std::vector<std::string>{"layer_03", "layer_04"});
  CHECK(c->GetEmbeddingFiles(0).value() ==
        std::vector<std::string>{LayerFileName(1, 0), LayerFileName(1, 1)});
  auto emb = c->GetEmbeddingState(0);
  REQUIRE(emb.ok());
  CHECK(Equal(T(At(emb.value(), {"word_embeddings.weight"})),
              at::cat({Fill(10, {kVocab / 2, kHidden}), Fill(11, {kVocab / 2, kHidden})})));
  CHECK(Equal(T(At(emb.value(), {"position_embeddings.weight"})), Fill(10.5, {kSeq, kHidden})));
  auto tl = c->GetTransformerState(0, 0);
  REQUIRE(tl.ok());
  REQUIRE(tl->size() == 2);
  CHECK(
      Equal(T(At((*tl)[1], {"self_attention.dense.weight"})),
            at::cat({Fill(40.5, {kHidden, kHidden / 2}), Fill(41.5, {kHidden, kHidden / 2})}, 1)));
  CHECK(Equal(T(At((*tl)[1], {"input_layernorm.weight"})), Fill(40, {kHidden})));
  // Final norm: only the first file is loaded.
  CHECK(c->GetFinalNormFiles(0).value().size() == 2);
  CHECK(Equal(T(At(c->GetFinalNormState(0).value(), {"weight"})), Fill(60, {kHidden})));
}

TEST_CASE("naive reshape: load whole, merge_state, save at the new degrees", "[unit][checkpoint]") {
  TempDir dir;
  {
    TagBuilder b(dir.path());
    BuildTag(b, "t", 1, 2, 2);
  }  // the engine releases the store
  auto stats = NaiveReshape(dir.path(), "t", Model3dDesc{1, 1, 1}, "naive");
  REQUIRE(stats.ok());
  CHECK(stats->source == Model3dDesc{1, 2, 2});
  CHECK(stats->target == Model3dDesc{1, 1, 1});
  CHECK(stats->files_loaded == 2 + 4);
  CHECK(stats->files_written == 2);
  CHECK(stats->tensor_bytes_read > 0);
  CHECK(stats->block_bytes_read <= stats->tensor_bytes_read);
  CHECK(stats->tensor_bytes_written > 0);
  CHECK(stats->seconds > 0);
  // Expansion and an existing output tag are refused.
  CHECK(NaiveReshape(dir.path(), "t", Model3dDesc{1, 4, 1}, "grow").status().IsInvalidArgument());
  CHECK(NaiveReshape(dir.path(), "t", Model3dDesc{1, 1, 1}, "naive").status().IsAlreadyExists());
  CHECK(NaiveReshape(dir.path(), "nope", Model3dDesc{1, 1, 1}, "x").status().IsNotFound());

  KvEngineConfig config;
  config.db = dir.path();
  KvCheckpointEngine engine(config);
  REQUIRE(engine.open(dir.path(), "naive"));
  Store& store = *engine.store();
  CHECK(store.ListFiles("naive").value() ==
        std::vector<std::string>{ModelFileName(0), ZeroOptimFileName(0, 0)});
  CHECK(GetModel3dDescriptor(store, "naive").value() == Model3dDesc{1, 1, 1});
  CHECK(store.Latest().value() == std::optional<std::string>("t"));
  const c10::IValue model = engine.load(dir.path() + "/naive/" + ModelFileName(0));
  CHECK(
      Equal(T(At(model, {"module", "2.self_attention.dense.weight"})),
            at::cat({T(At(ModelState(0, 0, 1, 2), {"module", "2.self_attention.dense.weight"})),
                     T(At(ModelState(0, 1, 1, 2), {"module", "2.self_attention.dense.weight"}))})));
  CHECK(At(model, {"mp_world_size"}).toInt() == 1);
  CHECK(!Has(model, "only_in_first"));
  const c10::IValue zero = engine.load(dir.path() + "/naive/" + ZeroOptimFileName(0, 0));
  std::vector<at::Tensor> parts;
  for (auto [dp, mp] : std::vector<std::pair<int, int>>{{0, 0}, {1, 0}, {0, 1}, {1, 1}}) {
    parts.push_back(Stripped(dp, mp, 2, 0.1));
  }
  CHECK(
      Equal(T(At(zero, {"optimizer_state_dict", "base_optimizer_state", "state", "0", "exp_avg"})),
            at::cat(parts)));
  CHECK(At(zero, {"optimizer_state_dict", "partition_count"}).toIntVector() ==
        std::vector<int64_t>{1});
}
