// Fragment queries and reshape: a synthetic checkpoint reshaped to another
// layout equals, bit for bit, the one synthesized at that layout.
#include <ATen/ATen.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <functional>
#include <random>
#include <set>
#include <tuple>

#include "checkpoint/core/file_names.h"
#include "checkpoint/query/fragments.h"
#include "checkpoint/core/tag_layout.h"
#include "checkpoint/query/reshape.h"
#include "checkpoint/core/reshape_maps.h"
#include "checkpoint/query/synth.h"
#include "checkpoint/query/tag_index.h"
#include "checkpoint/core/zero_layout.h"
#include "engine/state_codec.h"
#include "tests/checkpoint/small_gpt.h"
#include "tests/test_util.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;
using ckptkv::testing::SmallGpt;
using ckptkv::testing::TempDir;

namespace {

std::unique_ptr<Store> OpenStore(const std::string& dir) {
  StoreOptions o;
  o.chunk_size = 16 * 1024;
  auto r = Store::Open(dir, o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return std::move(r).value();
}

void SynthTag(Store& s, const std::string& tag, int tp, int pp, int dp, int zero, bool bf16,
              const GptConfig& model = SmallGpt()) {
  SynthOptions o;
  o.model = model;
  o.layout = TrainLayout{tp, pp, dp, zero, bf16};
  o.seed = 42;
  auto r = Synth(s, tag, o, WriteOptions());
  INFO(r.status().ToString());
  REQUIRE(r.ok());
}

at::Tensor Read(const Store& s, const std::string& tag, const std::string& file,
                const std::string& param) {
  auto rec = s.GetTensorRecord(tag, file, param);
  INFO(tag << "/" << file << ":" << param << " " << rec.status().ToString());
  REQUIRE(rec.ok());
  std::vector<int64_t> shape(rec.value()->shape()->begin(), rec.value()->shape()->end());
  at::Tensor t = at::empty(shape, ToScalarType(rec.value()->dtype()));
  REQUIRE(s.ReadTensor(*rec.value().get(), static_cast<uint8_t*>(t.data_ptr()),
                       rec.value()->byte_length(), "read")
              .ok());
  return t;
}

// Every tensor of every file equal, and the same files and tensor paths.
void RequireSameTensors(const Store& s, const std::string& a, const std::string& b) {
  auto fa = s.ListFiles(a);
  auto fb = s.ListFiles(b);
  REQUIRE(fa.ok());
  REQUIRE(fb.ok());
  REQUIRE(*fa == *fb);
  for (const auto& f : *fa) {
    auto pa = s.ListParams(a, f);
    auto pb = s.ListParams(b, f);
    REQUIRE(*pa == *pb);
    for (const auto& p : *pa) {
      auto ra = s.GetTensorRecord(a, f, p);
      auto rb = s.GetTensorRecord(b, f, p);
      INFO(f << ":" << p);
      // Equal bytes have equal whole-tensor digests.
      const bool same = ra.value()->digest()->lo() == rb.value()->digest()->lo() &&
                        ra.value()->digest()->hi() == rb.value()->digest()->hi();
      if (!same) {
        CHECK(at::equal(Read(s, a, f, p), Read(s, b, f, p)));
      }
      CHECK(same);
    }
  }
}

}  // namespace

TEST_CASE("a flat range splits into contiguous rectangles that tile it", "[unit][checkpoint]") {
  const uint64_t seed = ckptkv::testing::TestSeed("flat range split");
  std::mt19937_64 rng(seed);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int64_t> shape;
    const int rank = 1 + static_cast<int>(rng() % 3);
    for (int d = 0; d < rank; ++d) shape.push_back(1 + static_cast<int64_t>(rng() % 6));
    const int64_t n = Numel(shape);
    int64_t b = static_cast<int64_t>(rng() % (n + 1));
    int64_t e = b + static_cast<int64_t>(rng() % (n - b + 1));
    at::Tensor block = at::arange(n, at::kLong).view(shape);
    at::Tensor seen = at::zeros({n}, at::kLong);
    for (const FlatRect& fr : SplitFlatRange(shape, b, e)) {
      at::Tensor v = block;
      for (int d = 0; d < rank; ++d) v = v.narrow(d, fr.rect.offsets[d], fr.rect.shape[d]);
      at::Tensor flat = v.reshape({-1});
      // Contiguous and starting where it says.
      REQUIRE(flat.numel() > 0);
      CHECK(flat[0].item<int64_t>() == fr.flat_begin);
      CHECK(at::equal(flat, at::arange(fr.flat_begin, fr.flat_begin + flat.numel(), at::kLong)));
      seen.index_add_(0, flat, at::ones_like(flat));
    }
    at::Tensor expect = at::zeros({n}, at::kLong);
    if (e > b) expect.narrow(0, b, e - b).fill_(1);
    CHECK(at::equal(seen, expect));
  }
}

TEST_CASE("ZeRO stage 1/2 layout matches DeepSpeed's worked example", "[unit][checkpoint]") {
  // dp=4, sizes [10,7,5]: total 22, alignment 8, aligned 24, partitions of 6.
  FlatLayout l = Zero12Layout({10, 7, 5}, 4);
  CHECK(l.partition_size == 6);
  CHECK(l.paddings == std::vector<int64_t>{0, 0, 0, 2});
  REQUIRE(l.pieces[1].size() == 2);
  CHECK(l.pieces[1][0].param == 0);
  CHECK(l.pieces[1][0].start == 0);
  CHECK(l.pieces[1][0].numel == 4);
  CHECK(l.pieces[1][0].param_offset == 6);
  CHECK(l.pieces[1][1].param == 1);
  CHECK(l.pieces[1][1].start == 4);
  CHECK(l.pieces[1][1].numel == 2);
  // Stage 3, dp=2, A(5), B(4): rank0=[A0..A2,B0,B1], rank1=[A3,A4,pad,B2,B3].
  FlatLayout z3 = Zero3Layout({5, 4}, 2);
  CHECK(z3.partition_size == 5);
  REQUIRE(z3.pieces[1].size() == 2);
  CHECK(z3.pieces[1][0].numel == 2);
  CHECK(z3.pieces[1][0].param_offset == 3);
  CHECK(z3.pieces[1][1].start == 3);
  CHECK(z3.pieces[1][1].param_offset == 2);
  CHECK(z3.paddings == std::vector<int64_t>{0, 1});
}

TEST_CASE("synth at one layout reshaped to another equals synth at the other",
          "[unit][checkpoint][reshape]") {
  struct Case {
    int tp, pp, dp, zero;
    int ntp, npp, ndp;
    bool bf16;
  };
  const Case cases[] = {
      {2, 2, 2, 2, 1, 1, 1, true},  {4, 2, 2, 2, 2, 1, 1, true},  {4, 2, 2, 2, 1, 1, 4, true},
      {1, 1, 4, 1, 2, 2, 1, true},  {2, 1, 3, 2, 2, 1, 2, false}, {1, 2, 2, 3, 2, 1, 3, true},
      {2, 2, 1, 3, 1, 1, 2, false}, {2, 2, 2, 1, 2, 2, 1, true},
  };
  for (const Case& c : cases) {
    DYNAMIC_SECTION("tp" << c.tp << "pp" << c.pp << "dp" << c.dp << " z" << c.zero << " -> tp"
                         << c.ntp << "pp" << c.npp << "dp" << c.ndp) {
      TempDir dir;
      auto store = OpenStore(dir.path());
      SynthTag(*store, "src", c.tp, c.pp, c.dp, c.zero, c.bf16);
      SynthTag(*store, "want", c.ntp, c.npp, c.ndp, c.zero, c.bf16);
      ReshapeOptions o;
      o.tp = c.ntp;
      o.pp = c.npp;
      o.dp = c.ndp;
      o.out_tag = "got";
      auto r = Reshape(*store, "src", o);
      INFO(r.status().ToString());
      REQUIRE(r.ok());
      CHECK(r->bytes_read > 0);
      RequireSameTensors(*store, "got", "want");
    }
  }
}

TEST_CASE("synth-reshape equality over random layout pairs (seeded)",
          "[unit][checkpoint][reshape]") {
  const uint64_t seed = ckptkv::testing::TestSeed("random layout pairs");
  std::mt19937_64 rng(seed);
  const int tps[] = {1, 2, 4}, pps[] = {1, 2, 4}, dps[] = {1, 2, 3, 4};
  auto pick = [&](const auto& options) {
    return options[rng() % (sizeof(options) / sizeof(options[0]))];
  };
  for (int trial = 0; trial < 12; ++trial) {
    const int zero = 1 + static_cast<int>(rng() % 3);
    const bool bf16 = rng() % 2 == 0;
    const int tp = pick(tps), pp = pick(pps), dp = pick(dps);
    const int ntp = pick(tps), npp = pick(pps), ndp = pick(dps);
    INFO("seed " << seed << ": tp" << tp << "pp" << pp << "dp" << dp << " z" << zero
                 << (bf16 ? " bf16" : " fp32") << " -> tp" << ntp << "pp" << npp << "dp" << ndp);
    TempDir dir;
    auto store = OpenStore(dir.path());
    SynthTag(*store, "src", tp, pp, dp, zero, bf16);
    SynthTag(*store, "want", ntp, npp, ndp, zero, bf16);
    ReshapeOptions o;
    o.tp = ntp;
    o.pp = npp;
    o.dp = ndp;
    o.out_tag = "got";
    auto r = Reshape(*store, "src", o);
    INFO(r.status().ToString());
    REQUIRE(r.ok());
    RequireSameTensors(*store, "got", "want");
  }
}

TEST_CASE("any range of a planned tensor equals that range of the whole tensor (seeded)",
          "[unit][checkpoint][reshape]") {
  const uint64_t seed = ckptkv::testing::TestSeed("fill ranges");
  std::mt19937_64 rng(seed);
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 2, 2, 2, true);
  auto index = TagIndex::Build(*store, "src");
  REQUIRE(index.ok());
  auto info = DescribeTag(*store, **index);
  REQUIRE(info.ok());
  // A target that merges TP, splits DP unevenly and keeps rect and flat forms.
  auto files = PlanFiles(info->spec, TrainLayout{1, 1, 3, 2, true}, info->meta);
  REQUIRE(files.ok());
  int checked = 0;
  for (const PlannedFile& f : *files) {
    for (const auto& [impl, pl] : f.placements) {
      const std::vector<int64_t> shape(impl->sizes().begin(), impl->sizes().end());
      const c10::ScalarType dtype = c10::typeMetaToScalarType(impl->dtype());
      at::Tensor whole = at::empty(shape, dtype);
      REQUIRE(FillFromPlacement(info->spec, pl, **index, whole).ok());
      const at::Tensor flat = whole.view({-1});
      const int64_t n = flat.numel();
      for (int k = 0; k < 4 && n > 0; ++k) {
        const int64_t b = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
        const int64_t e = b + 1 + static_cast<int64_t>(rng() % static_cast<uint64_t>(n - b));
        at::Tensor piece = at::empty({e - b}, dtype);
        INFO("seed " << seed << ": " << f.name << " " << pl.param << "/" << pl.state << " [" << b
                     << ", " << e << ") of " << n);
        REQUIRE(FillRangeFromPlacement(info->spec, pl, **index, shape, b, e, piece).ok());
        CHECK(at::equal(piece, flat.narrow(0, b, e - b)));
        checked++;
      }
      // A range that does not fit is an error, not a write past the buffer.
      at::Tensor small = at::empty({1}, dtype);
      CHECK(FillRangeFromPlacement(info->spec, pl, **index, shape, n, n + 1, small)
                .IsInvalidArgument());
    }
  }
  CHECK(checked > 100);
}

TEST_CASE("reshape reads fragments, links unchanged tensors, and changes what must change",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 2, 2, 2, true);
  // Only DP changes: the model files keep their tensors (linked, no bytes read for them).
  ReshapeOptions o;
  o.tp = 2;
  o.pp = 2;
  o.dp = 1;
  o.out_tag = "dp1";
  auto r = Reshape(*store, "src", o);
  REQUIRE(r.ok());
  CHECK(r->write.linked_tensors > 0);
  const std::string model = "mp_rank_01_model_states.pt";
  auto a = store->GetTensorRecord("src", model, "module/tied_modules.embed.word_embeddings.weight");
  auto b = store->GetTensorRecord("dp1", model, "module/tied_modules.embed.word_embeddings.weight");
  REQUIRE(a.ok());
  REQUIRE(b.ok());
  CHECK(a.value()->digest()->lo() == b.value()->digest()->lo());
  // The optimizer partitions did change: dp1 holds what two ranks held.
  auto p0 = store->GetTensorRecord("src", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                   "optimizer_state_dict/base_optimizer_state/state/0/exp_avg");
  auto p1 = store->GetTensorRecord("dp1", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                   "optimizer_state_dict/base_optimizer_state/state/0/exp_avg");
  REQUIRE(p0.ok());
  REQUIRE(p1.ok());
  CHECK(p1.value()->byte_length() >= 2 * p0.value()->byte_length() - 16);
  // A different seed at the same layout is detected as different.
  SynthOptions so;
  so.model = SmallGpt();
  so.layout = TrainLayout{2, 2, 1, 2, true};
  so.seed = 43;
  REQUIRE(Synth(*store, "other", so, WriteOptions()).ok());
  auto x =
      store->GetTensorRecord("other", model, "module/tied_modules.embed.word_embeddings.weight");
  CHECK(x.value()->digest()->lo() != b.value()->digest()->lo());
  // Impossible layouts are refused with the reason.
  o.tp = 3;
  o.out_tag = "bad";
  auto bad = Reshape(*store, "src", o);
  CHECK(bad.status().IsInvalidArgument());
  CHECK(bad.status().message().find("tp must divide") != std::string::npos);
  o.tp = 2;
  o.pp = 3;
  bad = Reshape(*store, "src", o);
  CHECK(bad.status().message().find("pipeline stages") != std::string::npos);
}

TEST_CASE("a query assembles a full parameter from TP shards and from ZeRO partitions",
          "[unit][checkpoint]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "tp", 4, 1, 1, 2, false);
  SynthTag(*store, "one", 1, 1, 1, 2, false);
  auto tp = TagIndex::Build(*store, "tp");
  auto one = TagIndex::Build(*store, "one");
  REQUIRE(tp.ok());
  REQUIRE(one.ok());
  for (const char* name : {"2.self_attention.dense.weight", "2.mlp.dense_h_to_4h.weight",
                           "tied_modules.embed.word_embeddings.weight", "5.input_layernorm.bias"}) {
    for (const char* state : {"param", "fp32", "exp_avg"}) {
      INFO(name << " " << state);
      auto x = (*tp)->Assemble(name, state);
      auto y = (*one)->Assemble(name, state);
      REQUIRE(x.ok());
      REQUIRE(y.ok());
      CHECK(at::equal(*x, *y));
    }
  }
  // The stored single shard of tp1 is the assembled tensor.
  at::Tensor whole =
      Read(*store, "one", "mp_rank_00_model_states.pt", "module/2.self_attention.dense.weight");
  CHECK(at::equal(whole, *(*tp)->Assemble("2.self_attention.dense.weight", "param")));
  // A slice reads only the chunks that hold it.
  auto plan = (*tp)->Plan("2.mlp.dense_h_to_4h.weight", "param", Rect{{0, 0}, {4, 64}});
  REQUIRE(plan.ok());
  REQUIRE(plan->size() == 1);
  CHECK((*plan)[0].byte_length == 4 * 64 * 4);
  auto missing = (*tp)->Assemble("2.mlp.dense_h_to_4h.wieght", "param");
  CHECK(missing.status().IsNotFound());
  CHECK(missing.status().message().find("2.mlp.dense_h_to_4h.weight") != std::string::npos);
}

TEST_CASE("DiscoverTagLayout: one answer for a trained, a reshaped and a universal tag",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 2, 2, 2, true);
  auto src = DiscoverTagLayout(*store, "src");
  INFO(src.status().ToString());
  REQUIRE(src.ok());
  CHECK(src->degrees == Model3dDesc{2, 2, 2});
  CHECK_FALSE(src->universal);
  CHECK(src->files.model_by_mp.size() == 4);
  CHECK(src->files.optim_by_rank.size() == 8);
  // DeepSpeed's get_model_3d_descriptor and the queries agree.
  CHECK(GetModel3dDescriptor(*store, "src").value() == src->degrees);

  ReshapeOptions ro;
  ro.tp = 1;
  ro.pp = 2;
  ro.dp = 1;
  ro.out_tag = "small";
  REQUIRE(Reshape(*store, "src", ro).ok());
  auto small = DiscoverTagLayout(*store, "small");
  REQUIRE(small.ok());
  CHECK(small->degrees == Model3dDesc{2, 1, 1});

  // A universal tag has no ZeRO files to count: the degree its model files
  // record is kept (DeepSpeed's descriptor counts files and says 1).
  REQUIRE(ExportUniversal(*store, "src", "uni", WriteOptions()).ok());
  auto uni = DiscoverTagLayout(*store, "uni");
  REQUIRE(uni.ok());
  CHECK(uni->universal);
  CHECK(uni->degrees == Model3dDesc{2, 2, 2});
  CHECK(GetModel3dDescriptor(*store, "uni").value() == Model3dDesc{2, 2, 1});
  CHECK(DiscoverTagLayout(*store, "no-such-tag").status().IsNotFound());
}

TEST_CASE("universal export and import round-trip to any layout", "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 2, 2, 2, true);
  auto u = ExportUniversal(*store, "src", "uni", WriteOptions());
  INFO(u.status().ToString());
  REQUIRE(u.ok());
  auto files = store->ListFiles("uni");
  REQUIRE(files.ok());
  const std::string emb = "zero/tied_modules.embed.word_embeddings.weight/fp32.pt";
  at::Tensor full = Read(*store, "uni", emb, "param");
  CHECK(full.size(0) == SmallGpt().vocab);  // padding cropped
  CHECK(full.size(1) == SmallGpt().hidden);
  auto ix = TagIndex::Build(*store, "src");
  REQUIRE(ix.ok());
  at::Tensor padded = *(*ix)->Assemble("tied_modules.embed.word_embeddings.weight", "fp32");
  CHECK(at::equal(full, padded.narrow(0, 0, SmallGpt().vocab)));
  for (auto [tp, pp, dp, zero] : {std::tuple{1, 1, 3, 2}, std::tuple{4, 2, 1, 1}}) {
    DYNAMIC_SECTION("import to tp" << tp << " pp" << pp << " dp" << dp << " z" << zero) {
      SynthTag(*store, "want", tp, pp, dp, zero, true);
      auto r = ImportUniversal(*store, "uni", TrainLayout{tp, pp, dp, zero, true}, "got",
                               WriteOptions());
      INFO(r.status().ToString());
      REQUIRE(r.ok());
      RequireSameTensors(*store, "got", "want");
    }
  }
}

TEST_CASE("the reshape plan reads the model files DeepSpeed's 2D map names",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 4, 2, 2, 2, true);
  for (auto [ntp, npp] : {std::pair{2, 1}, std::pair{1, 1}, std::pair{2, 2}, std::pair{4, 1}}) {
    INFO("tp4 pp2 -> tp" << ntp << " pp" << npp);
    auto plan = PlanReshape(*store, "src", ntp, npp, 1);
    INFO(plan.status().ToString());
    REQUIRE(plan.ok());
    auto ds = ReshapeMeg2dParallel(2, 4, npp, ntp);
    REQUIRE(ds.ok());
    for (int p = 0; p < npp; ++p) {
      for (int t = 0; t < ntp; ++t) {
        auto want = ds->GetData(p, t);
        REQUIRE(want.ok());
        std::vector<int> w = *want;
        std::sort(w.begin(), w.end());
        std::vector<int> got = plan->model_files[Meg2dParallelMap::Key(p, t)];
        // A new last stage also reads the tied embedding of the old first stage.
        if (npp > 1 && p == npp - 1) {
          got.erase(std::remove_if(got.begin(), got.end(),
                                   [&](int i) { return i < 4 && w.front() >= 4; }),
                    got.end());
        }
        CHECK(got == w);
      }
    }
    CHECK(plan->bytes_to_read > 0);
  }
}

TEST_CASE("a reshape reads the chunks its plan names, each once", "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());  // 16 KiB chunks: many pieces end mid-chunk
  SynthTag(*store, "src", 4, 2, 2, 2, true);
  for (auto [ntp, npp, ndp] : {std::tuple{2, 1, 1}, std::tuple{1, 1, 4}, std::tuple{2, 2, 3}}) {
    INFO("tp4 pp2 dp2 -> tp" << ntp << " pp" << npp << " dp" << ndp);
    auto plan = PlanReshape(*store, "src", ntp, npp, ndp);
    INFO(plan.status().ToString());
    REQUIRE(plan.ok());
    ReshapeOptions o;
    o.tp = ntp;
    o.pp = npp;
    o.dp = ndp;
    o.out_tag = "r" + std::to_string(ntp) + std::to_string(npp) + std::to_string(ndp);
    auto r = Reshape(*store, "src", o);
    INFO(r.status().ToString());
    REQUIRE(r.ok());
    // Also for pp2, whose first and last stage both hold the tied embedding:
    // this checkpoint fits the 64 MiB chunk cache, which serves the second
    // copy (a larger one may read it again).
    CHECK(r->bytes_read == plan->bytes_to_read);
  }
}

TEST_CASE("a store whose chunks split elements still reshapes exactly",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  StoreOptions so;
  so.chunk_size = 4097;  // not a multiple of any element size but 1
  auto opened = Store::Open(dir.path(), so);
  REQUIRE(opened.ok());
  Store& store = **opened;
  SynthTag(store, "src", 2, 2, 2, 2, true);
  SynthTag(store, "want", 1, 1, 3, 2, true);
  ReshapeOptions o;
  o.tp = 1;
  o.pp = 1;
  o.dp = 3;
  o.out_tag = "got";
  auto r = Reshape(store, "src", o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  RequireSameTensors(store, "got", "want");
}

// --- Stored placements are checked, never trusted -------------------------

namespace {

using PlacementEdit = std::function<void(const std::string& file, const std::string& path,
                                         std::optional<Placement>*)>;

// Commits `out` with every tensor of `src` linked (no bytes copied), each
// placement passed through `edit`, and the files in `drop` left out.
void Recommit(Store& s, const std::string& src, const std::string& out, const PlacementEdit& edit,
              const std::set<std::string>& drop = {}) {
  REQUIRE(s.BeginTag(out).ok());
  auto files = s.ListFiles(src);
  REQUIRE(files.ok());
  for (const auto& f : *files) {
    if (drop.count(f)) continue;
    auto params = s.ListParams(src, f);
    REQUIRE(params.ok());
    for (const auto& p : *params) {
      auto rec = s.GetTensorRecord(src, f, p);
      REQUIRE(rec.ok());
      std::optional<Placement> pl;
      if (rec.value()->placement() != nullptr) pl = PlacementOf(*rec.value()->placement());
      edit(f, p, &pl);
      REQUIRE(s.LinkTensor(out, f, p, *rec.value().get(), pl).ok());
    }
    auto tree = s.GetFileTree(src, f);
    REQUIRE(tree.ok());
    REQUIRE(s.PutFile(out, f, *tree).ok());
  }
  CommitOptions co;
  co.set_latest = false;
  REQUIRE(s.CommitTag(out, co).ok());
}

// An edit of the tensor at (file, path) only.
PlacementEdit At(const std::string& file, const std::string& path,
                 std::function<void(Placement&)> change) {
  return [=](const std::string& f, const std::string& p, std::optional<Placement>* pl) {
    if (f != file || p != path) return;
    REQUIRE(pl->has_value());
    change(**pl);
  };
}

const char* const kModel1 = "mp_rank_01_model_states.pt";
const char* const kOptim10 = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt";
const char* const kOptim11 = "bf16_zero_pp_rank_1_mp_rank_01_optim_states.pt";
const char* const kExpAvg0 = "optimizer_state_dict/base_optimizer_state/state/0/exp_avg";
const char* const kH4h = "module/2.mlp.dense_h_to_4h.weight";

// A reshape of `tag` (tp1 pp1 dp3) and its plan fail with Corruption whose
// message holds every string of `want`, and no tag is committed.
void RequireCorruption(Store& s, const std::string& tag, const std::vector<std::string>& want) {
  ReshapeOptions o;
  o.tp = 1;
  o.pp = 1;
  o.dp = 3;
  o.out_tag = "got";
  auto r = Reshape(s, tag, o);
  INFO(r.status().ToString());
  CHECK(r.status().IsCorruption());
  for (const auto& w : want) CHECK(r.status().message().find(w) != std::string::npos);
  CHECK(s.GetTag("got").status().IsNotFound());
  auto plan = PlanReshape(s, tag, 1, 1, 3);
  INFO("plan: " << plan.status().ToString());
  CHECK(plan.status().IsCorruption());
}

}  // namespace

TEST_CASE("regression: an inconsistent stored placement is Corruption and commits nothing",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 1, 2, 2, true);
  SECTION("shard_dim out of range (indexed past the shape)") {
    Recommit(*store, "src", "bad", At(kModel1, kH4h, [](Placement& p) { p.shard_dim = 7; }));
    RequireCorruption(*store, "bad", {"bad/mp_rank_01_model_states.pt:", kH4h, "shard_dim 7"});
  }
  SECTION("tp_rank >= tp_degree (a shard past the tensor, zero-filled)") {
    Recommit(*store, "src", "bad", At(kOptim11, kExpAvg0, [](Placement& p) { p.tp_rank = 2; }));
    RequireCorruption(*store, "bad", {kOptim11, "tp_rank 2"});
  }
  SECTION("offsets outside global_shape") {
    Recommit(*store, "src", "bad",
             At(kModel1, kH4h, [](Placement& p) { p.offsets[0] += p.global_shape[0]; }));
    RequireCorruption(*store, "bad", {kModel1, "offsets"});
  }
  SECTION("a negative segment shard_start") {
    Recommit(*store, "src", "bad",
             At(kOptim10, kExpAvg0, [](Placement& p) { p.segments.at(0).shard_start = -4; }));
    RequireCorruption(*store, "bad", {kOptim10, "segment", "negative"});
  }
  SECTION("a negative segment numel") {
    Recommit(*store, "src", "bad",
             At(kOptim10, kExpAvg0, [](Placement& p) { p.segments.at(1).numel = -3; }));
    RequireCorruption(*store, "bad", {kOptim10, "segment", "negative"});
  }
  SECTION("a flat tp_degree that does not divide a segment's sharded dimension") {
    Recommit(*store, "src", "bad", At(kOptim11, kExpAvg0, [](Placement& p) { p.tp_degree = 3; }));
    RequireCorruption(*store, "bad", {kOptim11, "tp_degree 3", "does not name a shard"});
  }
  SECTION("a rectangle whose offsets are another TP rank's shard") {
    Recommit(*store, "src", "bad", At(kModel1, kH4h, [](Placement& p) { p.offsets[0] = 0; }));
    RequireCorruption(*store, "bad", {kModel1, kH4h, "not the shard of tp_rank 1"});
  }
  SECTION("a flat_numel other than the tensor's") {
    Recommit(*store, "src", "bad", At(kOptim10, kExpAvg0, [](Placement& p) { p.flat_numel++; }));
    RequireCorruption(*store, "bad", {kOptim10, "flat_numel"});
  }
  SECTION("a fragment whose global_shape differs from the others'") {
    Recommit(*store, "src", "bad", At(kModel1, kH4h, [](Placement& p) { p.global_shape[1] *= 2; }));
    RequireCorruption(*store, "bad", {kModel1, "global_shape", "differs"});
  }
  SECTION("a missing rank (its partitions a gap, zero-filled)") {
    Recommit(*store, "src", "bad",
             [](const std::string&, const std::string&, std::optional<Placement>*) {}, {kOptim10});
    RequireCorruption(*store, "bad", {"in no fragment"});
  }
  SECTION("pieces that overlap") {
    Recommit(*store, "src", "bad", At(kOptim10, kExpAvg0, [](Placement& p) {
      for (auto& seg : p.segments) {
        if (seg.shard_start > 0) {
          seg.shard_start -= 1;
          return;
        }
      }
      FAIL("no segment continues a parameter");
    }));
    RequireCorruption(*store, "bad", {"in more than one fragment", "exp_avg"});
  }
}

TEST_CASE("regression: a tag that lost a model file is Corruption, not InvalidArgument",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 1, 2, 2, true);
  Recommit(*store, "src", "bad",
           [](const std::string&, const std::string&, std::optional<Placement>*) {}, {kModel1});
  RequireCorruption(*store, "bad", {"bad", "model files"});
  // DeepSpeed's descriptor keeps its own code for the same tag.
  CHECK(GetModel3dDescriptor(*store, "bad").status().IsInvalidArgument());
}

TEST_CASE("the exact-cover check finds the first gap or overlap (seeded)", "[unit][checkpoint]") {
  const uint64_t seed = ckptkv::testing::TestSeed("exact cover");
  std::mt19937_64 rng(seed);
  auto any = [&](int64_t n) { return static_cast<int64_t>(rng() % static_cast<uint64_t>(n)); };
  for (int trial = 0; trial < 300; ++trial) {
    const int rank = 1 + static_cast<int>(rng() % 3);
    Rect target;
    for (int d = 0; d < rank; ++d) {
      target.offsets.push_back(any(3));
      target.shape.push_back(1 + any(6));
    }
    // A tiling by recursive cuts, then perhaps one piece dropped, doubled,
    // moved or grown.
    std::vector<Rect> pieces, work{target};
    while (!work.empty()) {
      Rect r = work.back();
      work.pop_back();
      const int d = static_cast<int>(rng() % rank);
      if (r.shape[d] < 2 || rng() % 3 == 0) {
        pieces.push_back(r);
        continue;
      }
      const int64_t cut = 1 + any(r.shape[d] - 1);
      Rect a = r, b = r;
      a.shape[d] = cut;
      b.offsets[d] += cut;
      b.shape[d] -= cut;
      work.push_back(a);
      work.push_back(b);
    }
    std::shuffle(pieces.begin(), pieces.end(), rng);
    const int change = static_cast<int>(rng() % 5);
    const size_t k = rng() % pieces.size();
    if (change == 1) pieces.erase(pieces.begin() + static_cast<std::ptrdiff_t>(k));
    if (change == 2) pieces.push_back(pieces[k]);
    if (change == 3 || change == 4) {
      Rect& r = pieces[k];
      const int d = static_cast<int>(rng() % rank);
      const int64_t lo = target.offsets[d], hi = lo + target.shape[d];
      if (change == 3 && r.offsets[d] > lo) r.offsets[d] -= 1;             // moved
      if (change == 4 && r.offsets[d] + r.shape[d] < hi) r.shape[d] += 1;  // grown
    }
    // Brute force: the first element in row-major order covered != once.
    at::Tensor count = at::zeros(target.shape, at::kLong);
    for (const Rect& r : pieces) {
      at::Tensor v = count;
      for (int d = 0; d < rank; ++d) v = v.narrow(d, r.offsets[d] - target.offsets[d], r.shape[d]);
      v.add_(1);
    }
    at::Tensor flat = count.reshape({-1});
    std::optional<CoverProblem> want;
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const int64_t c = flat[i].item<int64_t>();
      if (c == 1) continue;
      std::vector<int64_t> at(rank);
      int64_t rem = i;
      for (int d = rank - 1; d >= 0; --d) {
        at[d] = target.offsets[d] + rem % target.shape[d];
        rem /= target.shape[d];
      }
      want = CoverProblem{at, c > 1};
      break;
    }
    const std::optional<CoverProblem> got = FirstCoverProblem(pieces, target);
    INFO("seed " << seed << " trial " << trial << " change " << change);
    REQUIRE(got.has_value() == want.has_value());
    if (got) {
      CHECK(got->at == want->at);
      CHECK(got->overlap == want->overlap);
    }
  }
}

TEST_CASE("regression: FillRangeFromPlacement refuses an inconsistent placement",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 1, 2, 2, true);
  auto index = TagIndex::Build(*store, "src");
  REQUIRE(index.ok());
  auto info = DescribeTag(*store, **index);
  REQUIRE(info.ok());
  auto files = PlanFiles(info->spec, TrainLayout{2, 1, 3, 2, true}, info->meta);
  REQUIRE(files.ok());
  const Placement* rect = nullptr;
  const Placement* flat = nullptr;
  std::vector<int64_t> rect_shape, flat_shape;
  for (const PlannedFile& f : *files) {
    for (const auto& [impl, pl] : f.placements) {
      if (!pl.param.empty() && pl.shard_dim == 0 && rect == nullptr) {
        rect = &pl;
        rect_shape.assign(impl->sizes().begin(), impl->sizes().end());
      }
      if (pl.param.empty() && pl.segments.size() > 1 && flat == nullptr) {
        flat = &pl;
        flat_shape.assign(impl->sizes().begin(), impl->sizes().end());
      }
    }
  }
  REQUIRE(rect != nullptr);
  REQUIRE(flat != nullptr);
  auto fill = [&](const Placement& pl, const std::vector<int64_t>& shape) {
    at::Tensor out = at::empty(shape, at::kFloat);
    return FillFromPlacement(info->spec, pl, **index, out);
  };
  REQUIRE(fill(*rect, rect_shape).ok());
  REQUIRE(fill(*flat, flat_shape).ok());
  Placement p = *rect;
  p.shard_dim = 5;
  CHECK(!fill(p, rect_shape).ok());
  p = *rect;
  p.tp_rank = p.tp_degree;
  CHECK(!fill(p, rect_shape).ok());
  p = *flat;
  p.tp_rank = p.tp_degree;
  CHECK(!fill(p, flat_shape).ok());
  p = *flat;
  p.segments[0].start = -1;
  CHECK(!fill(p, flat_shape).ok());
  p = *flat;
  p.segments[1].shard_start = -2;
  CHECK(!fill(p, flat_shape).ok());
  p = *flat;
  p.flat_numel += 1;
  CHECK(!fill(p, flat_shape).ok());
}

TEST_CASE("regression: dp degrees whose last ranks hold only padding plan and reshape exactly",
          "[unit][checkpoint][reshape]") {
  // The model of the report: its no-weight-decay group (1792 elements) leaves
  // ranks that hold only padding at dp 160, 256 and 1024.
  GptConfig model;
  model.layers = 2;
  model.hidden = 64;
  model.vocab = 512;
  model.vocab_multiple = 128;
  model.max_positions = 64;
  const ModelSpec spec = ModelSpec::Gpt(model, ShardingRules::MegatronDefaults());
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 1, 1, 1, 2, true, model);
  for (int dp : {160, 256, 1024}) {
    INFO("dp " << dp);
    auto idx = spec.StageGroup(0, 1, 1);
    REQUIRE(idx.ok());
    std::vector<int64_t> numels;
    for (int i : *idx) numels.push_back(Numel(spec.params()[i].global_shape));
    const FlatLayout fl = Zero12Layout(numels, dp);
    CHECK(std::count(fl.paddings.begin(), fl.paddings.end(), fl.partition_size) > 0);
    auto plan = PlanReshape(*store, "src", 1, 1, dp);
    INFO(plan.status().ToString());
    REQUIRE(plan.ok());
    CHECK(plan->zero_files.size() == static_cast<size_t>(dp));
  }
  for (int dp : {160, 256, 1024}) {
    INFO("dp " << dp);
    const std::string want = "want" + std::to_string(dp), got = "got" + std::to_string(dp);
    SynthTag(*store, want, 1, 1, dp, 2, true, model);
    ReshapeOptions o;
    o.dp = dp;
    o.out_tag = got;
    auto r = Reshape(*store, "src", o);
    INFO(r.status().ToString());
    REQUIRE(r.ok());
    RequireSameTensors(*store, got, want);
  }
  // ZeRO-3 pads every parameter: ranks past the small ones hold none of them.
  SynthTag(*store, "src3", 1, 1, 1, 3, true, model);
  SynthTag(*store, "want3", 1, 1, 320, 3, true, model);
  ReshapeOptions o;
  o.dp = 320;
  o.out_tag = "got3";
  auto r = Reshape(*store, "src3", o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  RequireSameTensors(*store, "got3", "want3");
}

TEST_CASE("a random stored placement change is Corruption or changes nothing (seeded)",
          "[unit][checkpoint][reshape]") {
  const uint64_t seed = ckptkv::testing::TestSeed("placement mutations");
  std::mt19937_64 rng(seed);
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", 2, 2, 2, 2, true);
  SynthTag(*store, "want", 1, 1, 3, 2, true);
  SynthTag(*store, "want_dp1", 2, 2, 1, 2, true);
  // Every placed tensor of the source.
  std::vector<std::pair<std::string, std::string>> placed;
  auto files = store->ListFiles("src");
  REQUIRE(files.ok());
  for (const auto& f : *files) {
    auto params = store->ListParams("src", f);
    REQUIRE(params.ok());
    for (const auto& p : *params) {
      auto rec = store->GetTensorRecord("src", f, p);
      if (rec.value()->placement() != nullptr) placed.emplace_back(f, p);
    }
  }
  REQUIRE(placed.size() > 50);
  auto any = [&](int64_t lo, int64_t hi) {  // in [lo, hi]
    return lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(hi - lo + 1));
  };
  for (int trial = 0; trial < 12; ++trial) {
    const auto& [file, path] = placed[rng() % placed.size()];
    auto rec = store->GetTensorRecord("src", file, path);
    Placement pl = PlacementOf(*rec.value()->placement());
    std::string what;
    // Mutations whose result is either inconsistent or names the same data.
    for (bool done = false; !done;) {
      done = true;
      switch (rng() % 9) {
        case 0:
          pl.tp_rank = static_cast<int32_t>(any(-3, pl.tp_degree + 2));
          what = "tp_rank " + std::to_string(pl.tp_rank);
          break;
        case 1:
          pl.tp_degree = static_cast<int32_t>(any(-2, 5));
          what = "tp_degree " + std::to_string(pl.tp_degree);
          break;
        case 2:
          pl.shard_dim = static_cast<int32_t>(any(-3, 4));
          what = "shard_dim " + std::to_string(pl.shard_dim);
          break;
        case 3:
        case 4: {
          auto& v = rng() % 2 ? pl.offsets : rng() % 2 ? pl.shard_shape : pl.global_shape;
          if (v.empty()) {
            done = false;
            break;
          }
          const size_t d = rng() % v.size();
          v[d] = any(-5, v[d] + 5);
          what = "a shape entry " + std::to_string(v[d]);
          break;
        }
        case 5:
          pl.flat_numel = any(-3, pl.flat_numel + 3);
          what = "flat_numel " + std::to_string(pl.flat_numel);
          break;
        case 6:
        case 7:
        case 8: {
          if (pl.segments.empty()) {
            done = false;
            break;
          }
          auto& seg = pl.segments[rng() % pl.segments.size()];
          const int k = static_cast<int>(rng() % 3);
          if (k == 0) {
            // Within the buffer a moved segment is padding's business: only
            // a start outside it is checkable.
            seg.start = rng() % 2 ? any(-9, -1) : any(pl.flat_numel, pl.flat_numel + 9);
            what = "segment start " + std::to_string(seg.start);
          } else if (k == 1) {
            seg.numel = any(-4, seg.numel + 4);
            what = "segment numel " + std::to_string(seg.numel);
          } else {
            seg.shard_start = any(-4, seg.shard_start + seg.numel + 4);
            what = "segment shard_start " + std::to_string(seg.shard_start);
          }
          break;
        }
      }
    }
    const std::string bad = "bad" + std::to_string(trial);
    const bool keep_layout = rng() % 3 == 0;  // a dp change only: model files link
    INFO("seed " << seed << " trial " << trial << ": " << file << ":" << path << " " << what
                 << (keep_layout ? " -> tp2 pp2 dp1" : " -> tp1 pp1 dp3"));
    Recommit(*store, "src", bad, At(file, path, [&](Placement& p) { p = pl; }));
    ReshapeOptions o;
    o.tp = keep_layout ? 2 : 1;
    o.pp = keep_layout ? 2 : 1;
    o.dp = keep_layout ? 1 : 3;
    o.out_tag = "got" + std::to_string(trial);
    auto r = Reshape(*store, bad, o);
    INFO(r.status().ToString());
    if (r.ok()) {
      RequireSameTensors(*store, o.out_tag, keep_layout ? "want_dp1" : "want");
    } else {
      CHECK(r.status().IsCorruption());
      CHECK(store->GetTag(o.out_tag).status().IsNotFound());
    }
  }
}

namespace {

// Synth of a PipelineModule checkpoint: layer files, module None.
void SynthPipe(Store& s, const std::string& tag, int tp, int pp, int dp, int zero, bool bf16,
               const GptConfig& model = SmallGpt()) {
  SynthOptions o;
  o.model = model;
  o.layout = TrainLayout{tp, pp, dp, zero, bf16, LayerFiles::kModelAxis};
  o.seed = 42;
  auto r = Synth(s, tag, o, WriteOptions());
  INFO(r.status().ToString());
  REQUIRE(r.ok());
}

}  // namespace

TEST_CASE("PipelineModule layer files: synth with layer files reshaped equals synth at the target",
          "[unit][checkpoint][reshape]") {
  struct Case {
    int tp, pp, dp, zero;
    int ntp, npp, ndp;
    bool bf16;
  };
  const Case cases[] = {
      {2, 2, 2, 1, 1, 1, 4, true},   // 2x2x2 -> 1x1x4, ZeRO-1
      {2, 2, 2, 2, 1, 1, 4, true},   // 2x2x2 -> 1x1x4, ZeRO-2
      {1, 2, 2, 2, 2, 1, 1, false},  // 1x2x2 -> 2x1x1
      {2, 2, 1, 1, 2, 4, 3, true},   // 2 layers per stage -> 1, padding at dp 3
      {1, 4, 2, 2, 4, 2, 1, true},   // 1 layer per stage -> 2, TP split 4 ways
  };
  for (const Case& c : cases) {
    DYNAMIC_SECTION("tp" << c.tp << "pp" << c.pp << "dp" << c.dp << " z" << c.zero << " -> tp"
                         << c.ntp << "pp" << c.npp << "dp" << c.ndp) {
      TempDir dir;
      auto store = OpenStore(dir.path());
      SynthPipe(*store, "src", c.tp, c.pp, c.dp, c.zero, c.bf16);
      SynthPipe(*store, "want", c.ntp, c.npp, c.ndp, c.zero, c.bf16);
      // The source is what GPTModelPipe saves: a file per layer and TP
      // rank, and mp_rank files whose module is None.
      const std::vector<std::string> src_files = store->ListFiles("src").value();
      CHECK(std::count(src_files.begin(), src_files.end(), LayerFileName(1, c.tp - 1)) ==
            1);  // the embedding
      CHECK(std::count(src_files.begin(), src_files.end(),
                       LayerFileName(SmallGpt().layers + 3, 0)) == 1);  // the final norm
      auto m0 = LoadPlanned(*store, "src", ModelFileName(0));
      REQUIRE(m0.ok());
      REQUIRE(DictField(m0->state, "module") != nullptr);
      CHECK(DictField(m0->state, "module")->isNone());
      auto plan = PlanReshape(*store, "src", c.ntp, c.npp, c.ndp);
      INFO(plan.status().ToString());
      REQUIRE(plan.ok());
      ReshapeOptions o;
      o.tp = c.ntp;
      o.pp = c.npp;
      o.dp = c.ndp;
      o.out_tag = "got";
      auto r = Reshape(*store, "src", o);
      INFO(r.status().ToString());
      REQUIRE(r.ok());
      CHECK(r->to.layer_files == LayerFiles::kModelAxis);
      RequireSameTensors(*store, "got", "want");
      // It reads the chunks its plan names, each once when no chunk is
      // needed by two output files (a TP split may read a chunk of a
      // weight once for each new rank whose slice it holds).
      CHECK(r->bytes_read >= plan->bytes_to_read);
      if (c.ntp <= c.tp) CHECK(r->bytes_read == plan->bytes_to_read);
      CHECK(plan->bytes_to_read > 0);
      if (c.tp == c.ntp) CHECK(r->write.linked_tensors > 0);
    }
  }
}

TEST_CASE("PipelineModule layer files: the global tensors equal those of mp_rank files",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthPipe(*store, "pipe", 2, 2, 2, 2, true);
  SynthTag(*store, "flat", 1, 1, 1, 2, true);
  auto pipe = TagIndex::Build(*store, "pipe");
  auto flat = TagIndex::Build(*store, "flat");
  REQUIRE(pipe.ok());
  REQUIRE(flat.ok());
  size_t params = 0;
  for (const auto& [name, info] : (*flat)->params()) {
    for (const char* state : {"param", "fp32", "exp_avg", "exp_avg_sq"}) {
      INFO(name << " " << state);
      auto a = (*pipe)->Assemble(name, state);
      auto b = (*flat)->Assemble(name, state);
      REQUIRE(a.ok());
      REQUIRE(b.ok());
      CHECK(at::equal(*a, *b));
    }
    params++;
  }
  CHECK(params == (*pipe)->params().size());
  // A layer file's key is the parameter's name without its layer prefix.
  auto rec = store->GetTensorRecord("pipe", LayerFileName(2, 1), "self_attention.dense.weight");
  REQUIRE(rec.ok());
  REQUIRE(rec.value()->placement() != nullptr);
  const Placement pl = PlacementOf(*rec.value()->placement());
  CHECK(pl.param == "2.self_attention.dense.weight");
  CHECK(pl.shard_dim == 1);
  CHECK(pl.tp_rank == 1);
}

TEST_CASE("PipelineModule layer files: universal export equals the globals and imports back",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthPipe(*store, "pipe", 2, 2, 2, 1, true);
  SynthTag(*store, "flat", 1, 1, 1, 1, true);
  auto u = ExportUniversal(*store, "pipe", "uni_pipe", WriteOptions());
  INFO(u.status().ToString());
  REQUIRE(u.ok());
  REQUIRE(ExportUniversal(*store, "flat", "uni_flat", WriteOptions()).ok());
  // Every zero/<param>/<state>.pt is the same as the one of the same model
  // saved without pipeline or tensor parallelism.
  size_t compared = 0;
  const std::vector<std::string> flat_files = store->ListFiles("uni_flat").value();
  for (const auto& f : flat_files) {
    if (f.rfind("zero/", 0) != 0 || f == "zero/optimizer_state.pt") continue;
    const std::vector<std::string> params = store->ListParams("uni_flat", f).value();
    for (const auto& p : params) {
      INFO(f << ":" << p);
      CHECK(at::equal(Read(*store, "uni_pipe", f, p), Read(*store, "uni_flat", f, p)));
      compared++;
    }
  }
  CHECK(compared > 0);
  auto files = store->ListFiles("uni_pipe").value();
  CHECK(std::count(files.begin(), files.end(), ModelFileName(3)) == 1);
  // Imported back into a pipeline layout with layer files.
  SynthPipe(*store, "want", 1, 4, 3, 2, true);
  auto r =
      ImportUniversal(*store, "uni_pipe", TrainLayout{1, 4, 3, 2, true, LayerFiles::kModelAxis},
                      "got", WriteOptions());
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  RequireSameTensors(*store, "got", "want");
}

TEST_CASE("PipelineModule layer files: names without a model axis, and ZeRO-3 refused",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthOptions o;
  o.model = SmallGpt();
  o.layout = TrainLayout{1, 2, 2, 2, true, LayerFiles::kNoModelAxis};
  o.seed = 42;
  REQUIRE(Synth(*store, "src", o, WriteOptions()).ok());
  auto files = store->ListFiles("src").value();
  CHECK(std::count(files.begin(), files.end(), LayerFileName(1, std::nullopt)) == 1);
  ReshapeOptions ro;
  ro.tp = 1;
  ro.pp = 1;
  ro.dp = 3;
  ro.out_tag = "got";
  auto r = Reshape(*store, "src", ro);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  o.layout.pp = 1;
  o.layout.dp = 3;
  REQUIRE(Synth(*store, "want", o, WriteOptions()).ok());
  RequireSameTensors(*store, "got", "want");

  o.layout.zero_stage = 3;
  auto z3 = Synth(*store, "z3", o, WriteOptions());
  CHECK(z3.status().IsInvalidArgument());
  CHECK_THAT(z3.status().message(), Catch::Contains("ZeRO-3"));
}

TEST_CASE("PipelineModule layer files: the reshape plan maps files as for mp_rank files",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthPipe(*store, "pipe", 2, 2, 2, 2, true);
  SynthTag(*store, "flat", 2, 2, 2, 2, true);
  // A layer file counts as the mp index of its stage and TP rank. Onto one
  // stage both read the same files (onto several, a later stage of the
  // flat tag also reads the tied embedding, which only layer_01 holds).
  for (auto [tp, pp, dp] : {std::tuple{1, 1, 1}, std::tuple{2, 1, 1}, std::tuple{1, 1, 4}}) {
    INFO("-> tp" << tp << " pp" << pp << " dp" << dp);
    auto a = PlanReshape(*store, "pipe", tp, pp, dp);
    auto b = PlanReshape(*store, "flat", tp, pp, dp);
    REQUIRE(a.ok());
    REQUIRE(b.ok());
    CHECK(a->model_files == b->model_files);
    CHECK(a->zero_files == b->zero_files);
    CHECK_FALSE(a->model_files.begin()->second.empty());
  }
}

TEST_CASE("PipelineModule layer files: reshape between layer files and module weights",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthPipe(*store, "pipe", 2, 2, 2, 1, true);
  SynthTag(*store, "flat", 2, 2, 2, 1, true);
  SynthTag(*store, "want_flat", 1, 1, 2, 1, true);
  SynthPipe(*store, "want_pipe", 2, 1, 3, 1, true);
  ReshapeOptions o;
  o.tp = 1;
  o.pp = 1;
  o.dp = 2;
  o.out_tag = "got_flat";
  o.layer_files = LayerFiles::kNone;
  auto r = Reshape(*store, "pipe", o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  RequireSameTensors(*store, "got_flat", "want_flat");
  o.tp = 2;
  o.dp = 3;
  o.out_tag = "got_pipe";
  o.layer_files = LayerFiles::kModelAxis;
  r = Reshape(*store, "flat", o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  RequireSameTensors(*store, "got_pipe", "want_pipe");
}

namespace {

// GPTModelPipe with older Megatron-DeepSpeed's layer numbering: transpose
// lambdas at 2 and L + 3 (no files), transformer layers 3 .. L + 2, the
// final norm at L + 4.
ModelSpec ShiftedGpt(const GptConfig& c) {
  std::vector<ParamSpec> params = ModelSpec::Gpt(c, ShardingRules::MegatronDefaults()).params();
  for (ParamSpec& p : params) {
    if (p.kind == ParamKind::kTied) continue;
    const size_t dot = p.name.find('.');
    const int index = std::stoi(p.name.substr(0, dot));
    p.name = std::to_string(index + 1) + p.name.substr(dot);  // every numbered layer moves by one
    p.layer_index = -1;
    p.layer_key.clear();
  }
  return ModelSpec::FromParams(std::move(params));
}

void WriteShifted(Store& s, const std::string& tag, const TrainLayout& layout) {
  const GptConfig model = SmallGpt();
  const ModelSpec spec = ShiftedGpt(model);
  SynthOptions o;
  o.model = model;
  o.layout = layout;
  auto files = PlanFiles(spec, layout, SynthMeta(o));
  INFO(files.status().ToString());
  REQUIRE(files.ok());
  SynthSource source(spec, model, 42);
  WriteOptions w;
  w.layout = layout.stored();
  auto r = WriteTag(s, tag, spec, *files, source, w);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
}

}  // namespace

TEST_CASE("PipelineModule layer files: other layer numbering keeps its indices",
          "[unit][checkpoint][reshape]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  WriteShifted(*store, "src", TrainLayout{2, 2, 2, 2, true, LayerFiles::kModelAxis});
  WriteShifted(*store, "want", TrainLayout{1, 4, 1, 2, true, LayerFiles::kModelAxis});
  const std::vector<std::string> files = store->ListFiles("src").value();
  CHECK(std::count(files.begin(), files.end(), LayerFileName(3, 1)) == 1);
  CHECK(std::count(files.begin(), files.end(), LayerFileName(SmallGpt().layers + 4, 1)) == 1);
  CHECK(std::count(files.begin(), files.end(), LayerFileName(2, 0)) == 0);
  ReshapeOptions o;
  o.tp = 1;
  o.pp = 4;
  o.dp = 1;
  o.out_tag = "got";
  auto r = Reshape(*store, "src", o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  RequireSameTensors(*store, "got", "want");
}
