// Engine behaviour: round-trips of LibTorch values, views, aliases,
// incremental saves, latest, bad input, corruption, and the baseline.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <rocksdb/db.h>
#include <spdlog/spdlog.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <filesystem>
#include <iostream>
#include <fstream>

#include "engine/kv_checkpoint_engine.h"
#include "engine/state_codec.h"
#include "engine/torch_checkpoint_engine.h"
#include "store/names.h"
#include "tests/crash/fault_injection_fs.h"
#include "tests/python_tree.h"
#include "tests/raw_db.h"
#include "tests/test_util.h"

using namespace ckptkv;
using ckptkv::testing::MessageOf;
using ckptkv::testing::RawDb;
using ckptkv::testing::TempDir;

namespace {

using Dict = c10::impl::GenericDict;

Dict StrDict() { return Dict(c10::StringType::get(), c10::AnyType::get()); }

// Structural equality: kinds, container types, dtypes, shapes, bytes.
void RequireSame(const c10::IValue& a, const c10::IValue& b, const std::string& path = "/") {
  INFO("at " << path << ": " << a.tagKind() << " vs " << b.tagKind());
  REQUIRE(a.tagKind() == b.tagKind());
  if (a.isTensor()) {
    const at::Tensor& x = a.toTensor();
    const at::Tensor& y = b.toTensor();
    REQUIRE(x.defined() == y.defined());
    if (!x.defined()) return;
    REQUIRE(x.scalar_type() == y.scalar_type());
    REQUIRE(x.sizes() == y.sizes());
    REQUIRE(x.requires_grad() == y.requires_grad());
    REQUIRE(y.is_contiguous());
    // Bitwise comparison (NaNs included).
    at::Tensor xc = x.detach().contiguous();
    at::Tensor yc = y.detach().contiguous();
    REQUIRE(xc.numel() * xc.element_size() == yc.numel() * yc.element_size());
    if (xc.numel() > 0) {
      REQUIRE(std::memcmp(xc.data_ptr(), yc.data_ptr(), xc.numel() * xc.element_size()) == 0);
    }
  } else if (a.isGenericDict()) {
    auto da = a.toGenericDict();
    auto db = b.toGenericDict();
    REQUIRE(da.keyType()->str() == db.keyType()->str());
    REQUIRE(da.valueType()->str() == db.valueType()->str());
    REQUIRE(da.size() == db.size());
    auto ib = db.begin();
    for (auto ia = da.begin(); ia != da.end(); ++ia, ++ib) {
      RequireSame(ia->key(), ib->key(), path + "<key>");
      RequireSame(ia->value(), ib->value(), path + "/" + c10::IValue(ia->key()).tagKind());
    }
  } else if (a.isList()) {
    REQUIRE(a.type()->str() == b.type()->str());
    auto la = a.toListRef();
    auto lb = b.toListRef();
    REQUIRE(la.size() == lb.size());
    for (size_t i = 0; i < la.size(); ++i)
      RequireSame(la[i], lb[i], path + "/" + std::to_string(i));
  } else if (a.isTuple()) {
    const auto& ea = a.toTupleRef().elements();
    const auto& eb = b.toTupleRef().elements();
    REQUIRE(ea.size() == eb.size());
    for (size_t i = 0; i < ea.size(); ++i)
      RequireSame(ea[i], eb[i], path + "/" + std::to_string(i));
  } else if (a.isDouble()) {
    double x = a.toDouble(), y = b.toDouble();
    REQUIRE(std::memcmp(&x, &y, sizeof x) == 0);
  } else if (a.isDevice()) {
    REQUIRE(a.toDevice() == b.toDevice());
  } else if (a.isComplexDouble()) {
    REQUIRE(a.toComplexDouble() == b.toComplexDouble());
  } else {
    REQUIRE(a == b);
  }
}

// Every dtype, 0-d, empty, views, nesting, every scalar kind.
c10::IValue RichState() {
  at::manual_seed(42);
  Dict module = StrDict();
  module.insert("fp32", at::randn({7, 5}));
  module.insert("bf16", at::randn({33, 3}).to(at::kBFloat16));
  module.insert("fp16", at::randn({4, 9}).to(at::kHalf));
  module.insert("fp64", at::randn({3}).to(at::kDouble));
  module.insert("int8", at::randint(-100, 100, {50}, at::kChar));
  module.insert("uint8", at::randint(0, 255, {50}, at::kByte));
  module.insert("int16", at::randint(-1000, 1000, {6, 2}, at::kShort));
  module.insert("int32", at::randint(-100000, 100000, {1000}, at::kInt));
  module.insert("int64", at::arange(0, 100000, at::kLong));
  module.insert("bool", at::randn({17}) > 0);
  module.insert("complex", at::randn({5}, at::kComplexFloat));
  module.insert("scalar", at::scalar_tensor(3.5));
  module.insert("empty", at::empty({0, 4}));
  at::Tensor base = at::randn({64, 48});
  module.insert("transposed", base.t());
  module.insert("strided", base.slice(1, 0, 48, 3));
  module.insert("nan", at::full({3}, std::numeric_limits<float>::quiet_NaN()));
  module.insert("grad", at::randn({4}).requires_grad_(true));

  Dict state = StrDict();
  state.insert("module", module);
  Dict opt_state(c10::IntType::get(), c10::AnyType::get());
  for (int64_t i = 0; i < 3; ++i) {
    Dict s = StrDict();
    s.insert("step", i * 10);
    s.insert("exp_avg", at::randn({16}));
    s.insert("exp_avg_sq", at::rand({16}));
    opt_state.insert(i, s);
  }
  Dict optimizer = StrDict();
  optimizer.insert("state", opt_state);
  c10::List<int64_t> params({0, 1, 2});
  Dict group = StrDict();
  group.insert("lr", 1e-4);
  group.insert("betas", c10::ivalue::Tuple::create({0.9, 0.999}));
  group.insert("params", params);
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group);
  optimizer.insert("param_groups", groups);
  state.insert("optimizer", optimizer);
  state.insert("global_steps", int64_t{1234});
  state.insert("loss_scale", 65536.0);
  state.insert("ds_version", std::string("0.16.5"));
  state.insert("finetune", false);
  state.insert("lr_scheduler", c10::IValue());
  state.insert("device", c10::Device("cpu"));
  state.insert("complex_scalar", c10::complex<double>(1.5, -2.0));
  state.insert("sparse_tensor_module_names", c10::List<std::string>({"emb", "head"}));
  state.insert("floats", c10::List<double>({0.5, 0.25}));
  state.insert("tensors", c10::List<at::Tensor>({at::ones({2}), at::zeros({3})}));
  Dict odd = StrDict();
  odd.insert("a/b", at::ones({1}));
  odd.insert("a%2Fb", at::zeros({1}));  // escapes must not collide
  state.insert("odd keys", odd);
  return state;
}

std::unique_ptr<KvCheckpointEngine> MakeEngine(uint32_t chunk = 64 * 1024, bool overwrite = false) {
  KvEngineConfig config;
  config.store.chunk_size = chunk;
  config.store.inline_threshold = 512;
  config.overwrite = overwrite;
  return std::make_unique<KvCheckpointEngine>(config);
}

void SaveOne(CheckpointEngine& e, const std::string& dir, const std::string& tag,
             const c10::IValue& state, const std::string& file = "mp_rank_00_model_states.pt") {
  e.makedirs(dir, true);
  e.create(CommitInfo{tag, dir, true});
  e.makedirs(dir + "/" + tag, true);
  e.save(state, dir + "/" + tag + "/" + file);
  REQUIRE(e.commit(CommitInfo{tag, dir, true}));
}

Status::Code CodeOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const StatusError& e) {
    return e.status().code();
  }
  return Status::Code::kOk;
}

}  // namespace

TEST_CASE("KvCheckpointEngine returns exactly what was saved", "[unit][engine]") {
  spdlog::set_level(spdlog::level::warn);
  TempDir dir;
  c10::IValue state = RichState();
  {
    auto engine = MakeEngine();
    SaveOne(*engine, dir.path(), "global_step10", state);
    RequireSame(state, engine->load(dir.path() + "/global_step10/mp_rank_00_model_states.pt"));
  }
  // A new process's view: reopen and load through open("latest").
  auto engine = MakeEngine();
  auto tag = engine->open(dir.path());
  REQUIRE(tag == std::optional<std::string>("global_step10"));
  c10::IValue loaded =
      engine->load(dir.path() + "/global_step10/mp_rank_00_model_states.pt", c10::Device("cpu"));
  RequireSame(state, loaded);
  // Typed lists keep their types.
  auto d = loaded.toGenericDict();
  CHECK(d.at("sparse_tensor_module_names").isList());
  CHECK(d.at("floats").isDoubleList());
  CHECK(d.at("tensors").isTensorList());
  CHECK(d.at("optimizer")
            .toGenericDict()
            .at("param_groups")
            .toListRef()[0]
            .toGenericDict()
            .at("params")
            .isIntList());
  engine->close("global_step10");
}

TEST_CASE("views save only their own elements", "[unit][engine]") {
  TempDir dir;
  auto engine = MakeEngine();
  at::Tensor big = at::randn({1024, 1024});  // 4 MiB storage
  Dict state = StrDict();
  state.insert("row", big.narrow(0, 10, 2));  // contiguous view, 8 KiB
  state.insert("col", big.narrow(1, 3, 1));   // non-contiguous view, 4 KiB
  SaveOne(*engine, dir.path(), "t", state);
  CHECK(engine->last_commit().logical_bytes == (2 * 1024 + 1024) * 4);
  CHECK(engine->last_commit().new_bytes <= (2 * 1024 + 1024) * 4);
  RequireSame(state, engine->load(dir.path() + "/t/mp_rank_00_model_states.pt"));
}

TEST_CASE("one tensor referenced twice is stored once and loads shared", "[unit][engine]") {
  TempDir dir;
  auto engine = MakeEngine();
  at::Tensor w = at::randn({256, 256});
  Dict state = StrDict();
  state.insert("embed.weight", w);
  state.insert("head.weight", w);  // tied
  SaveOne(*engine, dir.path(), "t", state);
  CHECK(engine->last_commit().tensors == 1);
  auto loaded = engine->load(dir.path() + "/t/mp_rank_00_model_states.pt").toGenericDict();
  CHECK(loaded.at("embed.weight").toTensor().is_same(loaded.at("head.weight").toTensor()));
  CHECK(at::equal(loaded.at("head.weight").toTensor(), w));
}

TEST_CASE("incremental saves write only the changed chunks", "[unit][engine]") {
  TempDir dir;
  const uint32_t chunk = 64 * 1024;
  auto engine = MakeEngine(chunk);
  Dict module = StrDict();
  for (int i = 0; i < 8; ++i) module.insert("layer" + std::to_string(i), at::randn({64 * 1024}));
  Dict state = StrDict();
  state.insert("module", module);
  SaveOne(*engine, dir.path(), "s1", state);
  const uint64_t full = engine->last_commit().logical_bytes;
  CHECK(full == 8 * 64 * 1024 * 4);
  CHECK(engine->last_commit().new_bytes == full);

  SaveOne(*engine, dir.path(), "s2", state);
  CHECK(engine->last_commit().new_bytes == 0);

  // Change one tensor entirely and one element of another.
  module.insert_or_assign("layer2", at::randn({64 * 1024}));
  module.at("layer5").toTensor()[40000] = 123.0f;
  SaveOne(*engine, dir.path(), "s3", state);
  CHECK(engine->last_commit().new_bytes == 64 * 1024 * 4 + chunk);
  CHECK(engine->last_commit().parent_tag == "s2");

  // Another rank's file holding the same tensors costs nothing.
  engine->create(CommitInfo{"s4", dir.path(), true});
  engine->save(state, dir.path() + "/s4/mp_rank_00_model_states.pt");
  engine->save(state, dir.path() + "/s4/mp_rank_01_model_states.pt");
  engine->commit(CommitInfo{"s4", dir.path(), true});
  CHECK(engine->last_commit().new_bytes == 0);
  CHECK(engine->last_commit().files.size() == 2);
  RequireSame(state, engine->load(dir.path() + "/s4/mp_rank_01_model_states.pt"));
}

TEST_CASE("files may live in sub-folders of a tag", "[unit][engine]") {
  TempDir dir;
  auto engine = MakeEngine();
  Dict param = StrDict();
  param.insert("param", at::randn({10, 3}));
  engine->makedirs(dir.path(), true);
  engine->create(dir.path(), "global_step5_universal");
  engine->save(param, dir.path() + "/global_step5_universal/zero/layer.0.weight/fp32.pt");
  engine->commit("global_step5_universal");
  auto files = engine->store()->ListFiles("global_step5_universal");
  REQUIRE(files.ok());
  CHECK(files.value() == std::vector<std::string>{"zero/layer.0.weight/fp32.pt"});
  engine->open(dir.path(), std::string("global_step5_universal"));
  RequireSame(param,
              engine->load(dir.path() + "/global_step5_universal/zero/layer.0.weight/fp32.pt"));
}

TEST_CASE("latest follows commits, save_latest and deletes", "[unit][engine]") {
  TempDir dir;
  auto engine = MakeEngine();
  CHECK(!engine->open(dir.path()).has_value());  // empty store: nothing to open
  Dict s = StrDict();
  s.insert("x", at::ones({3}));
  SaveOne(*engine, dir.path(), "a", s);
  SaveOne(*engine, dir.path(), "b", s);
  CHECK(engine->open(dir.path()) == std::optional<std::string>("b"));
  CHECK(engine->open(dir.path(), std::string("latest")) == std::optional<std::string>("b"));
  engine->create(CommitInfo{"c", dir.path(), false});
  engine->save(s, dir.path() + "/c/f.pt");
  engine->commit(CommitInfo{"c", dir.path(), /*save_latest=*/false});
  CHECK(engine->open(dir.path()) == std::optional<std::string>("b"));
  REQUIRE(engine->store()->DeleteTag("b").ok());
  CHECK(engine->open(dir.path()) == std::optional<std::string>("c"));
  std::string msg = MessageOf([&] { engine->open(dir.path(), std::string("zzz")); });
  CHECK(msg.find("'zzz' does not exist") != std::string::npos);
  CHECK(msg.find("a, c") != std::string::npos);
}

TEST_CASE("bad calls and bad input get clear errors and leave committed tags intact",
          "[unit][engine]") {
  TempDir dir;
  auto engine = MakeEngine();
  Dict s = StrDict();
  s.insert("w", at::randn({1000}));
  SaveOne(*engine, dir.path(), "good", s);
  const std::string good = dir.path() + "/good/mp_rank_00_model_states.pt";

  // save / commit without create.
  CHECK(CodeOf([&] { engine->save(s, dir.path() + "/other/f.pt"); }) ==
        Status::Code::kFailedPrecondition);
  CHECK(MessageOf([&] { engine->commit("other"); }).find("without create") != std::string::npos);
  // Invalid tags.
  CHECK(CodeOf([&] { engine->create(dir.path(), ""); }) == Status::Code::kInvalidArgument);
  CHECK(CodeOf([&] { engine->create(dir.path(), ".."); }) == Status::Code::kInvalidArgument);
  CHECK(CodeOf([&] { engine->create(dir.path(), std::string(300, 't')); }) ==
        Status::Code::kInvalidArgument);
  CHECK(CodeOf([&] { engine->create(dir.path(), std::string("a\0b", 3)); }) ==
        Status::Code::kInvalidArgument);
  // Re-commit of an existing tag is refused.
  CHECK(CodeOf([&] { engine->create(dir.path(), "good"); }) == Status::Code::kAlreadyExists);
  // Unstorable values name the offending path.
  engine->create(dir.path(), "bad");
  Dict bad = StrDict();
  Dict inner = StrDict();
  inner.insert("sparse", at::eye(3).to_sparse());
  bad.insert("module", inner);
  std::string msg = MessageOf([&] { engine->save(bad, dir.path() + "/bad/f.pt"); });
  CHECK(msg.find("module/sparse") != std::string::npos);
  CHECK(msg.find("dense") != std::string::npos);
  CHECK(CodeOf([&] { engine->save(s, dir.path() + "/bad/../x.pt"); }) != Status::Code::kOk);
  // Loads of what does not exist say what does.
  msg = MessageOf([&] { engine->load(dir.path() + "/good/nofile.pt"); });
  CHECK(msg.find("mp_rank_00_model_states.pt") != std::string::npos);
  msg = MessageOf([&] { engine->load(dir.path() + "/nosuchtag/f.pt"); });
  CHECK(msg.find("good") != std::string::npos);
  // Nothing above damaged the committed tag.
  RequireSame(s, engine->load(good));
  auto report = engine->store()->Verify();
  REQUIRE(report.ok());
  CHECK(report->ok());

  // Overwrite when configured.
  auto engine2 = std::unique_ptr<KvCheckpointEngine>();
  engine.reset();
  engine2 = MakeEngine(64 * 1024, /*overwrite=*/true);
  Dict s2 = StrDict();
  s2.insert("w", at::zeros({10}));
  SaveOne(*engine2, dir.path(), "good", s2);
  RequireSame(s2, engine2->load(good));
}

TEST_CASE("corrupt stored bytes surface as Corruption errors", "[unit][engine]") {
  TempDir dir;
  Dict s = StrDict();
  s.insert("w", at::randn({100000}));
  {
    auto engine = MakeEngine();
    SaveOne(*engine, dir.path(), "t", s);
  }
  {
    // Damage every block's payload.
    RawDb raw(dir.path());
    std::vector<std::pair<std::string, std::string>> damaged;
    std::unique_ptr<rocksdb::Iterator> it(
        raw.db()->NewIterator(rocksdb::ReadOptions(), raw.cf("blocks")));
    for (it->Seek("B"); it->Valid() && it->key().starts_with("B"); it->Next()) {
      std::string v = it->value().ToString();
      v[v.size() / 2] ^= 0x40;
      damaged.emplace_back(it->key().ToString(), v);
    }
    it.reset();
    REQUIRE(!damaged.empty());
    for (auto& [k, v] : damaged) raw.Put("blocks", k, v);
  }
  auto engine = MakeEngine();
  std::string msg;
  Status::Code code = Status::Code::kOk;
  try {
    engine->load(dir.path() + "/t/mp_rank_00_model_states.pt");
  } catch (const StatusError& e) {
    code = e.status().code();
    msg = e.what();
  }
  CHECK(code == Status::Code::kCorruption);
  CHECK(msg.find("t/mp_rank_00_model_states.pt:w") != std::string::npos);
}

TEST_CASE("TorchCheckpointEngine round-trips and writes latest", "[unit][engine]") {
  TempDir dir;
  TorchCheckpointEngine engine;
  c10::IValue state = RichState();
  // The baseline does not keep requires_grad through pickle; drop that leaf.
  REQUIRE(state.toGenericDict().erase("module") == 1);
  SaveOne(engine, dir.path(), "global_step3", state);
  std::ifstream latest(dir.path() + "/latest");
  std::string content((std::istreambuf_iterator<char>(latest)), std::istreambuf_iterator<char>());
  CHECK(content == "global_step3");
  CHECK(engine.open(dir.path()) == std::optional<std::string>("global_step3"));
  c10::IValue loaded =
      engine.load(dir.path() + "/global_step3/mp_rank_00_model_states.pt", c10::Device("cpu"));
  RequireSame(state, loaded);
  CHECK(CodeOf([&] { engine.load(dir.path() + "/nope/x.pt"); }) == Status::Code::kNotFound);
}

TEST_CASE("state codec refuses what it cannot store, naming the path", "[unit][engine]") {
  Dict s = StrDict();
  Dict deep = StrDict();
  c10::IValue cur = at::ones({1});
  for (int i = 0; i < 300; ++i) {
    c10::impl::GenericList l(c10::AnyType::get());
    l.push_back(cur);
    cur = l;
  }
  s.insert("deep", cur);
  auto r = EncodeState(s, "t/f");
  REQUIRE(r.status().IsInvalidArgument());
  CHECK(r.status().message().find("nested more than") != std::string::npos);
  CHECK(ToDType(c10::ScalarType::QInt8, "x").status().message().find("bfloat16") !=
        std::string::npos);
}

TEST_CASE("CUDA tensors save from the device and load to it", "[unit][engine][cuda]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA in this LibTorch or no GPU: the device path is not exercised here");
    return;
  }
  TempDir dir;
  auto engine = MakeEngine(64 * 1024);
  at::Tensor host = at::randn({300, 257});  // several chunks, ragged last one
  Dict s = StrDict();
  s.insert("w", host.to(c10::Device("cuda:0")));
  s.insert("wt", host.to(c10::Device("cuda:0")).t());  // non-contiguous on device
  SaveOne(*engine, dir.path(), "gpu", s);
  auto loaded = engine->load(dir.path() + "/gpu/mp_rank_00_model_states.pt").toGenericDict();
  CHECK(loaded.at("w").toTensor().device().is_cuda());  // back where it was saved from
  CHECK(at::equal(loaded.at("w").toTensor().cpu(), host));
  CHECK(at::equal(loaded.at("wt").toTensor().cpu(), host.t()));
  auto on_cpu = engine->load(dir.path() + "/gpu/mp_rank_00_model_states.pt", c10::Device("cpu"))
                    .toGenericDict();
  CHECK(on_cpu.at("w").toTensor().device().is_cpu());
  CHECK(at::equal(on_cpu.at("w").toTensor(), host));
}

TEST_CASE("regression: a stored dict whose key cannot be hashed is Corruption, not a crash",
          "[unit][engine]") {
  // Found by tests/fuzz/state_tree_fuzz: LibTorch's dict threw
  // std::runtime_error ("Can't hash IValues with tag 'None'"), which no one
  // caught. Tensor loads of shared subtrees are bounded by the node budget.
  auto tree_with_key = [](fb::NodeKind key_kind) {
    flatbuffers::FlatBufferBuilder b;
    std::vector<flatbuffers::Offset<fb::Node>> keys{fb::CreateNode(b, key_kind)};
    std::vector<flatbuffers::Offset<fb::Node>> items{
        fb::CreateNode(b, fb::NodeKind::Int, false, 1)};
    auto root = fb::CreateNode(b, fb::NodeKind::Dict, false, 0, 0, 0, 0, b.CreateVector(items),
                               b.CreateVector(keys));
    b.Finish(fb::CreateStateTree(b, root));
    return std::string(reinterpret_cast<const char*>(b.GetBufferPointer()), b.GetSize());
  };
  TensorLoader none = [](const std::string&, const std::string&) -> Result<at::Tensor> {
    return Status::NotFound("no tensors here");
  };
  for (auto kind : {fb::NodeKind::None, fb::NodeKind::List, fb::NodeKind::Dict}) {
    auto r = DecodeState(std::string_view(tree_with_key(kind)), none, "t/f");
    CHECK(r.status().IsCorruption());
    CHECK(r.status().message().find("hashable") != std::string::npos);
  }
  CHECK(DecodeState(std::string_view(tree_with_key(fb::NodeKind::Bool)), none, "t/f").ok());
}

TEST_CASE("a file saved from Python decodes in C++ with objects as their payloads",
          "[unit][engine]") {
  TensorLoader loader = [](const std::string& param, const std::string&) -> Result<at::Tensor> {
    CHECK(param == "module/w");
    return at::ones({4, 8});
  };
  auto r = DecodeState(std::string_view(testing::PythonModelTree()), loader, "t/f");
  REQUIRE(r.ok());
  const c10::IValue& v = *r;
  CHECK(DictField(v, "module")->isGenericDict());
  CHECK(at::equal(DictField(*DictField(v, "module"), "w")->toTensor(), at::ones({4, 8})));
  CHECK(DictInt(v, "zero_stage") == 2);  // the enum's value
  CHECK(DictInt(*DictField(v, "frag"), "numel") == 32);
  const c10::IValue* shapes = DictField(v, "param_shapes");
  REQUIRE(shapes->isList());
  CHECK(DictField(shapes->toListRef()[0], "w")->isTuple());     // torch.Size
  CHECK(DictField(v, "sparse_tensor_module_names")->isList());  // set
  CHECK(DictField(v, "raw")->toStringRef() == std::string("\0\1x", 3));
  CHECK(DictField(v, "big")->toStringRef() == "-123456789012345678901234567890");
}

// --- Async saves ----------------------------------------------------------

namespace {

// A copy of every tensor of `v` (same structure), so that the original's
// tensors can be changed afterwards.
c10::IValue DeepClone(const c10::IValue& v) {
  if (v.isTensor()) {
    at::Tensor t = v.toTensor().detach().clone();
    if (v.toTensor().requires_grad()) t.set_requires_grad(true);
    return t;
  }
  if (v.isGenericDict()) {
    auto d = v.toGenericDict();
    Dict out(d.keyType(), d.valueType());
    for (const auto& e : d) out.insert(e.key(), DeepClone(e.value()));
    return out;
  }
  if (v.isList()) {
    auto l = v.toList();
    c10::impl::GenericList out(l.elementType());
    for (const c10::IValue& e : l) out.push_back(DeepClone(e));
    return out;
  }
  if (v.isTuple()) {
    std::vector<c10::IValue> items;
    for (const auto& e : v.toTupleRef().elements()) items.push_back(DeepClone(e));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  return v;
}

// Changes every tensor of `v` in place (a training step after the save).
void Scribble(const c10::IValue& v) {
  if (v.isTensor()) {
    at::Tensor t = v.toTensor().detach();
    if (t.numel() == 0) return;
    if (t.scalar_type() == at::kBool) {
      t.logical_not_();
    } else {
      t.add_(1);
    }
  } else if (v.isGenericDict()) {
    for (const auto& e : v.toGenericDict()) Scribble(e.value());
  } else if (v.isList()) {
    for (const c10::IValue& e : v.toList()) Scribble(e);
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) Scribble(e);
  }
}

std::unique_ptr<KvCheckpointEngine> MakeAsyncEngine(uint64_t buffer_bytes = 0,
                                                    std::shared_ptr<rocksdb::FileSystem> fs = {}) {
  KvEngineConfig config;
  config.store.chunk_size = 64 * 1024;
  config.async_save = true;
  config.async_buffer_bytes = buffer_bytes;
  if (fs) {
    config.store.file_system = std::move(fs);
    config.store.block_durability = BlockDurability::kWal;
  }
  return std::make_unique<KvCheckpointEngine>(config);
}

}  // namespace

TEST_CASE("async save: tensors changed right after save returns are stored as they were",
          "[unit][engine][async]") {
  spdlog::set_level(spdlog::level::warn);
  TempDir dir;
  c10::IValue state = RichState();
  const c10::IValue expected = DeepClone(state);
  auto engine = MakeAsyncEngine();
  engine->makedirs(dir.path(), true);
  engine->create(dir.path(), "t1");
  engine->save(state, dir.path() + "/t1/mp_rank_00_model_states.pt");
  // The views of RichState change through their base tensors too.
  Scribble(state);
  REQUIRE(engine->commit("t1"));
  RequireSame(expected, engine->load(dir.path() + "/t1/mp_rank_00_model_states.pt"));
  CHECK(engine->last_save().tensors > 10);

  // The changed state saved next is stored as changed, in another process too.
  engine->create(dir.path(), "t2");
  engine->save(state, dir.path() + "/t2/mp_rank_00_model_states.pt");
  const c10::IValue expected2 = DeepClone(state);
  Scribble(state);
  REQUIRE(engine->commit("t2"));
  engine.reset();
  auto reader = MakeEngine();
  reader->open(dir.path());
  RequireSame(expected, reader->load(dir.path() + "/t1/mp_rank_00_model_states.pt"));
  RequireSame(expected2, reader->load(dir.path() + "/t2/mp_rank_00_model_states.pt"));
}

TEST_CASE(
    "async save: a full buffer pool waits for written files, a file larger than the pool "
    "is written synchronously",
    "[unit][engine][async]") {
  spdlog::set_level(spdlog::level::warn);
  TempDir dir;
  constexpr uint64_t kPool = 1 << 20;
  auto engine = MakeAsyncEngine(kPool);
  engine->makedirs(dir.path(), true);
  engine->create(dir.path(), "t");
  std::vector<std::pair<std::string, c10::IValue>> saved;
  at::manual_seed(7);
  // Three files of 768 KiB: each fits alone, two do not fit together.
  for (int f = 0; f < 3; ++f) {
    Dict d = StrDict();
    for (int i = 0; i < 3; ++i) d.insert("w" + std::to_string(i), at::randn({64 * 1024}));
    const std::string path = dir.path() + "/t/file" + std::to_string(f) + ".pt";
    saved.emplace_back(path, DeepClone(d));
    engine->save(d, path);
    CHECK(engine->last_save_background());  // fits the pool: queued
    Scribble(d);
  }
  // 2 MiB in one file: more than the pool.
  Dict big = StrDict();
  big.insert("big", at::randn({512 * 1024}));
  saved.emplace_back(dir.path() + "/t/big.pt", DeepClone(big));
  engine->save(big, dir.path() + "/t/big.pt");
  CHECK_FALSE(engine->last_save_background());  // written before save returned
  Scribble(big);
  REQUIRE(engine->commit("t"));
  CHECK(engine->last_save().tensors == 10);
  CHECK(engine->last_save().stats.logical_bytes == 3 * 3 * 256 * 1024 + 2 * 1024 * 1024);
  for (const auto& [path, value] : saved) {
    INFO(path);
    RequireSame(value, engine->load(path));
  }
}

TEST_CASE(
    "async save: a background write that fails aborts the tag at commit; earlier tags "
    "stay intact",
    "[unit][engine][async]") {
  spdlog::set_level(spdlog::level::off);
  TempDir dir;
  auto fs = std::make_shared<ckptkv::testing::FaultInjectionFileSystem>();
  const std::string file = "/mp_rank_00_model_states.pt";
  c10::IValue state = RichState();
  const c10::IValue expected = DeepClone(state);
  {
    auto engine = MakeAsyncEngine(0, fs);
    engine->makedirs(dir.path(), true);
    engine->create(dir.path(), "good");
    engine->save(state, dir.path() + "/good" + file);
    REQUIRE(engine->commit("good"));
    engine->create(dir.path(), "bad");
    fs->SetActive(false);  // every write fails from here
    // The snapshot succeeds; the write behind it fails (new bytes: the
    // same ones would be deduplicated and nothing written).
    Scribble(state);
    engine->save(state, dir.path() + "/bad" + file);
    std::string message;
    try {
      engine->commit("bad");
    } catch (const std::exception& e) {
      message = e.what();
    }
    INFO(message);
    CHECK(message.find("commit of tag 'bad' abandoned: a background save failed") !=
          std::string::npos);
    CHECK(message.find("filesystem inactive") != std::string::npos);
    CHECK_FALSE(engine->store()->IsPending("bad"));
  }
  fs->SetActive(true);
  auto engine = MakeEngine();
  REQUIRE(engine->open(dir.path()) == std::optional<std::string>("good"));
  auto tags = engine->store()->ListTags();
  REQUIRE(tags.ok());
  REQUIRE(tags->size() == 1);
  RequireSame(expected, engine->load(dir.path() + "/good" + file));
  auto report = engine->store()->Verify();
  REQUIRE(report.ok());
  CHECK(report->ok());
}

TEST_CASE("async save of CUDA tensors: pinned snapshot, then the device tensors may change",
          "[unit][engine][cuda][async]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA in this LibTorch or no GPU: the device path is not exercised here");
    return;
  }
  spdlog::set_level(spdlog::level::warn);
  TempDir dir;
  auto engine = MakeAsyncEngine();
  at::manual_seed(11);
  // 256 MiB on the device, so that the copy's time is measurable.
  at::Tensor host = at::randn({64, 1024, 1024});
  at::Tensor dev = host.to(c10::Device("cuda:0"));
  Dict s = StrDict();
  s.insert("w", dev);
  s.insert("wt", dev[0].t());  // non-contiguous on the device
  engine->makedirs(dir.path(), true);
  engine->create(dir.path(), "gpu");
  engine->save(s, dir.path() + "/gpu/mp_rank_00_model_states.pt");
  const double first = engine->last_save_blocked_seconds();
  dev.add_(1);  // the next training step, on the device
  REQUIRE(engine->commit("gpu"));
  engine->create(dir.path(), "gpu2");
  engine->save(s, dir.path() + "/gpu2/mp_rank_00_model_states.pt");
  const double warm = engine->last_save_blocked_seconds();
  REQUIRE(engine->commit("gpu2"));
  // The plain copy to pageable host memory, for the log of tools/gpu-check.sh.
  const auto t0 = std::chrono::steady_clock::now();
  at::Tensor plain = dev.cpu();
  const double copy = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << "async CUDA save of 260 MiB: caller blocked " << first << " s (first), " << warm
            << " s (buffers reused); dev.cpu() copy " << copy << " s" << std::endl;
  auto loaded = engine->load(dir.path() + "/gpu/mp_rank_00_model_states.pt", c10::Device("cpu"))
                    .toGenericDict();
  CHECK(at::equal(loaded.at("w").toTensor(), host));
  CHECK(at::equal(loaded.at("wt").toTensor(), host[0].t()));
  auto loaded2 = engine->load(dir.path() + "/gpu2/mp_rank_00_model_states.pt").toGenericDict();
  CHECK(loaded2.at("w").toTensor().device().is_cuda());
  CHECK(at::equal(loaded2.at("w").toTensor().cpu(), plain));
}
