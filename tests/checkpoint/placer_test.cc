// DeepSpeedPlacer: a DeepSpeed checkpoint saved file by file through
// KvCheckpointEngine gets the same fragment placements `ckptkv synth` writes,
// so it reshapes like one; files that disagree with their layout are saved
// without placements, never refused.
#include <ATen/ATen.h>

#include <algorithm>
#include <catch2/catch.hpp>

#include "checkpoint/core/file_names.h"
#include "checkpoint/query/placer.h"
#include "checkpoint/query/reshape.h"
#include "checkpoint/query/synth.h"
#include "checkpoint/query/tag_index.h"
#include "engine/kv_checkpoint_engine.h"
#include "tests/checkpoint/small_gpt.h"
#include "tests/test_util.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;
using ckptkv::testing::SmallGpt;
using ckptkv::testing::TempDir;

namespace {

constexpr uint32_t kChunk = 16 * 1024;

void SynthTag(Store& store, const std::string& tag, const TrainLayout& layout) {
  SynthOptions o;
  o.model = SmallGpt();
  o.layout = layout;
  o.seed = 7;
  auto r = Synth(store, tag, o, WriteOptions());
  INFO(r.status().ToString());
  REQUIRE(r.ok());
}

std::unique_ptr<Store> OpenStore(const std::string& dir) {
  StoreOptions so;
  so.chunk_size = kChunk;
  auto store = Store::Open(dir, so);
  INFO(store.status().ToString());
  REQUIRE(store.ok());
  return std::move(store).value();
}

void SynthInto(const std::string& dir, const std::string& tag, const TrainLayout& layout) {
  SynthTag(*OpenStore(dir), tag, layout);
}

// DeepSpeed saves model-state files before optimizer files.

std::vector<std::string> SaveOrder(std::vector<std::string> files) {
  std::stable_sort(files.begin(), files.end(), [](const std::string& a, const std::string& b) {
    auto rank = [](const std::string& f) {
      auto c = ParseFileName(f);
      return c && c->kind == FileKind::kOptimStates ? 1 : 0;
    };
    return rank(a) < rank(b);
  });
  return files;
}

// Synth of `layout` as `tag` into the store at `dir`; its files in save order.
std::vector<std::string> SynthFiles(const std::string& dir, const std::string& tag,
                                    const TrainLayout& layout) {
  auto store = OpenStore(dir);
  SynthTag(*store, tag, layout);
  return SaveOrder(store->ListFiles(tag).value());
}

KvEngineConfig Config(const std::string& db, std::shared_ptr<TensorPlacer> placer = nullptr) {
  KvEngineConfig c;
  c.db = db;
  c.store.chunk_size = kChunk;
  c.placer = std::move(placer);
  return c;
}

// Loads every file of `tag` from the store at `from` and saves it, in
// `files` order, into the store at `to` through an engine with `placer`.
// A placer's save-time half: Place and EndTag, no AfterCommit.
class SaveTimeOnly : public TensorPlacer {
 public:
  explicit SaveTimeOnly(std::shared_ptr<TensorPlacer> inner) : inner_(std::move(inner)) {}
  Placements Place(const std::string& tag, const std::string& file,
                   const c10::IValue& state) override {
    return inner_->Place(tag, file, state);
  }
  void EndTag(const std::string& tag) override { inner_->EndTag(tag); }

 private:
  std::shared_ptr<TensorPlacer> inner_;
};

void Resave(const std::string& from, const std::string& to, const std::string& tag,
            const std::vector<std::string>& files, std::shared_ptr<TensorPlacer> placer) {
  KvCheckpointEngine src(Config(from));
  REQUIRE(src.open(from, tag).value() == tag);
  KvCheckpointEngine dst(Config(to, std::move(placer)));
  dst.makedirs(to, true);
  dst.create(to, tag);
  for (const auto& f : files)
    dst.save(src.load(from + "/" + tag + "/" + f), to + "/" + tag + "/" + f);
  REQUIRE(dst.commit(tag));
}

std::string Describe(const Placement& p) {
  std::string s = p.param + "/" + p.state + " g" + ShapeString(p.global_shape) + " o" +
                  ShapeString(p.offsets) + " s" + ShapeString(p.shard_shape) + " flat " +
                  std::to_string(p.flat_group) + "@" + std::to_string(p.flat_offset) + "+" +
                  std::to_string(p.flat_numel) + " tp " + std::to_string(p.tp_rank) + "/" +
                  std::to_string(p.tp_degree) + " dim " + std::to_string(p.shard_dim);
  for (const auto& seg : p.segments) {
    s += " [" + seg.param + " " + std::to_string(seg.start) + "+" + std::to_string(seg.numel) +
         " @" + std::to_string(seg.shard_start) + "]";
  }
  return s;
}

// Every record of `tag` has the same placement (or none) in both stores.
size_t RequireSamePlacements(const std::string& a_dir, const std::string& b_dir,
                             const std::string& tag) {
  auto a = Store::Open(a_dir, StoreOptions());
  auto b = Store::Open(b_dir, StoreOptions());
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  size_t placed = 0;
  auto files = (*a)->ListFiles(tag);
  REQUIRE(files.ok());
  REQUIRE(*files == (*b)->ListFiles(tag).value());
  for (const auto& f : *files) {
    auto params = (*a)->ListParams(tag, f);
    REQUIRE(params.ok());
    REQUIRE(*params == (*b)->ListParams(tag, f).value());
    for (const auto& p : *params) {
      auto ra = (*a)->GetTensorRecord(tag, f, p);
      auto rb = (*b)->GetTensorRecord(tag, f, p);
      REQUIRE(ra.ok());
      REQUIRE(rb.ok());
      INFO(f << ":" << p);
      const fb::Placement* pa = ra.value()->placement();
      const fb::Placement* pb = rb.value()->placement();
      REQUIRE((pa == nullptr) == (pb == nullptr));
      if (pa == nullptr) continue;
      CHECK(Describe(PlacementOf(*pa)) == Describe(PlacementOf(*pb)));
      placed++;
    }
  }
  return placed;
}

size_t CountPlacements(const std::string& dir, const std::string& tag, const std::string& file) {
  auto s = Store::Open(dir, StoreOptions());
  REQUIRE(s.ok());
  size_t n = 0;
  const std::vector<std::string> params = (*s)->ListParams(tag, file).value();
  for (const auto& p : params) {
    if ((*s)->GetTensorRecord(tag, file, p).value()->placement() != nullptr) n++;
  }
  return n;
}

// `tag` in the store at `dir` reshapes to what synth writes at tp1 pp1 dp2.
void RequireReshapesLikeSynth(const std::string& dir, const std::string& tag,
                              const TrainLayout& from) {
  const TrainLayout to{1, 1, 2, from.zero_stage, from.bf16, from.layer_files};
  auto store = OpenStore(dir);
  SynthTag(*store, "expect", to);
  ReshapeOptions ro;
  ro.tp = to.tp;
  ro.pp = to.pp;
  ro.dp = to.dp;
  ro.out_tag = "reshaped";
  auto r = Reshape(*store, tag, ro);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  const std::vector<std::string> expect_files = store->ListFiles("expect").value();
  for (const auto& f : expect_files) {
    const std::vector<std::string> params = store->ListParams("expect", f).value();
    for (const auto& p : params) {
      INFO(f << ":" << p);
      auto re = store->GetTensorRecord("expect", f, p);
      auto rr = store->GetTensorRecord("reshaped", f, p);
      REQUIRE(rr.ok());
      CHECK(re.value()->digest()->lo() == rr.value()->digest()->lo());
      CHECK(re.value()->digest()->hi() == rr.value()->digest()->hi());
    }
  }
}

}  // namespace

TEST_CASE("files saved through the engine get the placements synth writes, and reshape alike",
          "[unit][checkpoint][reshape]") {
  const TrainLayout layouts[] = {
      {2, 2, 2, 2, true},   // ZeRO-2 bf16
      {2, 1, 3, 1, false},  // ZeRO-1 fp32, padding at dp 3
      {1, 2, 2, 3, true},   // ZeRO-3: empty module placeholders, per-parameter padding
  };
  for (const TrainLayout& from : layouts) {
    DYNAMIC_SECTION(from.ToString()) {
      TempDir a, b;
      const std::vector<std::string> files = SynthFiles(a.path(), "t", from);
      Resave(a.path(), b.path(), "t", files, std::make_shared<DeepSpeedPlacer>());
      CHECK(RequireSamePlacements(a.path(), b.path(), "t") > 0);

      RequireReshapesLikeSynth(b.path(), "t", from);
    }
  }
}

TEST_CASE("the placer leaves files it cannot place unplaced and says why",
          "[unit][checkpoint][reshape]") {
  TempDir a, b;
  SynthInto(a.path(), "t", TrainLayout{2, 1, 2, 2, true});
  const std::string model0 = ModelFileName(0);
  const std::string optim0 = ZeroOptimFileName(0, 0, true);
  c10::IValue model_state, optim_state;
  {
    KvCheckpointEngine src(Config(a.path()));
    REQUIRE(src.open(a.path(), "t").value() == "t");
    model_state = src.load(a.path() + "/t/" + model0);
    optim_state = src.load(a.path() + "/t/" + optim0);
  }
  DeepSpeedPlacer placer;

  SECTION("an optimizer file before its model file") {
    auto r = placer.TryPlace("u", optim0, optim_state);
    REQUIRE_FALSE(r.ok());
    CHECK(r.status().IsInvalidArgument());
    CHECK_THAT(r.status().ToString(), Catch::Contains(model0 + " first"));
    // The engine still saves it, without placements.
    auto shared = std::make_shared<DeepSpeedPlacer>();
    Resave(a.path(), b.path(), "t", {optim0, model0}, shared);
    CHECK(CountPlacements(b.path(), "t", optim0) == 0);
    CHECK(CountPlacements(b.path(), "t", model0) > 0);
  }

  SECTION("param_slice_mappings that disagree with param_shapes") {
    REQUIRE(placer.TryPlace("u", model0, model_state).ok());
    REQUIRE(placer.TryPlace("u", optim0, optim_state).value().size() >= 3);
    // Shift one fragment address: the flat buffer is not laid out as the
    // model file's param_shapes say, so nothing can be placed safely.
    c10::IValue bad = optim_state.deepcopy();
    auto osd = bad.toGenericDict().at("optimizer_state_dict").toGenericDict();
    auto mapping = osd.at("param_slice_mappings").toList().get(0).toGenericDict();
    auto first = mapping.begin();
    const std::string name = first->key().toStringRef();
    auto fa = first->value().toGenericDict();
    fa.insert_or_assign("start", fa.at("start").toInt() + 1);
    auto r = placer.TryPlace("u", optim0, bad);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().ToString(), Catch::Contains("param_slice_mappings of " + name));
    CHECK(placer.Place("u", optim0, bad).empty());
  }

  SECTION("a module tensor whose shape disagrees with param_shapes") {
    c10::IValue bad = model_state.deepcopy();
    auto module = bad.toGenericDict().at("module").toGenericDict();
    const std::string name = module.begin()->key().toStringRef();
    module.insert_or_assign(name, at::zeros({3, 5}));
    auto r = placer.TryPlace("u", model0, bad);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().ToString(), Catch::Contains("module tensor " + name));
  }

  SECTION("files that are not DeepSpeed's get no placements and no error") {
    auto r = placer.TryPlace("u", "client_state.pt", model_state);
    REQUIRE(r.ok());
    CHECK(r->empty());
  }

  SECTION("a committed tag's cached model metadata is dropped") {
    REQUIRE(placer.TryPlace("u", model0, model_state).ok());
    placer.EndTag("u");
    CHECK_FALSE(placer.TryPlace("u", optim0, optim_state).ok());
  }
}

TEST_CASE("PlaceTag adds placements to a tag saved without them, reading no tensor bytes",
          "[unit][checkpoint][reshape]") {
  const TrainLayout from{2, 2, 2, 2, true};
  TempDir a, b;
  const std::vector<std::string> files = SynthFiles(a.path(), "t", from);
  Resave(a.path(), b.path(), "t", files, nullptr);
  {
    auto store = Store::Open(b.path(), StoreOptions());
    REQUIRE(store.ok());
    ReshapeOptions ro;
    ro.tp = 1;
    ro.out_tag = "x";
    auto r = Reshape(**store, "t", ro);
    REQUIRE_FALSE(r.ok());
    CHECK_THAT(r.status().ToString(), Catch::Contains("placement"));

    DeepSpeedPlacer placer;
    const uint64_t read0 = (*store)->BlockBytesRead();
    auto rep = PlaceTag(**store, "t", "", placer);
    INFO(rep.status().ToString());
    REQUIRE(rep.ok());
    CHECK(rep->out_tag == "t");
    CHECK(rep->files == files.size());
    CHECK(rep->unplaced_files.empty());
    CHECK(rep->placed_tensors > 0);
    CHECK(rep->placed_tensors < rep->tensors);  // optimizer steps are not fragments
    CHECK((*store)->BlockBytesRead() == read0);
    CHECK((*store)->Latest().value() == std::optional<std::string>("t"));
  }
  CHECK(RequireSamePlacements(a.path(), b.path(), "t") > 0);
  RequireReshapesLikeSynth(b.path(), "t", from);
}

namespace {

// The files of a synthetic PipelineModule tag in the order DeepSpeed saves
// them: rank by rank, a stage's layer files, then its mp_rank file; the
// optimizer files after them.
std::vector<std::string> DeepSpeedOrder(const TrainLayout& layout) {
  SynthOptions o;
  o.model = SmallGpt();
  o.layout = layout;
  ModelSpec spec = ModelSpec::Gpt(o.model, ShardingRules::MegatronDefaults());
  auto planned = PlanFiles(spec, layout, SynthMeta(o));
  REQUIRE(planned.ok());
  std::vector<std::string> names;
  for (const auto& f : *planned) names.push_back(f.name);
  return names;
}

size_t CountPlacedLayerFiles(const std::string& dir, const std::string& tag, size_t* layer_files) {
  auto s = Store::Open(dir, StoreOptions());
  REQUIRE(s.ok());
  size_t placed = 0;
  *layer_files = 0;
  const std::vector<std::string> files = (*s)->ListFiles(tag).value();
  for (const auto& f : files) {
    auto c = ParseFileName(f);
    if (!c || c->kind != FileKind::kLayer) continue;
    (*layer_files)++;
    const std::vector<std::string> params = (*s)->ListParams(tag, f).value();
    bool all = !params.empty();
    for (const auto& p : params) {
      if ((*s)->GetTensorRecord(tag, f, p).value()->placement() == nullptr) all = false;
    }
    if (all) placed++;
  }
  return placed;
}

}  // namespace

TEST_CASE("PipelineModule layer files saved through the engine get the placements synth writes",
          "[unit][checkpoint][reshape]") {
  const TrainLayout layouts[] = {
      {2, 2, 2, 2, true, LayerFiles::kModelAxis},   // ZeRO-2 bf16
      {2, 2, 3, 1, false, LayerFiles::kModelAxis},  // ZeRO-1 fp32, padding at dp 3
      {1, 2, 2, 1, true, LayerFiles::kNoModelAxis},
  };
  for (const TrainLayout& from : layouts) {
    DYNAMIC_SECTION(from.ToString()
                    << (from.layer_files == LayerFiles::kNoModelAxis ? " (no model axis)" : "")) {
      TempDir a, b;
      SynthTag(*OpenStore(a.path()), "t", from);
      SynthTag(*OpenStore(a.path()), "t2", from);
      const std::vector<std::string> order = DeepSpeedOrder(from);
      REQUIRE(order.size() == OpenStore(a.path())->ListFiles("t").value().size());
      auto placer = std::make_shared<DeepSpeedPlacer>();

      SECTION("in DeepSpeed's order: the engine places the first tag after its commit") {
        Resave(a.path(), b.path(), "t", order, placer);
        size_t layer_files = 0;
        CHECK(CountPlacedLayerFiles(b.path(), "t", &layer_files) == layer_files);
        CHECK(layer_files > 0);
        CHECK(RequireSamePlacements(a.path(), b.path(), "t") > 0);
        auto store = OpenStore(b.path());
        CHECK_FALSE(placer->FinishTag(*store, "t").value());  // done by the commit
      }

      SECTION("in DeepSpeed's order: later tags from the last one's model files") {
        // Save-time placement alone (the engine's after-commit step left
        // out): the first tag's layer files that come before a model file
        // of their stage have nothing to be placed from ...
        Resave(a.path(), b.path(), "t", order, std::make_shared<SaveTimeOnly>(placer));
        size_t layer_files = 0;
        const size_t placed = CountPlacedLayerFiles(b.path(), "t", &layer_files);
        CHECK(layer_files > 0);
        CHECK(placed < layer_files);
        // ... the next tag of the run is placed whole ...
        Resave(a.path(), b.path(), "t2", order, std::make_shared<SaveTimeOnly>(placer));
        CHECK(RequireSamePlacements(a.path(), b.path(), "t2") > 0);
        CHECK(CountPlacedLayerFiles(b.path(), "t2", &layer_files) == layer_files);
        RequireReshapesLikeSynth(b.path(), "t2", from);
        // ... and the first is placed after its commit, by FinishTag (what
        // the engine would call after commit) or PlaceTag.
        auto store = OpenStore(b.path());
        CHECK_FALSE(placer->FinishTag(*store, "t2").value());  // nothing left to place
        const TagInfo before = store->GetTag("t").value();
        auto rep = placer->FinishTag(*store, "t");
        INFO(rep.status().ToString());
        REQUIRE(rep.ok());
        REQUIRE(rep->has_value());
        CHECK((*rep)->unplaced_files.empty());
        // Placed in place: latest stays on t2, t keeps its history.
        CHECK(store->Latest().value() == std::optional<std::string>("t2"));
        const TagInfo after = store->GetTag("t").value();
        CHECK(after.parent_tag == before.parent_tag);
        CHECK(after.new_bytes == before.new_bytes);
        CHECK(after.new_bytes > 0);
        CHECK(after.files == before.files);
        CHECK_FALSE(placer->FinishTag(*store, "t").value());
        store.reset();
        CHECK(RequireSamePlacements(a.path(), b.path(), "t") > 0);
      }

      SECTION("model-state files first (PlacedBefore): placed in the first tag") {
        std::vector<std::string> files = order;
        std::stable_sort(files.begin(), files.end(), PlacedBefore);
        Resave(a.path(), b.path(), "t", files, placer);
        CHECK(RequireSamePlacements(a.path(), b.path(), "t") > 0);
        RequireReshapesLikeSynth(b.path(), "t", from);
      }
    }
  }
}

TEST_CASE("PlacedBefore orders model-state files, layer files, the rest, optimizer files",
          "[unit][checkpoint]") {
  std::vector<std::string> files = {"bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "client.pt",
                                    "layer_01-model_00-model_states.pt",
                                    "mp_rank_00_model_states.pt",
                                    "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                    "layer_02-model_states.pt"};
  std::stable_sort(files.begin(), files.end(), PlacedBefore);
  CHECK(files == std::vector<std::string>{"mp_rank_00_model_states.pt",
                                          "layer_01-model_00-model_states.pt",
                                          "layer_02-model_states.pt", "client.pt",
                                          "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                          "zero_pp_rank_0_mp_rank_00_optim_states.pt"});
}

TEST_CASE("the placer refuses a layer tensor whose shape disagrees with param_shapes",
          "[unit][checkpoint][reshape]") {
  TempDir a;
  const TrainLayout layout{2, 2, 1, 2, true, LayerFiles::kModelAxis};
  SynthTag(*OpenStore(a.path()), "t", layout);
  const std::string layer = LayerFileName(2, 1);
  c10::IValue model_state, layer_state;
  {
    KvCheckpointEngine src(Config(a.path()));
    REQUIRE(src.open(a.path(), "t").value() == "t");
    model_state = src.load(a.path() + "/t/" + ModelFileName(0));
    layer_state = src.load(a.path() + "/t/" + layer);
  }
  DeepSpeedPlacer placer;
  auto none = placer.TryPlace("u", layer, layer_state);
  REQUIRE_FALSE(none.ok());
  CHECK_THAT(none.status().ToString(), Catch::Contains("ckptkv place"));
  REQUIRE(placer.TryPlace("u", ModelFileName(0), model_state).ok());
  auto placed = placer.TryPlace("u", layer, layer_state);
  REQUIRE(placed.ok());
  CHECK(placed->size() == layer_state.toGenericDict().size());
  for (const auto& [impl, pl] : *placed) {
    CHECK(pl.tp_rank == 1);
    CHECK(pl.tp_degree == 2);
    CHECK(pl.param.rfind("2.", 0) == 0);
  }
  // get_layer_ckpt_name_for_rank's spelling places alike.
  auto utils_name = placer.TryPlace("u", "layer_02-model_01_model_states.pt", layer_state);
  REQUIRE(utils_name.ok());
  CHECK(utils_name->size() == placed->size());
  // Without checkpoint_parallel_dimensions, a pipeline file's
  // mp_world_size is pp x tp: tp comes from Megatron's args, or is unknown.
  c10::IValue old = model_state.deepcopy();
  old.toGenericDict().erase("checkpoint_parallel_dimensions");
  auto from_args = placer.TryPlace("v", ModelFileName(0), old);
  REQUIRE(from_args.ok());
  auto via_args = placer.TryPlace("v", layer, layer_state);
  REQUIRE(via_args.ok());
  for (const auto& [impl, pl] : *via_args) CHECK(pl.tp_degree == 2);
  old.toGenericDict().erase("args");
  auto unknown = placer.TryPlace("w", ModelFileName(0), old);
  REQUIRE_FALSE(unknown.ok());
  CHECK_THAT(unknown.status().ToString(), Catch::Contains("pp x tp"));

  c10::IValue bad = layer_state.deepcopy();
  bad.toGenericDict().insert_or_assign("mlp.dense_h_to_4h.weight", at::zeros({3, 5}));
  auto r = placer.TryPlace("u", layer, bad);
  REQUIRE_FALSE(r.ok());
  CHECK_THAT(r.status().ToString(), Catch::Contains("2.mlp.dense_h_to_4h.weight"));
}
