// The CUDA code paths: reshape, universal export/import and synth with the
// fragments assembled on the GPU, TagIndex::Assemble on a device, and
// KvCheckpointEngine saving CUDA tensors. Each "cuda:" test compares the GPU
// path against the CPU path byte for byte; where this LibTorch has no CUDA
// or no GPU is present it says why (WARN "skipped: ...") and passes without
// asserting. The device option's errors are checked everywhere.
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>
#include <torch/cuda.h>

#include <catch2/catch.hpp>
#include <algorithm>
#include <cstring>
#include <sstream>

#include "checkpoint/query/reshape.h"
#include "checkpoint/query/synth.h"
#include "checkpoint/query/tag_index.h"
#include "checkpoint/query/writer.h"
#include "engine/kv_checkpoint_engine.h"
#include "tests/checkpoint/small_gpt.h"
#include "tests/test_util.h"

using namespace ckptkv;
using namespace ckptkv::checkpoint;
using ckptkv::testing::MessageOf;
using ckptkv::testing::TempDir;

namespace {

// The line gpu-check.sh looks for: on a GPU host it must not appear.
constexpr const char* kSkipped = "skipped: CUDA is not available";

bool HaveCuda() { return torch::cuda::is_available() && torch::cuda::device_count() > 0; }

// True where the CUDA paths can run; otherwise records why the test skips.
bool CudaOrSkip() {
  if (HaveCuda()) return true;
  WARN(kSkipped << " (this LibTorch has no CUDA support or no GPU is present)");
  return false;
}

bool Contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

std::unique_ptr<Store> OpenStore(const std::string& dir) {
  StoreOptions o;
  o.chunk_size = 16 * 1024;  // many chunks per tensor, so ranged reads matter
  auto r = Store::Open(dir, o);
  INFO(r.status().ToString());
  REQUIRE(r.ok());
  return std::move(r).value();
}

SynthOptions SmallSynth(int tp, int pp, int dp, int zero, bool bf16, uint64_t seed = 42) {
  SynthOptions o;
  o.model = ckptkv::testing::SmallGpt();
  o.layout = TrainLayout{tp, pp, dp, zero, bf16};
  o.seed = seed;
  return o;
}

void SynthTag(Store& s, const std::string& tag, const SynthOptions& o,
              const std::string& device = "cpu") {
  WriteOptions w;
  w.device = device;
  auto r = Synth(s, tag, o, w);
  INFO("synth " << tag << " on " << device << ": " << r.status().ToString());
  REQUIRE(r.ok());
}

WriteOptions On(const std::string& device) {
  WriteOptions w;
  w.device = device;
  return w;
}

// Raw bytes of a stored tensor.
std::string ReadBytes(const Store& s, const std::string& tag, const std::string& file,
                      const std::string& param) {
  auto rec = s.GetTensorRecord(tag, file, param);
  INFO(tag << "/" << file << ":" << param << " " << rec.status().ToString());
  REQUIRE(rec.ok());
  std::string bytes(rec.value()->byte_length(), '\0');
  Status st = s.ReadTensor(*rec.value().get(), reinterpret_cast<uint8_t*>(bytes.data()),
                           bytes.size(), tag + "/" + file + ":" + param);
  INFO(st.ToString());
  REQUIRE(st.ok());
  return bytes;
}

std::vector<int64_t> ShapeOf(const fb::TensorRecord& r) {
  if (r.shape() == nullptr) return {};
  return {r.shape()->begin(), r.shape()->end()};
}

// Every difference between two tags of one store: the file lists, each
// file's state tree and tensor paths, and each tensor's dtype, shape and
// bytes (read back, not only compared by digest). Empty when equal.
std::vector<std::string> TagDifferences(const Store& s, const std::string& a,
                                        const std::string& b) {
  std::vector<std::string> diffs;
  auto fa = s.ListFiles(a);
  auto fb = s.ListFiles(b);
  REQUIRE(fa.ok());
  REQUIRE(fb.ok());
  if (*fa != *fb) {
    diffs.push_back("file lists differ");
    return diffs;
  }
  for (const std::string& f : *fa) {
    auto ta = s.GetFileTree(a, f);
    auto tb = s.GetFileTree(b, f);
    REQUIRE(ta.ok());
    REQUIRE(tb.ok());
    if (*ta != *tb) diffs.push_back(f + ": state trees differ");
    auto pa = s.ListParams(a, f);
    auto pb = s.ListParams(b, f);
    REQUIRE(pa.ok());
    REQUIRE(pb.ok());
    if (*pa != *pb) {
      diffs.push_back(f + ": tensor paths differ");
      continue;
    }
    for (const std::string& p : *pa) {
      auto ra = s.GetTensorRecord(a, f, p);
      auto rb = s.GetTensorRecord(b, f, p);
      REQUIRE(ra.ok());
      REQUIRE(rb.ok());
      const std::string where = f + ":" + p;
      if (ra.value()->dtype() != rb.value()->dtype()) diffs.push_back(where + ": dtype");
      if (ShapeOf(*ra.value().get()) != ShapeOf(*rb.value().get())) {
        diffs.push_back(where + ": shape");
      } else if (ReadBytes(s, a, f, p) != ReadBytes(s, b, f, p)) {
        diffs.push_back(where + ": bytes");
      }
    }
  }
  return diffs;
}

std::string Joined(const std::vector<std::string>& v, size_t most = 8) {
  std::ostringstream out;
  for (size_t i = 0; i < v.size() && i < most; ++i) out << v[i] << "\n";
  if (v.size() > most) out << "... " << v.size() - most << " more\n";
  return out.str();
}

void RequireSameTags(const Store& s, const std::string& a, const std::string& b) {
  std::vector<std::string> diffs = TagDifferences(s, a, b);
  INFO(a << " vs " << b << ":\n" << Joined(diffs));
  CHECK(diffs.empty());
}

uint64_t TensorCount(const Store& s, const std::string& tag) {
  uint64_t n = 0;
  auto files = s.ListFiles(tag);
  REQUIRE(files.ok());
  for (const auto& f : *files) n += s.ListParams(tag, f)->size();
  return n;
}

bool TagExists(const Store& s, const std::string& tag) { return s.GetTag(tag).ok(); }

// Same dtype, shape and bytes, and `got` on `device`.
void RequireSameTensor(const at::Tensor& want, const at::Tensor& got, const c10::Device& device,
                       const std::string& name) {
  INFO(name << ": want " << want.toString() << " " << want.sizes() << ", got " << got.toString()
            << " " << got.sizes() << " on " << got.device());
  REQUIRE(got.defined());
  CHECK(got.device() == device);
  REQUIRE(got.scalar_type() == want.scalar_type());
  REQUIRE(got.sizes() == want.sizes());
  CHECK(got.requires_grad() == want.requires_grad());
  at::Tensor w = want.detach().cpu().contiguous();
  at::Tensor g = got.detach().cpu().contiguous();
  const size_t n = static_cast<size_t>(w.numel()) * w.element_size();
  if (n > 0) CHECK(std::memcmp(w.data_ptr(), g.data_ptr(), n) == 0);
}

}  // namespace

TEST_CASE("the tag comparison used by the CUDA tests sees equal tags and every difference",
          "[unit][cuda]") {
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", SmallSynth(2, 2, 2, 2, true));
  SynthTag(*store, "other_seed", SmallSynth(2, 2, 2, 2, true, 43));
  ReshapeOptions o;
  o.tp = 1;
  o.pp = 1;
  o.dp = 1;
  o.out_tag = "a";
  REQUIRE(Reshape(*store, "src", o).ok());
  o.out_tag = "b";
  REQUIRE(Reshape(*store, "src", o).ok());
  o.out_tag = "c";
  REQUIRE(Reshape(*store, "other_seed", o).ok());
  // Two reshapes of one tag: equal, trees included.
  CHECK(TagDifferences(*store, "a", "b").empty());
  // Another seed: the tensors that hold values differ, and so does the
  // model file's tree (its args record the seed).
  std::vector<std::string> diffs = TagDifferences(*store, "a", "c");
  INFO(Joined(diffs));
  size_t bytes = 0;
  for (const auto& d : diffs) {
    INFO(d);
    bytes += Contains(d, ": bytes") ? 1 : 0;
    CHECK((Contains(d, ": bytes") || d == "mp_rank_00_model_states.pt: state trees differ"));
  }
  CHECK(bytes > TensorCount(*store, "a") / 2);
  CHECK(std::count(diffs.begin(), diffs.end(), "mp_rank_00_model_states.pt: state trees differ") ==
        1);
  // A different layout: the file lists differ.
  CHECK(TagDifferences(*store, "a", "src") == std::vector<std::string>{"file lists differ"});
}

TEST_CASE("the device option: cpu is accepted, a name that is no device is InvalidArgument",
          "[unit][cuda]") {
  CHECK(CheckDevice("cpu").ok());
  for (const std::string bad : {"gpu", "", "cuda:x", "cuda0", "cpu:", "mps"}) {
    INFO("device '" << bad << "'");
    Status s = CheckDevice(bad);
    INFO(s.ToString());
    CHECK(s.IsInvalidArgument());
    CHECK(Contains(s.message(), "'" + bad + "'"));
    CHECK(Contains(s.message(), "give cpu, cuda or cuda:N"));
  }
  // A reshape with such a device writes nothing.
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", SmallSynth(2, 1, 1, 1, false));
  ReshapeOptions o;
  o.out_tag = "out";
  o.write.device = "gpu";
  auto r = Reshape(*store, "src", o);
  CHECK(r.status().IsInvalidArgument());
  CHECK(Contains(r.status().message(), "'gpu'"));
  CHECK_FALSE(TagExists(*store, "out"));
}

TEST_CASE("without CUDA, a CUDA device is refused by name with what to use instead",
          "[unit][cuda]") {
  if (HaveCuda()) {
    // The other side of the same option: CUDA devices that exist are accepted.
    CHECK(CheckDevice("cuda").ok());
    CHECK(CheckDevice("cuda:0").ok());
    return;
  }
  for (const std::string dev : {"cuda", "cuda:0", "cuda:1"}) {
    INFO("device '" << dev << "'");
    Status s = CheckDevice(dev);
    INFO(s.ToString());
    CHECK(s.code() == Status::Code::kNotSupported);
    CHECK(Contains(s.message(), "'" + dev + "'"));
    CHECK(Contains(s.message(), "no CUDA support or no GPU"));
    CHECK(Contains(s.message(), "use --device cpu"));
  }
  spdlog::set_level(spdlog::level::warn);
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", SmallSynth(2, 1, 2, 2, true));
  // Synth, reshape, export and import all refuse before they write anything.
  WriteOptions cuda = On("cuda");
  auto synth = Synth(*store, "synth_cuda", SmallSynth(1, 1, 1, 1, true), cuda);
  CHECK(synth.status().code() == Status::Code::kNotSupported);
  ReshapeOptions o;
  o.out_tag = "out";
  o.write = cuda;
  auto r = Reshape(*store, "src", o);
  CHECK(r.status().code() == Status::Code::kNotSupported);
  CHECK(Contains(r.status().message(), "'cuda'"));
  auto u = ExportUniversal(*store, "src", "uni", cuda);
  CHECK(u.status().code() == Status::Code::kNotSupported);
  for (const char* tag : {"synth_cuda", "out", "uni"}) {
    INFO(tag);
    CHECK_FALSE(TagExists(*store, tag));
  }
  // Nothing was left pending: the same tags can be written on the CPU.
  o.write = On("cpu");
  REQUIRE(Reshape(*store, "src", o).ok());
  REQUIRE(ExportUniversal(*store, "src", "uni", On("cpu")).ok());
  auto i = ImportUniversal(*store, "uni", TrainLayout{1, 1, 1, 1, true}, "back", cuda);
  CHECK(i.status().code() == Status::Code::kNotSupported);
  CHECK_FALSE(TagExists(*store, "back"));
  // A query on a device is checked the same way.
  auto ix = TagIndex::Build(*store, "src");
  REQUIRE(ix.ok());
  const std::string param = (*ix)->params().begin()->first;
  CHECK((*ix)->Assemble(param, "fp32", "cuda").status().code() == Status::Code::kNotSupported);
  CHECK((*ix)->Assemble(param, "fp32", "gpu").status().code() == Status::Code::kInvalidArgument);
  CHECK((*ix)->Assemble(param, "fp32", "cpu").ok());

  // The engine: a load mapped to CUDA names the tensor and says what to do.
  KvEngineConfig config;
  config.store.chunk_size = 16 * 1024;
  KvCheckpointEngine engine(config);
  const std::string db = dir.Sub("engine");
  engine.makedirs(db, true);
  engine.create(CommitInfo{"t", db, true});
  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  sd.insert("w", at::arange(10, at::kFloat));
  engine.save(sd, db + "/t/mp_rank_00_model_states.pt");
  REQUIRE(engine.commit(CommitInfo{"t", db, true}));
  Status::Code code;
  std::string msg = MessageOf(
      [&] { engine.load(db + "/t/mp_rank_00_model_states.pt", c10::Device("cuda")); }, &code);
  INFO(msg);
  CHECK(code == Status::Code::kInvalidArgument);
  CHECK(Contains(msg, "t/mp_rank_00_model_states.pt:w"));
  CHECK(Contains(msg, "CUDA is not available"));
  CHECK(Contains(msg, "map_location=cpu"));
}

TEST_CASE("cuda: reshape with fragments assembled on the GPU writes the CPU's bytes",
          "[cuda][reshape]") {
  if (!CudaOrSkip()) return;
  spdlog::set_level(spdlog::level::warn);
  struct Case {
    int tp, pp, dp, zero;
    bool bf16;
    int ntp, npp, ndp;
  };
  const Case cases[] = {
      {2, 2, 2, 2, true, 1, 1, 1},   // TP and PP merge, ZeRO-2 re-partitioned, bf16
      {1, 2, 2, 3, true, 2, 1, 3},   // TP split, ZeRO-3
      {2, 1, 3, 1, false, 1, 1, 2},  // fp32, ZeRO-1
  };
  for (const Case& c : cases) {
    DYNAMIC_SECTION("tp" << c.tp << "pp" << c.pp << "dp" << c.dp << " z" << c.zero << " -> tp"
                         << c.ntp << "pp" << c.npp << "dp" << c.ndp) {
      TempDir dir;
      auto store = OpenStore(dir.path());
      SynthTag(*store, "src", SmallSynth(c.tp, c.pp, c.dp, c.zero, c.bf16));
      ReshapeOptions o;
      o.tp = c.ntp;
      o.pp = c.npp;
      o.dp = c.ndp;
      o.out_tag = "on_cpu";
      auto cpu = Reshape(*store, "src", o);
      INFO(cpu.status().ToString());
      REQUIRE(cpu.ok());
      for (const std::string dev : {"cuda", "cuda:0"}) {
        INFO("device " << dev);
        o.out_tag = "on_" + dev;
        o.write = On(dev);
        auto gpu = Reshape(*store, "src", o);
        INFO(gpu.status().ToString());
        REQUIRE(gpu.ok());
        // Something was assembled on the device, not only linked.
        CHECK(gpu->write.tensors > gpu->write.linked_tensors);
        CHECK(gpu->write.tensors == cpu->write.tensors);
        CHECK(gpu->write.linked_tensors == cpu->write.linked_tensors);
        CHECK(gpu->write.logical_bytes == cpu->write.logical_bytes);
        CHECK(gpu->bytes_read == cpu->bytes_read);
        RequireSameTags(*store, "on_cpu", o.out_tag);
      }
    }
  }
}

TEST_CASE("cuda: Assemble on the GPU returns the CPU's tensor, on the GPU", "[cuda]") {
  if (!CudaOrSkip()) return;
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", SmallSynth(4, 2, 2, 2, true));
  auto ix = TagIndex::Build(*store, "src");
  REQUIRE(ix.ok());
  for (const char* name :
       {"tied_modules.embed.word_embeddings.weight", "3.self_attention.dense.weight",
        "4.mlp.dense_h_to_4h.weight", "5.input_layernorm.bias"}) {
    for (const char* state : {"param", "fp32", "exp_avg", "exp_avg_sq"}) {
      INFO(name << " " << state);
      auto cpu = (*ix)->Assemble(name, state, "cpu");
      auto gpu = (*ix)->Assemble(name, state, "cuda:0");
      INFO(cpu.status().ToString() << " / " << gpu.status().ToString());
      REQUIRE(cpu.ok());
      REQUIRE(gpu.ok());
      RequireSameTensor(*cpu, *gpu, c10::Device("cuda:0"), std::string(name) + " " + state);
    }
  }
}

TEST_CASE("cuda: universal export and import on the GPU equal the CPU's", "[cuda][reshape]") {
  if (!CudaOrSkip()) return;
  spdlog::set_level(spdlog::level::warn);
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", SmallSynth(2, 2, 2, 2, true));
  auto cpu = ExportUniversal(*store, "src", "uni_cpu", On("cpu"));
  INFO(cpu.status().ToString());
  REQUIRE(cpu.ok());
  auto gpu = ExportUniversal(*store, "src", "uni_cuda", On("cuda"));
  INFO(gpu.status().ToString());
  REQUIRE(gpu.ok());
  CHECK(gpu->write.tensors > gpu->write.linked_tensors);
  CHECK(gpu->write.tensors == cpu->write.tensors);
  RequireSameTags(*store, "uni_cpu", "uni_cuda");
  // And back into a layout, from the universal tag.
  const TrainLayout to{1, 1, 3, 2, true};
  auto back_cpu = ImportUniversal(*store, "uni_cpu", to, "back_cpu", On("cpu"));
  auto back_gpu = ImportUniversal(*store, "uni_cpu", to, "back_cuda", On("cuda"));
  INFO(back_cpu.status().ToString() << " / " << back_gpu.status().ToString());
  REQUIRE(back_cpu.ok());
  REQUIRE(back_gpu.ok());
  RequireSameTags(*store, "back_cpu", "back_cuda");
}

TEST_CASE("cuda: synth on the GPU writes the CPU's bytes", "[cuda]") {
  if (!CudaOrSkip()) return;
  TempDir dir;
  auto store = OpenStore(dir.path());
  for (bool bf16 : {true, false}) {
    INFO("bf16 " << bf16);
    const std::string suffix = bf16 ? "_bf16" : "_fp32";
    SynthTag(*store, "cpu" + suffix, SmallSynth(2, 2, 2, 3, bf16), "cpu");
    SynthTag(*store, "cuda" + suffix, SmallSynth(2, 2, 2, 3, bf16), "cuda");
    RequireSameTags(*store, "cpu" + suffix, "cuda" + suffix);
  }
}

TEST_CASE("cuda: KvCheckpointEngine saves CUDA tensors and loads them back equal",
          "[cuda][engine]") {
  if (!CudaOrSkip()) return;
  spdlog::set_level(spdlog::level::warn);
  const c10::Device gpu("cuda:0");
  const auto on_gpu = at::TensorOptions().device(gpu);
  at::manual_seed(7);
  // Several chunks each (16 KiB chunks), views that are not contiguous or
  // start inside their storage, every common dtype, 0-d and empty tensors.
  at::Tensor big = at::randn({300, 257}, on_gpu);
  at::Tensor bf16 = at::randn({1000, 33}, on_gpu).to(at::kBFloat16);
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"fp32", big},
      {"fp32_transposed", big.t()},
      {"fp32_strided", big.narrow(1, 3, 100).slice(0, 1, 300, 2)},
      {"bf16", bf16},
      {"bf16_transposed", bf16.t()},
      {"bf16_column", bf16.select(1, 5)},
      {"fp16", at::randn({77, 5}, on_gpu).to(at::kHalf)},
      {"fp64", at::randn({40}, on_gpu.dtype(at::kDouble))},
      {"int64", at::arange(5000, on_gpu.dtype(at::kLong))},
      {"int8", at::randint(-128, 127, {3000}, on_gpu.dtype(at::kChar))},
      {"bool", at::randn({99}, on_gpu) > 0},
      {"scalar", at::scalar_tensor(3.5, on_gpu)},
      {"empty", at::empty({0, 4}, on_gpu)},
      {"param", at::randn({64, 64}, on_gpu).requires_grad_()},
  };
  REQUIRE_FALSE(tensors[1].second.is_contiguous());
  REQUIRE_FALSE(tensors[2].second.is_contiguous());
  REQUIRE_FALSE(tensors[4].second.is_contiguous());
  REQUIRE_FALSE(tensors[5].second.is_contiguous());
  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  for (const auto& [name, t] : tensors) sd.insert(name, t);

  TempDir dir;
  const std::string file = dir.path() + "/global_step1/mp_rank_00_model_states.pt";
  KvEngineConfig config;
  config.store.chunk_size = 16 * 1024;
  {
    KvCheckpointEngine engine(config);
    engine.makedirs(dir.path(), true);
    engine.create(CommitInfo{"global_step1", dir.path(), true});
    engine.save(sd, file);
    CHECK(engine.last_save().tensors == tensors.size());
    REQUIRE(engine.commit(CommitInfo{"global_step1", dir.path(), true}));
  }
  KvCheckpointEngine engine(config);
  REQUIRE(engine.open(dir.path()) == std::optional<std::string>("global_step1"));
  const std::vector<std::pair<std::string, std::optional<c10::Device>>> loads = {
      {"map_location cpu", c10::Device("cpu")},
      {"saved device", std::nullopt},
      {"map_location cuda:0", gpu},
  };
  for (const auto& [what, map_location] : loads) {
    INFO(what);
    c10::IValue loaded = engine.load(file, map_location);
    REQUIRE(loaded.isGenericDict());
    auto d = loaded.toGenericDict();
    REQUIRE(d.size() == tensors.size());
    const c10::Device want_device = map_location ? *map_location : gpu;
    for (const auto& [name, t] : tensors) {
      REQUIRE(d.contains(name));
      at::Tensor got = d.at(name).toTensor();
      CHECK(got.is_contiguous());
      RequireSameTensor(t, got, want_device, name);
    }
  }
}

TEST_CASE("cuda: a CUDA device that does not exist is an InvalidArgument naming it", "[cuda]") {
  if (!CudaOrSkip()) return;
  const std::string missing = "cuda:" + std::to_string(torch::cuda::device_count());
  for (const std::string& bad : {missing, std::string("cuda:99")}) {
    INFO("device '" << bad << "'");
    Status s = CheckDevice(bad);
    INFO(s.ToString());
    CHECK(s.IsInvalidArgument());
    CHECK(Contains(s.message(), "'" + bad + "'"));
  }
  // A reshape asked to run there fails with a Status, leaves no tag, and
  // leaves nothing pending.
  TempDir dir;
  auto store = OpenStore(dir.path());
  SynthTag(*store, "src", SmallSynth(2, 1, 1, 1, false));
  ReshapeOptions o;
  o.out_tag = "out";
  o.write = On("cuda:99");
  Result<ReshapeReport> r = Status::OK();
  CHECK_NOTHROW(r = Reshape(*store, "src", o));
  CHECK_FALSE(r.ok());
  CHECK_FALSE(TagExists(*store, "out"));
  o.write = On("cuda");
  auto again = Reshape(*store, "src", o);
  INFO(again.status().ToString());
  CHECK(again.ok());
}
