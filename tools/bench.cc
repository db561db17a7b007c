#include "tools/bench.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/ivalue.h>
#include <torch/types.h>

#include <fcntl.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/kv_checkpoint_engine.h"
#include "engine/torch_checkpoint_engine.h"
#include "store/store.h"
#include "store/thread_pool.h"
#include "tools/bench_reshape.h"
#include "tools/json_text.h"
#include "tools/kv_browser/text.h"
#include "tools/proc_stats.h"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace ckptkv::tools {

using kvb::HumanBytes;
using kvb::ReportError;

namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr const char* kFile = "mp_rank_00_model_states.pt";

// ---------------------------------------------------------------------------
// The synthetic state dict.

struct NamedTensor {
  std::string name;
  at::Tensor tensor;
  uint64_t bytes() const { return static_cast<uint64_t>(tensor.nbytes()); }
};

struct SyntheticState {
  std::vector<NamedTensor> big;    // the bulk: fp32 and bf16 matrices
  std::vector<NamedTensor> small;  // biases / norms: 256 B .. 16 KiB
  uint64_t logical_bytes() const {
    uint64_t n = 0;
    for (const auto& t : big) n += t.bytes();
    for (const auto& t : small) n += t.bytes();
    return n;
  }
};

at::Tensor RandomTensor(const std::vector<int64_t>& shape, at::ScalarType dtype, uint64_t seed) {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor t = at::rand(shape, gen, at::TensorOptions().dtype(at::kFloat));
  return dtype == at::kFloat ? t : t.to(dtype);
}

// ~size_mb MiB in 96 matrices of varying sizes (every fourth bf16), plus 32
// small tensors. Content is random from fixed seeds, so nothing dedups by
// accident.
SyntheticState MakeState(uint64_t size_mb) {
  SyntheticState s;
  const int kBig = 96;
  const int64_t cols = 1024;
  std::vector<int> weight(kBig);
  int total_weight = 0;
  for (int i = 0; i < kBig; i++) {
    weight[i] = 1 + (i * 37) % 11;  // 1..11: sizes vary by an order of magnitude
    total_weight += weight[i];
  }
  const double target = static_cast<double>(size_mb) * kMiB;
  for (int i = 0; i < kBig; i++) {
    at::ScalarType dtype = (i % 4 == 3) ? at::kBFloat16 : at::kFloat;
    double bytes = target * weight[i] / total_weight;
    int64_t row_bytes = cols * (dtype == at::kFloat ? 4 : 2);
    int64_t rows = std::max<int64_t>(1, static_cast<int64_t>(bytes / row_bytes));
    std::string name =
        "module.layers." + std::to_string(i / 2) + (i % 2 ? ".mlp.weight" : ".attn.weight");
    s.big.push_back({name, RandomTensor({rows, cols}, dtype, 1000 + i)});
  }
  for (int i = 0; i < 32; i++) {
    int64_t n = int64_t{64} << (i % 7);  // 64 .. 4096 elements
    std::string name = "module.layers." + std::to_string(i) + ".norm.bias";
    s.small.push_back({name, RandomTensor({n}, at::kFloat, 5000 + i)});
  }
  return s;
}

// {"module": {name: tensor}, "global_steps": int, "lr": double, ...}
c10::IValue ToStateDict(const SyntheticState& s, int64_t step) {
  c10::impl::GenericDict module(c10::StringType::get(), c10::TensorType::get());
  for (const auto& t : s.big) module.insert(t.name, t.tensor);
  for (const auto& t : s.small) module.insert(t.name, t.tensor);
  c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
  sd.insert("module", module);
  sd.insert("global_steps", step);
  sd.insert("lr", 1e-4);
  sd.insert("ds_version", std::string("0.16.0"));
  sd.insert("fp16_enabled", false);
  sd.insert("lr_scheduler", c10::IValue());
  sd.insert("betas", c10::ivalue::Tuple::create({c10::IValue(0.9), c10::IValue(0.999)}));
  return sd;
}

// Picks big tensors, spread over the model, until they hold >= fraction of
// `total` bytes. Returns their indices.
std::vector<size_t> PickTensors(const SyntheticState& s, double fraction, uint64_t total,
                                size_t stride) {
  std::vector<size_t> picked;
  uint64_t bytes = 0;
  std::vector<bool> used(s.big.size(), false);
  for (size_t round = 0; round < stride && bytes < fraction * total; round++) {
    for (size_t i = round; i < s.big.size() && bytes < fraction * total; i += stride) {
      if (used[i]) continue;
      used[i] = true;
      picked.push_back(i);
      bytes += s.big[i].bytes();
    }
  }
  return picked;
}

// Recursive equality of two loaded values; `why` names the first difference.
bool SameValue(const c10::IValue& a, const c10::IValue& b, const std::string& path,
               std::string* why) {
  auto fail = [&](const std::string& what) {
    *why = path + ": " + what;
    return false;
  };
  if (a.isTensor() || b.isTensor()) {
    if (!a.isTensor() || !b.isTensor()) return fail("tensor vs non-tensor");
    const at::Tensor& x = a.toTensor();
    const at::Tensor& y = b.toTensor();
    if (x.scalar_type() != y.scalar_type()) return fail("dtype differs");
    if (x.sizes() != y.sizes()) return fail("shape differs");
    if (!at::equal(x, y)) return fail("tensor bytes differ");
    return true;
  }
  if (a.isGenericDict() || b.isGenericDict()) {
    if (!a.isGenericDict() || !b.isGenericDict()) return fail("dict vs non-dict");
    auto da = a.toGenericDict();
    auto db = b.toGenericDict();
    if (da.size() != db.size()) return fail("dict sizes differ");
    for (const auto& e : da) {
      auto it = db.find(e.key());
      std::string key = e.key().isString() ? e.key().toStringRef() : e.key().tagKind();
      if (it == db.end()) return fail("key '" + key + "' missing");
      std::string sub = path;
      sub.append("/").append(key);
      if (!SameValue(e.value(), it->value(), sub, why)) return false;
    }
    return true;
  }
  if (a.isList() || b.isList()) {
    if (!a.isList() || !b.isList()) return fail("list vs non-list");
    auto la = a.toListRef();
    auto lb = b.toListRef();
    if (la.size() != lb.size()) return fail("list sizes differ");
    for (size_t i = 0; i < la.size(); i++) {
      if (!SameValue(la[i], lb[i], path + "[" + std::to_string(i) + "]", why)) return false;
    }
    return true;
  }
  if (a.isTuple() || b.isTuple()) {
    if (!a.isTuple() || !b.isTuple()) return fail("tuple vs non-tuple");
    const auto& ta = a.toTupleRef().elements();
    const auto& tb = b.toTupleRef().elements();
    if (ta.size() != tb.size()) return fail("tuple sizes differ");
    for (size_t i = 0; i < ta.size(); i++) {
      if (!SameValue(ta[i], tb[i], path + "(" + std::to_string(i) + ")", why)) return false;
    }
    return true;
  }
  if (a.tagKind() != b.tagKind()) return fail(a.tagKind() + " vs " + b.tagKind());
  if (a.isNone()) return true;
  if (a.isInt()) return a.toInt() == b.toInt() || fail("ints differ");
  if (a.isDouble()) return a.toDouble() == b.toDouble() || fail("doubles differ");
  if (a.isBool()) return a.toBool() == b.toBool() || fail("bools differ");
  if (a.isString()) return a.toStringRef() == b.toStringRef() || fail("strings differ");
  return true;
}

// ---------------------------------------------------------------------------
// Measurement.

struct Scenario {
  std::string name;
  std::string what;
  double seconds = 0;
  uint64_t logical_bytes = 0;
  uint64_t device_write_bytes = 0;  // during the timed region
  uint64_t after_write_bytes = 0;   // by background work after it, until the process is quiet
  double settle_seconds = 0;        // how long that took
  uint64_t write_counter_at_stop = 0;
  bool settled = false;
  uint64_t device_read_bytes = 0;
  uint64_t disk_bytes_after = 0;  // store / files on disk after the scenario
  uint64_t rss_before_bytes = 0;
  uint64_t peak_rss_bytes = 0;
  json extra = json::object();  // scenario-specific fields
  bool ran = false;

  uint64_t total_write_bytes() const { return device_write_bytes + after_write_bytes; }
  double throughput_mib_s() const { return seconds > 0 ? logical_bytes / kMiB / seconds : 0; }
  uint64_t peak_rss_delta() const {
    return peak_rss_bytes > rss_before_bytes ? peak_rss_bytes - rss_before_bytes : 0;
  }
};

// Brackets one scenario: counters and peak RSS before, deltas after.
class Meter {
 public:
  explicit Meter(Scenario* s) : s_(s) {
    ::sync();  // earlier scenarios' write-back does not land in this one
    ResetPeakRss();
    s_->rss_before_bytes = CurrentRssBytes();
    io_ = ReadIoCounters();
    t0_ = NowSeconds();
  }
  void Stop() {
    s_->seconds = NowSeconds() - t0_;
    IoCounters io = ReadIoCounters();
    s_->device_write_bytes = io.write_bytes - io_.write_bytes;
    s_->write_counter_at_stop = io.write_bytes;
    s_->device_read_bytes = io.read_bytes - io_.read_bytes;
    s_->peak_rss_bytes = PeakRssBytes();
    s_->ran = true;
  }

 private:
  Scenario* s_;
  IoCounters io_;
  double t0_ = 0;
};

// Waits until the process has written nothing for half a second (at most
// 60 s), so that background work a scenario started (RocksDB flushes and
// compactions) is charged to it and does not run into the next one.
void Settle(Scenario* s) {
  if (s->settled) return;
  const double t0 = NowSeconds();
  uint64_t last = ReadIoCounters().write_bytes;
  int quiet = 0;
  while (quiet < 5 && NowSeconds() - t0 < 60) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    uint64_t now = ReadIoCounters().write_bytes;
    if (now == last) {
      quiet++;
    } else {
      quiet = 0;
      last = now;
    }
  }
  s->after_write_bytes = last - std::min(last, s->write_counter_at_stop);
  s->settle_seconds = NowSeconds() - t0;
  s->settled = true;
}

Status WriteAll(int fd, const uint8_t* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, std::min<size_t>(n, size_t{1} << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      return Status::IOError("write '" + path + "': " + std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::OK();
}

Status FsyncPath(const std::string& path, int flags) {
  int fd = ::open(path.c_str(), flags);
  if (fd < 0) return Status::IOError("open '" + path + "': " + std::strerror(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return Status::IOError("fsync '" + path + "': " + std::strerror(err));
  return Status::OK();
}

// The ceiling: every tensor's bytes into one file, write(2) then fsync.
Status RawSave(const SyntheticState& s, const std::string& path) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::IOError("open '" + path + "': " + std::strerror(errno));
  Status st;
  for (const auto* list : {&s.big, &s.small}) {
    for (const auto& t : *list) {
      st = WriteAll(fd, static_cast<const uint8_t*>(t.tensor.data_ptr()), t.bytes(), path);
      if (!st.ok()) break;
    }
  }
  if (st.ok() && ::fsync(fd) != 0)
    st = Status::IOError("fsync '" + path + "': " + std::strerror(errno));
  ::close(fd);
  if (!st.ok()) return st;
  return FsyncPath(fs::path(path).parent_path().string(), O_RDONLY | O_DIRECTORY);
}

struct KvSaveResult {
  TagInfo info;
  double save_seconds = 0;
  double commit_seconds = 0;
};

KvSaveResult KvSave(KvCheckpointEngine& kv, const std::string& dir, const std::string& tag,
                    const c10::IValue& sd) {
  KvSaveResult r;
  double t0 = NowSeconds();
  kv.create(dir, tag);
  kv.makedirs(dir + "/" + tag, true);  // as DeepSpeed's _create_checkpoint_file does
  kv.save(sd, dir + "/" + tag + "/" + kFile);
  double t1 = NowSeconds();
  kv.commit(tag);
  r.save_seconds = t1 - t0;
  r.commit_seconds = NowSeconds() - t1;
  r.info = kv.last_commit();
  return r;
}

void AddKvFields(Scenario* s, const KvSaveResult& r) {
  s->extra["new_bytes"] = r.info.new_bytes;
  s->extra["new_blocks"] = r.info.new_blocks;
  s->extra["stored_new_bytes"] = r.info.stored_new_bytes;
  s->extra["save_seconds"] = r.save_seconds;
  s->extra["commit_seconds"] = r.commit_seconds;
}

KvEngineConfig KvConfig(const BenchOptions& o, BlockDurability durability) {
  KvEngineConfig c;
  c.store.chunk_size = o.chunk_kb * 1024u;
  c.store.block_durability = durability;
  c.store.threads = o.threads;
  c.store.codec = ParseCodec(o.codec).value_or(Codec::kRaw);  // checked by the CLI
  return c;
}

const char* DurabilityName(BlockDurability d) {
  return d == BlockDurability::kWal ? "wal" : "flush";
}

json ScenarioJson(const Scenario& s) {
  json j;
  j["what"] = s.what;
  j["seconds"] = s.seconds;
  j["logical_bytes"] = s.logical_bytes;
  j["throughput_mib_s"] = s.throughput_mib_s();
  j["device_write_bytes"] = s.device_write_bytes;
  j["after_write_bytes"] = s.after_write_bytes;
  j["total_write_bytes"] = s.total_write_bytes();
  j["settle_seconds"] = s.settle_seconds;
  j["device_read_bytes"] = s.device_read_bytes;
  j["written_vs_logical"] = s.logical_bytes ? double(s.total_write_bytes()) / s.logical_bytes : 0.0;
  j["disk_bytes_after"] = s.disk_bytes_after;
  j["rss_before_bytes"] = s.rss_before_bytes;
  j["peak_rss_bytes"] = s.peak_rss_bytes;
  j["peak_rss_delta_bytes"] = s.peak_rss_delta();
  for (auto it = s.extra.begin(); it != s.extra.end(); ++it) j[it.key()] = it.value();
  return j;
}

struct Target {
  std::string ratio;
  std::string op;  // ">=", "<=", "<"
  double bound;
  std::string text;
};

bool Met(double v, const Target& t) {
  if (t.op == ">=") return v >= t.bound;
  if (t.op == "<=") return v <= t.bound;
  return v < t.bound;
}

std::string Fixed(double v, int prec = 2) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}

// ---------------------------------------------------------------------------
// The core scenarios: saves and loads of one synthetic state dict.

// What the core scenarios share: the options, the state dict, the stores'
// directories and the scenarios measured so far.
struct CoreBench {
  CoreBench(const BenchOptions& options, const std::string& root, std::ostream& log_stream)
      : o(options),
        log(log_stream),
        main_d(o.durability == "wal" ? BlockDurability::kWal : BlockDurability::kFlush),
        alt_d(main_d == BlockDurability::kWal ? BlockDurability::kFlush : BlockDurability::kWal),
        workers(ThreadPool::WorkerCount(o.threads)),  // as the stores count them
        root(root),
        raw_dir(root + "/raw"),
        torch_dir(root + "/torch"),
        kv_dir(root + "/kv"),
        alt_dir(root + std::string("/kv-") + DurabilityName(alt_d)),
        series_dir(root + "/kv-series") {}

  const BenchOptions& o;
  std::ostream& log;
  const BlockDurability main_d, alt_d;
  const size_t workers;
  const std::string root, raw_dir, torch_dir, kv_dir, alt_dir, series_dir;
  const std::string tag1 = "global_step1000";  // the full save, which the loads read

  SyntheticState state;
  uint64_t logical = 0;
  size_t n_tensors = 0;
  c10::IValue sd;

  // The main store, open from full_save_kv until resave_10pct_kv has ended.
  std::unique_ptr<KvCheckpointEngine> kv;
  // An engine the running scenario used, closed only after the scenario has
  // ended (settled), so that closing it is not charged to the scenario.
  std::unique_ptr<CheckpointEngine> held;
  // Scratch directories removed once the running scenario has ended (unless --keep).
  std::vector<std::string> remove_after;

  uint64_t changed_bytes = 0;   // of resave_10pct_kv
  bool dropped = true;          // whether the loads ran from a cold page cache
  int rc = 0;                   // 2 once a loaded checkpoint differs from the saved one
  std::vector<Scenario> order;  // as they ended
  std::map<std::string, Scenario> by_name;

  std::string AltName() const { return std::string("full_save_kv_") + DurabilityName(alt_d); }
  const Scenario& S(const std::string& name) const { return by_name.at(name); }

  // Makes the synthetic state dict.
  void Generate() {
    log << "ckptkv bench: " << o.size_mb << " MiB state dict, chunk " << o.chunk_kb
        << " KiB, codec " << o.codec << ", blocks " << DurabilityName(main_d) << ", scratch "
        << root << std::endl;
    double tg = NowSeconds();
    state = MakeState(o.size_mb);
    logical = state.logical_bytes();
    n_tensors = state.big.size() + state.small.size();
    sd = ToStateDict(state, 1000);
    log << "generated " << n_tensors << " tensors, " << HumanBytes(logical) << " in "
        << Fixed(NowSeconds() - tg) << " s" << std::endl;
  }

  Scenario& Begin(const std::string& name) {
    log << "  " << name << " ..." << std::flush;
    Scenario& s = by_name[name];
    s.name = name;
    return s;
  }

  // Charges the scenario its background writes, logs it, then closes what
  // it left open and removes its scratch directories.
  void End(Scenario& s) {
    Settle(&s);
    if (s.extra.contains("changed_bytes")) {
      uint64_t changed = s.extra["changed_bytes"].get<uint64_t>();
      s.extra["written_vs_changed"] = changed ? double(s.total_write_bytes()) / changed : 0.0;
    }
    log << " " << Fixed(s.seconds, 3) << " s";
    if (s.after_write_bytes > 0) {
      log << " (+" << HumanBytes(s.after_write_bytes) << " written in the background after it)";
    }
    log << std::endl;
    order.push_back(s);
    held.reset();
    std::error_code ec;
    if (!o.keep) {
      for (const auto& dir : remove_after) fs::remove_all(dir, ec);
    }
    remove_after.clear();
  }

  // One timed save + commit into a store, with the store's figures.
  KvSaveResult MeasureKvSave(Scenario& s, KvCheckpointEngine& engine, const std::string& dir,
                             const std::string& tag, const c10::IValue& state_dict) {
    Meter m(&s);
    KvSaveResult r = KvSave(engine, dir, tag, state_dict);
    m.Stop();
    s.logical_bytes = r.info.logical_bytes;
    AddKvFields(&s, r);
    s.disk_bytes_after = engine.store()->DiskBytes();
    return r;
  }

  // A timed open + load of the full save, from a cold page cache where
  // possible, checked against the saved state dict.
  void MeasureLoad(Scenario& s, CheckpointEngine& engine, const std::string& dir,
                   const std::function<uint64_t()>& disk_bytes) {
    // Without --drop-caches (or without the right to drop them) the loads
    // run from whatever the page cache holds: say so.
    dropped = o.drop_caches && DropPageCache() && dropped;
    c10::IValue loaded;
    {
      Meter m(&s);
      engine.open(dir, tag1);
      loaded = engine.load(dir + "/" + tag1 + "/" + kFile);
      m.Stop();
    }
    s.logical_bytes = logical;
    s.disk_bytes_after = disk_bytes();
    s.extra["cold_cache"] = dropped;
    std::string why;
    bool same = SameValue(sd, loaded, "", &why);
    s.extra["equal"] = same;
    if (!same) {
      std::cerr << "error: " << s.name
                << ": the loaded checkpoint differs from the saved one: " << why << std::endl;
      rc = 2;
    }
  }
};

void FullSaveRaw(CoreBench& b, Scenario& s) {
  s.what = "write(2) of every tensor's bytes to one file, fsync";
  fs::create_directories(b.raw_dir);
  Meter m(&s);
  ThrowIfError(RawSave(b.state, b.raw_dir + "/state.bin"));
  m.Stop();
  s.logical_bytes = b.logical;
  s.disk_bytes_after = TreeBytes(b.raw_dir);
  // Kept for load_raw, which removes it.
}

void FullSaveTorch(CoreBench& b, Scenario& s) {
  s.what = "TorchCheckpointEngine save + commit (pickle zip, fsync)";
  auto te = std::make_unique<TorchCheckpointEngine>();
  te->makedirs(b.torch_dir, true);
  Meter m(&s);
  te->create(b.torch_dir, b.tag1);
  te->makedirs(b.torch_dir + "/" + b.tag1, true);
  te->save(b.sd, b.torch_dir + "/" + b.tag1 + "/" + kFile);
  te->commit(b.tag1);
  m.Stop();
  s.logical_bytes = b.logical;
  s.disk_bytes_after = TreeBytes(b.torch_dir);
  b.held = std::move(te);
}

// full_save_kv, resave_unchanged_kv and resave_10pct_kv save into one store.
void FullSaveKv(CoreBench& b, Scenario& s) {
  s.what = std::string("KvCheckpointEngine save + commit into an empty store (blocks ") +
           DurabilityName(b.main_d) + ")";
  b.kv = std::make_unique<KvCheckpointEngine>(KvConfig(b.o, b.main_d));
  b.kv->makedirs(b.kv_dir, true);
  b.MeasureKvSave(s, *b.kv, b.kv_dir, b.tag1, b.sd);
  s.extra["durability"] = DurabilityName(b.main_d);
}

void ResaveUnchangedKv(CoreBench& b, Scenario& s) {
  s.what = "the same state dict again under a new tag";
  b.MeasureKvSave(s, *b.kv, b.kv_dir, "global_step1001", ToStateDict(b.state, 1001));
}

void Resave10pctKv(CoreBench& b, Scenario& s) {
  s.what = "10% of the bytes (whole tensors) changed, new tag";
  SyntheticState changed = b.state;  // shares the tensors
  for (size_t i : PickTensors(b.state, 0.10, b.logical, 7)) {
    changed.big[i].tensor = b.state.big[i].tensor.add(1.0);
    b.changed_bytes += changed.big[i].bytes();
  }
  const c10::IValue sd10 = ToStateDict(changed, 1002);
  KvSaveResult r = b.MeasureKvSave(s, *b.kv, b.kv_dir, "global_step1002", sd10);
  s.extra["changed_bytes"] = b.changed_bytes;
  s.extra["new_vs_changed"] = b.changed_bytes ? double(r.info.new_bytes) / b.changed_bytes : 0.0;
  b.held = std::move(b.kv);  // the last save into the main store: closed (and unlocked)
}

// As full_save_kv, with the other block durability.
void FullSaveKvAlt(CoreBench& b, Scenario& s) {
  s.what = std::string("as full_save_kv, blocks ") + DurabilityName(b.alt_d);
  auto kv = std::make_unique<KvCheckpointEngine>(KvConfig(b.o, b.alt_d));
  kv->makedirs(b.alt_dir, true);
  b.MeasureKvSave(s, *kv, b.alt_dir, b.tag1, b.sd);
  s.extra["durability"] = DurabilityName(b.alt_d);
  b.held = std::move(kv);
  b.remove_after.push_back(b.alt_dir);
}

void FrozenSeriesKv(CoreBench& b, Scenario& s) {
  const BenchOptions& o = b.o;
  s.what =
      std::to_string(o.series_saves) + " saves, 98% frozen base, 2% of the bytes new each save";
  const std::vector<size_t> hot = PickTensors(b.state, 0.02, b.logical, 13);
  uint64_t hot_bytes = 0;
  for (size_t i : hot) hot_bytes += b.state.big[i].bytes();
  auto kv = std::make_unique<KvCheckpointEngine>(KvConfig(o, b.main_d));
  kv->makedirs(b.series_dir, true);
  const uint64_t disk_before = kv->store()->DiskBytes();
  uint64_t logical_sum = 0, unique = 0, new_sum = 0;
  double first_secs = 0, rest_secs = 0, max_rest = 0;
  // Per-save data is made outside the timed region; the meter spans the
  // whole series, and `seconds` is the sum of the timed saves.
  IoCounters io0 = ReadIoCounters();
  ::sync();
  ResetPeakRss();
  s.rss_before_bytes = CurrentRssBytes();
  for (int k = 0; k < o.series_saves; k++) {
    SyntheticState cur = b.state;
    for (size_t j = 0; j < hot.size(); j++) {
      size_t i = hot[j];
      cur.big[i].tensor = RandomTensor(b.state.big[i].tensor.sizes().vec(),
                                       b.state.big[i].tensor.scalar_type(), 900000 + 1000 * k + j);
    }
    c10::IValue sdk = ToStateDict(cur, 2000 + k);
    double t0 = NowSeconds();
    KvSaveResult r = KvSave(*kv, b.series_dir, "global_step" + std::to_string(2000 + k), sdk);
    double dt = NowSeconds() - t0;
    logical_sum += r.info.logical_bytes;
    new_sum += r.info.new_bytes;
    unique += (k == 0) ? r.info.logical_bytes : hot_bytes;
    if (k == 0)
      first_secs = dt;
    else {
      rest_secs += dt;
      max_rest = std::max(max_rest, dt);
    }
  }
  IoCounters io1 = ReadIoCounters();
  s.seconds = first_secs + rest_secs;
  s.device_write_bytes = io1.write_bytes - io0.write_bytes;
  s.write_counter_at_stop = io1.write_bytes;
  s.device_read_bytes = io1.read_bytes - io0.read_bytes;
  s.peak_rss_bytes = PeakRssBytes();
  s.ran = true;
  s.logical_bytes = logical_sum;
  // Size while open includes background work in flight (compactions);
  // the store's size at rest is taken after closing it.
  Settle(&s);
  const uint64_t disk_open = kv->store()->DiskBytes();
  kv.reset();
  s.disk_bytes_after = TreeBytes(b.series_dir);
  const uint64_t growth = s.disk_bytes_after - std::min(disk_before, s.disk_bytes_after);
  s.extra["saves"] = o.series_saves;
  s.extra["changed_bytes_per_save"] = hot_bytes;
  s.extra["unique_bytes"] = unique;
  s.extra["new_bytes"] = new_sum;
  s.extra["store_growth_bytes"] = growth;
  s.extra["store_disk_bytes_open"] = disk_open;
  s.extra["store_growth_vs_unique"] = unique ? double(growth) / unique : 0.0;
  s.extra["first_save_seconds"] = first_secs;
  s.extra["later_save_seconds_mean"] = o.series_saves > 1 ? rest_secs / (o.series_saves - 1) : 0.0;
  s.extra["later_save_seconds_max"] = max_rest;
  b.remove_after.push_back(b.series_dir);
}

// The read ceiling: the raw file read back sequentially into new tensors.
void LoadRaw(CoreBench& b, Scenario& s) {
  s.what = "read(2) of the raw file into new tensors (the read ceiling)";
  b.dropped = b.o.drop_caches && DropPageCache() && b.dropped;
  const std::string path = b.raw_dir + "/state.bin";
  std::vector<at::Tensor> loaded;
  {
    Meter m(&s);
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) ThrowIfError(Status::IOError("open '" + path + "': " + std::strerror(errno)));
    for (const auto* list : {&b.state.big, &b.state.small}) {
      for (const auto& t : *list) {
        at::Tensor dst = at::empty(t.tensor.sizes(), t.tensor.options());
        auto* p = static_cast<uint8_t*>(dst.data_ptr());
        for (uint64_t done = 0; done < t.bytes();) {
          const ssize_t n = ::read(fd, p + done, t.bytes() - done);
          if (n <= 0) {
            ::close(fd);
            ThrowIfError(Status::IOError(
                "read '" + path + "': " + (n == 0 ? "unexpected end" : std::strerror(errno))));
          }
          done += static_cast<uint64_t>(n);
        }
        loaded.push_back(std::move(dst));
      }
    }
    ::close(fd);
    m.Stop();
  }
  s.logical_bytes = b.logical;
  s.disk_bytes_after = TreeBytes(b.raw_dir);
  s.extra["cold_cache"] = b.dropped;
  bool same = true;
  size_t i = 0;
  for (const auto* list : {&b.state.big, &b.state.small}) {
    for (const auto& t : *list) same = same && at::equal(loaded[i++], t.tensor);
  }
  s.extra["equal"] = same;
  if (!same) {
    std::cerr << "error: load_raw: the raw file differs from the saved tensors" << std::endl;
    b.rc = 2;
  }
  b.remove_after.push_back(b.raw_dir);
}

void LoadKv(CoreBench& b, Scenario& s) {
  s.what = "KvCheckpointEngine open + load of the full save";
  auto kv = std::make_unique<KvCheckpointEngine>(KvConfig(b.o, b.main_d));
  KvCheckpointEngine* engine = kv.get();
  b.MeasureLoad(s, *kv, b.kv_dir, [engine] { return engine->store()->DiskBytes(); });
  b.held = std::move(kv);
}

void LoadTorch(CoreBench& b, Scenario& s) {
  s.what = "TorchCheckpointEngine open + load of the full save";
  auto te = std::make_unique<TorchCheckpointEngine>();
  b.MeasureLoad(s, *te, b.torch_dir, [&b] { return TreeBytes(b.torch_dir); });
  b.held = std::move(te);
}

// The core scenarios in the order they run.
struct CoreScenario {
  std::string name;
  void (*run)(CoreBench&, Scenario&);
};

std::vector<CoreScenario> CoreScenarios(const CoreBench& b) {
  std::vector<CoreScenario> table = {
      {"full_save_raw", FullSaveRaw},     {"full_save_torch", FullSaveTorch},
      {"full_save_kv", FullSaveKv},       {"resave_unchanged_kv", ResaveUnchangedKv},
      {"resave_10pct_kv", Resave10pctKv},
  };
  if (b.o.alt_durability) table.push_back({b.AltName(), FullSaveKvAlt});
  table.push_back({"frozen_series_kv", FrozenSeriesKv});
  table.push_back({"load_raw", LoadRaw});
  table.push_back({"load_kv", LoadKv});
  table.push_back({"load_torch", LoadTorch});
  return table;
}

double Div(double a, double b) { return b > 0 ? a / b : 0.0; }

// The ratios between the scenarios' figures that the targets judge.
json CoreRatios(const CoreBench& b) {
  auto S = [&](const std::string& n) -> const Scenario& { return b.S(n); };
  json ratios;
  ratios["full_save_kv_vs_raw_throughput"] =
      Div(S("full_save_kv").throughput_mib_s(), S("full_save_raw").throughput_mib_s());
  ratios["full_save_torch_vs_raw_throughput"] =
      Div(S("full_save_torch").throughput_mib_s(), S("full_save_raw").throughput_mib_s());
  ratios["full_save_kv_vs_torch_time"] =
      Div(S("full_save_kv").seconds, S("full_save_torch").seconds);
  ratios["full_save_kv_written_vs_logical"] =
      Div(S("full_save_kv").total_write_bytes(), S("full_save_kv").logical_bytes);
  ratios["resave_unchanged_vs_full_time"] =
      Div(S("resave_unchanged_kv").seconds, S("full_save_kv").seconds);
  ratios["resave_unchanged_written_vs_logical"] =
      Div(S("resave_unchanged_kv").total_write_bytes(), S("resave_unchanged_kv").logical_bytes);
  ratios["resave_10pct_vs_full_time"] =
      Div(S("resave_10pct_kv").seconds, S("full_save_kv").seconds);
  ratios["resave_10pct_written_vs_changed"] =
      Div(S("resave_10pct_kv").total_write_bytes(), b.changed_bytes);
  ratios["frozen_series_store_growth_vs_unique"] =
      S("frozen_series_kv").extra.value("store_growth_vs_unique", 0.0);
  ratios["frozen_series_written_vs_unique"] =
      Div(S("frozen_series_kv").total_write_bytes(),
          S("frozen_series_kv").extra.value("unique_bytes", uint64_t{0}));
  ratios["load_kv_vs_torch_time"] = Div(S("load_kv").seconds, S("load_torch").seconds);
  ratios["load_kv_vs_raw_throughput"] =
      Div(S("load_kv").throughput_mib_s(), S("load_raw").throughput_mib_s());
  ratios["full_save_kv_peak_rss_delta_chunks_per_worker"] = Div(
      Div(S("full_save_kv").peak_rss_delta(), double(b.o.chunk_kb) * 1024.0), double(b.workers));
  if (b.o.alt_durability) {
    const Scenario& alt = S(b.AltName());
    const Scenario& main_s = S("full_save_kv");
    const Scenario& flush = b.main_d == BlockDurability::kFlush ? main_s : alt;
    const Scenario& wal = b.main_d == BlockDurability::kFlush ? alt : main_s;
    ratios["full_save_wal_vs_flush_time"] = Div(wal.seconds, flush.seconds);
    ratios["full_save_wal_vs_flush_written"] =
        Div(wal.total_write_bytes(), flush.total_write_bytes());
  }
  return ratios;
}

const std::vector<Target>& CoreTargets() {
  static const std::vector<Target> targets = {
      {"full_save_kv_vs_raw_throughput", ">=", 0.85, "full save >= 0.85x raw-write throughput"},
      {"full_save_kv_vs_torch_time", "<", 1.0, "full save faster than torch"},
      {"resave_unchanged_vs_full_time", "<", 0.05, "unchanged re-save < 5% of full-save time"},
      {"resave_unchanged_written_vs_logical", "<", 0.01,
       "unchanged re-save writes < 1% of logical bytes"},
      {"resave_10pct_vs_full_time", "<", 0.15, "10%-changed save < 15% of full-save time"},
      {"resave_10pct_written_vs_changed", "<=", 1.15,
       "10%-changed save writes <= 1.15x changed bytes"},
      {"frozen_series_store_growth_vs_unique", "<=", 1.10,
       "frozen-base series stored in <= 1.1x unique bytes"},
      {"load_kv_vs_torch_time", "<=", 1.0, "load at least as fast as torch"},
      {"load_kv_vs_raw_throughput", ">=", 0.9,
       "load >= 0.9x the cold sequential read of the same bytes"},
      {"full_save_kv_peak_rss_delta_chunks_per_worker", "<=", 4.0,
       "peak RSS growth during a save <= 4 chunks per worker"},
  };
  return targets;
}

// The --json part of the core scenarios, into *out.
void PutCoreJson(const CoreBench& b, const json& ratios, json* out) {
  json targets_j;
  for (const auto& t : CoreTargets()) {
    double v = ratios.value(t.ratio, 0.0);
    targets_j[t.ratio] = {
        {"target", t.op + " " + Fixed(t.bound)}, {"value", v}, {"met", Met(v, t)}};
  }
  json& o = *out;
  o["size_mb"] = b.o.size_mb;
  o["options"] = {{"chunk_kb", b.o.chunk_kb},
                  {"codec", b.o.codec},
                  {"durability", DurabilityName(b.main_d)},
                  {"store_workers", b.workers},
                  {"series_saves", b.o.series_saves},
                  {"tensors", b.n_tensors},
                  {"logical_bytes", b.logical},
                  {"page_cache_dropped_before_loads", b.dropped},
                  {"dir", b.root}};
  json scen;
  for (const auto& s : b.order) scen[s.name] = ScenarioJson(s);
  o["scenarios"] = std::move(scen);
  o["ratios"] = ratios;
  o["targets"] = std::move(targets_j);
}

// The tables of the core scenarios, on stdout.
void PrintCoreTables(const CoreBench& b, const json& ratios) {
  std::printf(
      "\nstate dict: %zu tensors, %s; chunk %u KiB; codec %s; %zu store workers; loads %s\n\n",
      b.n_tensors, HumanBytes(b.logical).c_str(), b.o.chunk_kb, b.o.codec.c_str(), b.workers,
      b.dropped ? "from a cold page cache" : "from a warm page cache");
  std::printf("%-22s %8s %11s %9s %11s %9s %9s %9s %11s %13s\n", "scenario", "seconds",
              "logical MiB", "MiB/s", "written MiB", "(bg MiB)", "wr/logic", "read MiB",
              "on disk MiB", "peak RSS +MiB");
  for (const auto& s : b.order) {
    std::printf("%-22s %8.3f %11.1f %9.1f %11.1f %9.1f %9.4f %9.1f %11.1f %13.1f\n", s.name.c_str(),
                s.seconds, s.logical_bytes / kMiB, s.throughput_mib_s(),
                s.total_write_bytes() / kMiB, s.after_write_bytes / kMiB,
                s.logical_bytes ? double(s.total_write_bytes()) / s.logical_bytes : 0.0,
                s.device_read_bytes / kMiB, s.disk_bytes_after / kMiB, s.peak_rss_delta() / kMiB);
  }
  const Scenario& r10 = b.S("resave_10pct_kv");
  const Scenario& fs_ = b.S("frozen_series_kv");
  std::printf("\nresave_10pct_kv: changed %.1f MiB, new %.1f MiB, written %.1f MiB\n",
              b.changed_bytes / kMiB, r10.extra.value("new_bytes", uint64_t{0}) / kMiB,
              r10.total_write_bytes() / kMiB);
  std::printf(
      "frozen_series_kv: %d saves, unique %.1f MiB, store growth %.1f MiB, first save %.3f s, "
      "later saves %.3f s mean / %.3f s max\n",
      b.o.series_saves, fs_.extra.value("unique_bytes", uint64_t{0}) / kMiB,
      fs_.extra.value("store_growth_bytes", uint64_t{0}) / kMiB,
      fs_.extra.value("first_save_seconds", 0.0), fs_.extra.value("later_save_seconds_mean", 0.0),
      fs_.extra.value("later_save_seconds_max", 0.0));
  std::printf("\n%-48s %10s %10s %s\n", "ratio", "value", "target", "");
  for (const auto& t : CoreTargets()) {
    double v = ratios.value(t.ratio, 0.0);
    std::printf("%-48s %10.4f %10s %s\n", t.ratio.c_str(), v, (t.op + " " + Fixed(t.bound)).c_str(),
                Met(v, t) ? "met" : "NOT met");
  }
  for (const char* extra : {"full_save_torch_vs_raw_throughput", "full_save_kv_written_vs_logical",
                            "frozen_series_written_vs_unique", "full_save_wal_vs_flush_time",
                            "full_save_wal_vs_flush_written"}) {
    if (ratios.contains(extra)) std::printf("%-48s %10.4f\n", extra, ratios.value(extra, 0.0));
  }
  std::printf("\nloaded checkpoints equal the saved state: %s\n", b.rc == 0 ? "yes" : "NO");
}

// The core scenarios under `root`, one after the other (CoreScenarios).
// With --json the results go into *out_json, otherwise tables are printed.
// Returns 0, or 2 if a loaded checkpoint differs from the saved one.
int RunCoreBench(const BenchOptions& o, const std::string& root, std::ostream& log,
                 json* out_json) {
  CoreBench b(o, root, log);
  b.Generate();
  for (const CoreScenario& entry : CoreScenarios(b)) {
    Scenario& s = b.Begin(entry.name);
    entry.run(b, s);
    b.End(s);
  }
  const json ratios = CoreRatios(b);
  if (o.json) {
    PutCoreJson(b, ratios, out_json);
  } else {
    PrintCoreTables(b, ratios);
  }
  return b.rc;
}

}  // namespace

int RunBench(const BenchOptions& o) {
  const bool core = o.scenarios == "all" || o.scenarios == "core";
  const bool reshape = o.scenarios == "all" || o.scenarios == "reshape";
  if (!core && !reshape) {
    return ReportError(Status::InvalidArgument("--scenarios '" + o.scenarios +
                                               "': valid values are all, core and reshape"));
  }
  // Checked before the core scenarios, which take minutes at full size.
  if (reshape) {
    if (Status st = CheckReshapeBenchOptions(o); !st.ok()) return ReportError(st);
  }
  // With --json, stdout carries only the JSON object: log lines go to stderr.
  if (o.json) spdlog::set_default_logger(spdlog::stderr_color_mt("ckptkv-bench"));
  if (!o.verbose) spdlog::set_level(spdlog::level::warn);
  at::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  std::ostream& log = o.json ? std::cerr : std::cout;  // progress never pollutes the JSON

  // Scratch directory: always a fresh one, removed at the end.
  std::string parent = o.dir.empty() ? "/tmp" : o.dir;
  std::error_code ec;
  fs::create_directories(parent, ec);
  std::string tmpl = (fs::path(parent) / "ckptkv-bench-XXXXXX").string();
  std::vector<char> buf(tmpl.begin(), tmpl.end());
  buf.push_back('\0');
  if (::mkdtemp(buf.data()) == nullptr) {
    return ReportError(Status::IOError("cannot make a scratch directory under '" + parent +
                                       "': " + std::strerror(errno)));
  }
  const std::string root = buf.data();
  struct Cleanup {
    std::string dir;
    bool keep;
    ~Cleanup() {
      std::error_code ec;
      if (!keep) fs::remove_all(dir, ec);
    }
  } cleanup{root, o.keep};

  MachineInfo mi = GetMachineInfo(root);
  json out;
  out["machine"] = {
      {"cpu_model", mi.cpu_model}, {"cores", mi.cores}, {"mem_total_bytes", mi.mem_total_bytes},
      {"kernel", mi.kernel},       {"disk", mi.disk},   {"filesystem", mi.filesystem}};
  if (!o.json) {
    std::printf("machine: %s, %u cores, %s RAM, %s, %s on %s\n", mi.cpu_model.c_str(), mi.cores,
                HumanBytes(mi.mem_total_bytes).c_str(), mi.kernel.c_str(), mi.filesystem.c_str(),
                mi.disk.c_str());
    std::fflush(stdout);
  }
  int rc = 0;
  // The core scenarios' state dict is freed before the reshape children run.
  if (core) rc = RunCoreBench(o, root, log, &out);
  if (reshape) {
    std::fflush(stdout);
    const int reshape_rc = RunReshapeBench(o, root, log, &out);
    if (rc == 0) rc = reshape_rc;
  }
  if (o.json) std::cout << JsonText(out, 2) << std::endl;
  return rc;
}

}  // namespace ckptkv::tools
