#include "tests/crash/crash_state.h"

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <ATen/core/List.h>

#include <cstring>
#include <sstream>

namespace ckptkv::crash_testing {
namespace {

using Dict = c10::impl::GenericDict;

uint64_t Mix(uint64_t x) {  // splitmix64 finalizer
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t Hash(uint64_t seed, uint64_t a, uint64_t b = 0, uint64_t c = 0) {
  return Mix(Mix(Mix(seed ^ 0x5bd1e995ull) ^ a) ^ (b * 0x100000001b3ull)) ^ Mix(c + 7);
}

// Finite float32 values from a key: multiples of 1/64 in [-512, 512), so
// conversions to half / bfloat16 are deterministic and no NaN shows up.
at::Tensor Floats(uint64_t key, std::vector<int64_t> shape) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  at::Tensor t = at::empty(shape, at::kFloat);
  float* p = t.data_ptr<float>();
  uint64_t s = key;
  for (int64_t i = 0; i < numel; ++i) {
    s = Mix(s);
    p[i] = static_cast<float>(static_cast<int64_t>(s % 65536) - 32768) / 64.0f;
  }
  return t;
}

at::Tensor Ints(uint64_t key, std::vector<int64_t> shape, at::ScalarType type) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  at::Tensor t = at::empty(shape, at::kLong);
  int64_t* p = t.data_ptr<int64_t>();
  uint64_t s = key;
  for (int64_t i = 0; i < numel; ++i) {
    s = Mix(s);
    p[i] = static_cast<int64_t>(s % 200) - 100;
  }
  return type == at::kBool ? t.gt(0) : t.to(type);
}

Dict StrDict() { return Dict(c10::StringType::get(), c10::AnyType::get()); }

// Parameters: name, shape, dtype, and how they change between steps.
enum class Change { kNever, kFirstChunk, kEveryStep };
struct ParamSpec {
  const char* name;
  std::vector<int64_t> shape;
  at::ScalarType dtype;
  Change change;
};

const std::vector<ParamSpec>& Params() {
  static const std::vector<ParamSpec> specs = {
      {"embed.weight", {512, 1024}, at::kFloat, Change::kNever},             // 2 MiB, shared
      {"layers.0.attn.weight", {256, 256}, at::kFloat, Change::kEveryStep},  // 256 KiB
      {"layers.0.attn.bias", {3}, at::kFloat, Change::kEveryStep},           // 12 bytes
      {"layers.0.mlp.weight", {768, 1024}, at::kHalf, Change::kFirstChunk},  // 1.5 MiB
      {"layers.0.norm.weight", {1024}, at::kBFloat16, Change::kEveryStep},
      {"layers.0.norm.bias", {1024}, at::kBFloat16, Change::kNever},
      {"head.weight", {64, 64}, at::kDouble, Change::kEveryStep},  // 32 KiB
      {"head.mask", {5}, at::kBool, Change::kNever},
      {"position_ids", {1, 2000}, at::kLong, Change::kNever},
      {"quant.scale", {3000}, at::kChar, Change::kEveryStep},
  };
  return specs;
}

at::Tensor MakeParam(uint64_t seed, int64_t step, size_t index) {
  const ParamSpec& spec = Params()[index];
  const uint64_t base = Hash(seed, 1000 + index);
  const uint64_t key =
      spec.change == Change::kEveryStep ? Hash(seed, 1000 + index, step + 1) : base;
  at::Tensor t;
  if (spec.dtype == at::kFloat || spec.dtype == at::kHalf || spec.dtype == at::kBFloat16 ||
      spec.dtype == at::kDouble) {
    t = Floats(key, spec.shape).to(spec.dtype);
  } else {
    t = Ints(key, spec.shape, spec.dtype);
  }
  if (spec.change == Change::kFirstChunk) {
    // The first 64 KiB differ per step; the rest stays the same.
    at::Tensor flat = t.view({-1});
    int64_t n =
        std::min<int64_t>(flat.numel(), (64 << 10) / static_cast<int64_t>(t.element_size()));
    flat.narrow(0, 0, n).copy_(Floats(Hash(seed, 2000 + index, step + 1), {n}).to(spec.dtype));
  }
  return t;
}

c10::IValue ModelStates(uint64_t seed, int64_t step, std::vector<at::Tensor>* params) {
  Dict module = StrDict();
  for (size_t i = 0; i < Params().size(); ++i) {
    at::Tensor t = MakeParam(seed, step, i);
    params->push_back(t);
    module.insert(Params()[i].name, t);
  }
  Dict lr = StrDict();
  lr.insert("last_epoch", c10::IValue(step));
  lr.insert("base_lrs",
            c10::IValue(c10::List<double>({0.1, 0.01 * static_cast<double>(step % 7)})));
  lr.insert("_get_lr_called_within_step", c10::IValue(false));
  lr.insert("verbose", c10::IValue());

  Dict state = StrDict();
  state.insert("module", module);
  state.insert("global_steps", c10::IValue(step));
  state.insert("global_samples",
               c10::IValue(step * 1024 + static_cast<int64_t>(Hash(seed, step) % 1000)));
  state.insert("ds_version", c10::IValue(std::string("0.14.0")));
  state.insert("lr_scheduler", lr);
  state.insert(
      "buffer_names",
      c10::IValue(c10::List<std::string>({"position_ids", "step_" + std::to_string(step)})));
  state.insert("mp_world_size", c10::IValue(int64_t{1}));
  state.insert("skipped_steps", c10::IValue(static_cast<int64_t>(Hash(seed, step, 3) % 5)));
  state.insert("dp_world_size", c10::IValue(int64_t{1}));
  state.insert("sparse_tensor_module_names", c10::IValue(c10::List<std::string>()));
  // The same tensor object twice: stored once, loaded as one.
  state.insert("tied_embedding", module.at("embed.weight"));
  state.insert("rng", c10::ivalue::Tuple::create(
                          {c10::IValue(static_cast<int64_t>(Hash(seed, step, 4) >> 1)),
                           c10::IValue(0.5 + static_cast<double>(step)), c10::IValue(true)}));
  return state;
}

c10::IValue OptimStates(uint64_t seed, int64_t step, const std::vector<at::Tensor>& params) {
  Dict per_param(c10::IntType::get(), c10::AnyType::get());
  const int64_t optimized[] = {1, 3, 6};  // attn.weight, mlp.weight, head.weight
  for (int64_t k = 0; k < 3; ++k) {
    const at::Tensor& p = params[optimized[k]];
    Dict s = StrDict();
    s.insert("step", c10::IValue(step));
    s.insert("exp_avg", (p.to(at::kFloat) * 0.5).contiguous());
    // Unchanged between steps for the frozen-in-place mlp (dedup).
    s.insert("exp_avg_sq", k == 1 ? Floats(Hash(seed, 3000), {768, 1024})
                                  : Floats(Hash(seed, 3000 + k, step + 1), p.sizes().vec()));
    per_param.insert(c10::IValue(k), s);
  }
  Dict group = StrDict();
  group.insert("lr", c10::IValue(1e-3 / static_cast<double>(1 + step % 5)));
  group.insert("betas", c10::ivalue::Tuple::create({c10::IValue(0.9), c10::IValue(0.999)}));
  group.insert("weight_decay", c10::IValue(0.0));
  group.insert("params", c10::IValue(c10::List<int64_t>({0, 1, 2})));
  c10::impl::GenericList groups(c10::AnyType::get());
  groups.push_back(group);

  Dict opt = StrDict();
  opt.insert("state", per_param);
  opt.insert("param_groups", groups);

  Dict state = StrDict();
  state.insert("optimizer_state_dict", opt);
  state.insert("loss_scale", c10::IValue(65536.0 / static_cast<double>(1 + step % 3)));
  state.insert("ds_config", c10::IValue(std::string("{\"train_batch_size\": 8}")));
  state.insert("zero_stage", c10::IValue(int64_t{1}));
  return state;
}

c10::IValue LayerStates(uint64_t seed, int64_t step) {
  Dict state = StrDict();
  state.insert("weight", Floats(Hash(seed, 4000, step % 3), {100, 100}));
  state.insert("tiny", Floats(Hash(seed, 4001, step + 1), {1}));
  state.insert("empty", at::empty({0, 4}, at::kFloat));
  return state;
}

std::string KindName(const c10::IValue& v) { return v.tagKind(); }

}  // namespace

std::string StepTag(int64_t step) { return "step" + std::to_string(step); }

bool ParseStepTag(const std::string& tag, int64_t* step) {
  if (tag.size() < 5 || tag.compare(0, 4, "step") != 0) return false;
  int64_t v = 0;
  for (size_t i = 4; i < tag.size(); ++i) {
    if (tag[i] < '0' || tag[i] > '9') return false;
    v = v * 10 + (tag[i] - '0');
  }
  if (StepTag(v) != tag) return false;  // no leading zeros
  *step = v;
  return true;
}

std::vector<StepFile> MakeStepFiles(uint64_t seed, int64_t step) {
  std::vector<StepFile> files;
  std::vector<at::Tensor> params;
  files.push_back({"mp_rank_00_model_states.pt", ModelStates(seed, step, &params)});
  const uint64_t n = 1 + Hash(seed, step, 5) % 3;
  if (n >= 2) {
    files.push_back({"zero_pp_rank_0_mp_rank_00_optim_states.pt", OptimStates(seed, step, params)});
  }
  if (n >= 3) files.push_back({"layer_01-model_00-model_states.pt", LayerStates(seed, step)});
  return files;
}

std::string CompareIValues(const c10::IValue& a, const c10::IValue& b, const std::string& path) {
  const std::string at_path = path.empty() ? "/" : path;
  if (KindName(a) != KindName(b)) {
    return at_path + ": kind " + KindName(b) + ", expected " + KindName(a);
  }
  if (a.isTensor()) {
    const at::Tensor& x = a.toTensor();
    const at::Tensor& y = b.toTensor();
    if (x.defined() != y.defined()) return at_path + ": tensor defined differs";
    if (!x.defined()) return "";
    if (x.scalar_type() != y.scalar_type()) {
      return at_path + ": dtype " + std::string(c10::toString(y.scalar_type())) + ", expected " +
             c10::toString(x.scalar_type());
    }
    if (x.sizes() != y.sizes()) {
      std::ostringstream os;
      os << at_path << ": shape " << y.sizes() << ", expected " << x.sizes();
      return os.str();
    }
    at::Tensor xc = x.detach().contiguous(), yc = y.detach().contiguous();
    size_t bytes = static_cast<size_t>(xc.numel()) * xc.element_size();
    if (bytes > 0 && std::memcmp(xc.data_ptr(), yc.data_ptr(), bytes) != 0) {
      return at_path + ": tensor bytes differ";
    }
    if (!at::equal(xc, yc)) return at_path + ": at::equal is false";
    return "";
  }
  if (a.isGenericDict()) {
    auto da = a.toGenericDict();
    auto db = b.toGenericDict();
    if (da.keyType()->str() != db.keyType()->str() ||
        da.valueType()->str() != db.valueType()->str()) {
      return at_path + ": dict type " + b.type()->str() + ", expected " + a.type()->str();
    }
    if (da.size() != db.size()) {
      return at_path + ": " + std::to_string(db.size()) + " keys, expected " +
             std::to_string(da.size());
    }
    auto ib = db.begin();
    for (auto ia = da.begin(); ia != da.end(); ++ia, ++ib) {
      std::string key =
          ia->key().isString()
              ? ia->key().toStringRef()
              : (ia->key().isInt() ? std::to_string(ia->key().toInt()) : KindName(ia->key()));
      std::string d = CompareIValues(ia->key(), ib->key(), path + "/<key " + key + ">");
      if (!d.empty()) return d;
      d = CompareIValues(ia->value(), ib->value(), path + "/" + key);
      if (!d.empty()) return d;
    }
    return "";
  }
  if (a.isList()) {
    if (a.type()->str() != b.type()->str()) {
      return at_path + ": list type " + b.type()->str() + ", expected " + a.type()->str();
    }
    auto la = a.toListRef();
    auto lb = b.toListRef();
    if (la.size() != lb.size()) return at_path + ": list length differs";
    for (size_t i = 0; i < la.size(); ++i) {
      std::string d = CompareIValues(la[i], lb[i], path + "/" + std::to_string(i));
      if (!d.empty()) return d;
    }
    return "";
  }
  if (a.isTuple()) {
    const auto& ea = a.toTupleRef().elements();
    const auto& eb = b.toTupleRef().elements();
    if (ea.size() != eb.size()) return at_path + ": tuple length differs";
    for (size_t i = 0; i < ea.size(); ++i) {
      std::string d = CompareIValues(ea[i], eb[i], path + "/" + std::to_string(i));
      if (!d.empty()) return d;
    }
    return "";
  }
  if (a.isDouble()) {
    double x = a.toDouble(), y = b.toDouble();
    if (std::memcmp(&x, &y, sizeof x) != 0) return at_path + ": double differs";
    return "";
  }
  if (a.isString()) {
    if (a.toStringRef() != b.toStringRef()) {
      return at_path + ": string '" + b.toStringRef() + "', expected '" + a.toStringRef() + "'";
    }
    return "";
  }
  if (a.isInt()) {
    if (a.toInt() != b.toInt()) {
      return at_path + ": int " + std::to_string(b.toInt()) + ", expected " +
             std::to_string(a.toInt());
    }
    return "";
  }
  if (a.isBool()) return a.toBool() == b.toBool() ? "" : at_path + ": bool differs";
  if (a.isNone()) return "";
  if (a.isDevice()) return a.toDevice() == b.toDevice() ? "" : at_path + ": device differs";
  return at_path + ": cannot compare values of kind " + KindName(a);
}

}  // namespace ckptkv::crash_testing
