#include "tools/demo.h"

// The one translation unit that needs torch::nn and torch::optim.
#include <torch/torch.h>

#include <spdlog/spdlog.h>

#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>
#include <string>
#include <vector>

#include "engine/kv_checkpoint_engine.h"
#include "engine/torch_checkpoint_engine.h"
#include "store/file_lock.h"
#include "store/store.h"
#include "tools/kv_browser/text.h"
#include "tools/proc_stats.h"

namespace fs = std::filesystem;

namespace ckptkv::tools {

using kvb::ReportError;

namespace {

constexpr const char* kFile = "mp_rank_00_model_states.pt";
constexpr double kMiB = 1024.0 * 1024.0;
constexpr uint64_t kInitSeed = 42;
constexpr uint64_t kResumeInitSeed = 4242;  // the resumed model starts elsewhere on purpose
constexpr uint64_t kTaskSeed = 7;
constexpr double kLr = 1e-3;

// A frozen embedding table feeding a small trainable MLP (with a BatchNorm,
// so that the module has buffers as well as parameters).
struct DemoNetImpl : torch::nn::Module {
  DemoNetImpl(int64_t vocab, int64_t dim, int64_t hidden) {
    embed = register_module("embed", torch::nn::Embedding(vocab, dim));
    embed->weight.set_requires_grad(false);
    fc1 = register_module("fc1", torch::nn::Linear(dim, hidden));
    norm = register_module("norm", torch::nn::BatchNorm1d(hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, hidden));
    fc3 = register_module("fc3", torch::nn::Linear(hidden, dim));
  }
  torch::Tensor forward(const torch::Tensor& idx) {
    torch::Tensor x = embed->forward(idx);
    x = norm->forward(torch::relu(fc1->forward(x)));
    x = torch::relu(fc2->forward(x));
    return fc3->forward(x);
  }
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr}, fc3{nullptr};
  torch::nn::BatchNorm1d norm{nullptr};
};
TORCH_MODULE(DemoNet);

struct Trainer {
  Trainer(const DemoOptions& o, uint64_t init_seed, const torch::Tensor& task)
      : opts(o), task_w(task) {
    torch::manual_seed(init_seed);
    net = DemoNet(o.vocab, o.dim, o.hidden);
    std::vector<torch::Tensor> trainable;
    for (auto& p : net->parameters()) {
      if (p.requires_grad()) trainable.push_back(p);
    }
    optimizer = std::make_unique<torch::optim::Adam>(trainable, torch::optim::AdamOptions(kLr));
  }

  // One step on batch `step`: the batch depends only on the step number, so
  // a resumed run needs no data-loader state.
  float Step(int step) {
    torch::manual_seed(1000003ull * static_cast<uint64_t>(step) + 17);
    torch::Tensor idx = torch::randint(0, opts.vocab, {opts.batch}, torch::kLong);
    torch::Tensor target;
    {
      torch::NoGradGuard no_grad;
      target = torch::tanh(net->embed->weight.index_select(0, idx).matmul(task_w));
    }
    net->train();
    optimizer->zero_grad();
    torch::Tensor loss = torch::mse_loss(net->forward(idx), target);
    loss.backward();
    optimizer->step();
    return loss.item<float>();
  }

  // DeepSpeed-like model-states file.
  c10::IValue StateDict(int global_step) const {
    c10::impl::GenericDict module(c10::StringType::get(), c10::TensorType::get());
    for (const auto& p : net->named_parameters()) module.insert(p.key(), p.value().detach());
    for (const auto& b : net->named_buffers()) module.insert(b.key(), b.value().detach());

    const auto& group = optimizer->param_groups().at(0);
    const auto& params = group.params();
    c10::impl::GenericDict state(c10::IntType::get(), c10::AnyType::get());
    for (size_t i = 0; i < params.size(); i++) {
      auto it = optimizer->state().find(c10::guts::to_string(params[i].unsafeGetTensorImpl()));
      if (it == optimizer->state().end()) continue;
      const auto& s = static_cast<const torch::optim::AdamParamState&>(*it->second);
      c10::impl::GenericDict entry(c10::StringType::get(), c10::AnyType::get());
      entry.insert("step", s.step());
      entry.insert("exp_avg", s.exp_avg());
      entry.insert("exp_avg_sq", s.exp_avg_sq());
      state.insert(static_cast<int64_t>(i), entry);
    }
    const auto& ao = static_cast<const torch::optim::AdamOptions&>(group.options());
    c10::impl::GenericDict pg(c10::StringType::get(), c10::AnyType::get());
    pg.insert("lr", ao.lr());
    pg.insert("betas", c10::ivalue::Tuple::create({c10::IValue(std::get<0>(ao.betas())),
                                                   c10::IValue(std::get<1>(ao.betas()))}));
    pg.insert("eps", ao.eps());
    pg.insert("weight_decay", ao.weight_decay());
    pg.insert("amsgrad", ao.amsgrad());
    c10::List<int64_t> ids;
    for (size_t i = 0; i < params.size(); i++) ids.push_back(static_cast<int64_t>(i));
    pg.insert("params", ids);
    c10::impl::GenericList groups(c10::AnyType::get());
    groups.push_back(pg);
    c10::impl::GenericDict optim(c10::StringType::get(), c10::AnyType::get());
    optim.insert("state", state);
    optim.insert("param_groups", groups);

    c10::impl::GenericDict args(c10::StringType::get(), c10::AnyType::get());
    args.insert("steps", static_cast<int64_t>(opts.steps));
    args.insert("every", static_cast<int64_t>(opts.every));
    args.insert("batch", opts.batch);
    args.insert("hidden", opts.hidden);
    args.insert("vocab", opts.vocab);
    args.insert("lr", kLr);

    c10::impl::GenericDict sd(c10::StringType::get(), c10::AnyType::get());
    sd.insert("module", module);
    sd.insert("optimizer", optim);
    sd.insert("global_steps", static_cast<int64_t>(global_step));
    sd.insert("iteration", static_cast<int64_t>(global_step));
    sd.insert("ds_version", std::string("0.16.0"));
    sd.insert("args", args);
    return sd;
  }

  // Restores a StateDict(); returns its global step.
  int Restore(const c10::IValue& value) {
    auto sd = value.toGenericDict();
    auto module = sd.at("module").toGenericDict();
    {
      torch::NoGradGuard no_grad;
      for (auto& p : net->named_parameters()) p.value().copy_(module.at(p.key()).toTensor());
      for (auto& b : net->named_buffers()) b.value().copy_(module.at(b.key()).toTensor());
    }
    auto optim = sd.at("optimizer").toGenericDict();
    auto& group = optimizer->param_groups().at(0);
    auto pgs = optim.at("param_groups").toList();
    TORCH_CHECK(pgs.size() == 1, "expected one param group, got ", pgs.size());
    auto pg = pgs.get(0).toGenericDict();
    auto& ao = static_cast<torch::optim::AdamOptions&>(group.options());
    ao.lr(pg.at("lr").toDouble());
    auto betas = pg.at("betas").toTuple();
    ao.betas(
        std::make_tuple(betas->elements().at(0).toDouble(), betas->elements().at(1).toDouble()));
    ao.eps(pg.at("eps").toDouble());
    ao.weight_decay(pg.at("weight_decay").toDouble());
    ao.amsgrad(pg.at("amsgrad").toBool());
    const auto& params = group.params();
    optimizer->state().clear();
    for (const auto& e : optim.at("state").toGenericDict()) {
      int64_t i = e.key().toInt();
      TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < params.size(), "optimizer state index ", i,
                  " out of range");
      auto s = e.value().toGenericDict();
      auto st = std::make_unique<torch::optim::AdamParamState>();
      st->step(s.at("step").toInt());
      st->exp_avg(s.at("exp_avg").toTensor());
      st->exp_avg_sq(s.at("exp_avg_sq").toTensor());
      optimizer
          ->state()[c10::guts::to_string(params[static_cast<size_t>(i)].unsafeGetTensorImpl())] =
          std::move(st);
    }
    return static_cast<int>(sd.at("global_steps").toInt());
  }

  const DemoOptions& opts;
  torch::Tensor task_w;
  DemoNet net{nullptr};
  std::unique_ptr<torch::optim::Adam> optimizer;
};

bool IsDemoTag(const std::string& tag) {
  static const std::regex re("global_step[0-9]+");
  return std::regex_match(tag, re);
}

// A file the demo leaves in stores it creates, so that a rerun removes only
// its own store and never a real one (whose tags may look the same).
constexpr const char* kDemoMarker = "CKPTKV-DEMO";

// Makes `db` ready for a fresh demo store: absent, empty, or a store an
// earlier demo made (removed). Anything else is refused.
Status PrepareStoreDir(const std::string& db) {
  std::error_code ec;
  if (!fs::exists(db, ec) || (fs::is_directory(db, ec) && fs::is_empty(db, ec)))
    return Status::OK();
  if (!fs::exists(fs::path(db) / kDemoMarker, ec)) {
    return Status::InvalidArgument("'" + db +
                                   "' exists and was not made by ckptkv demo; not touching it. "
                                   "Give --db a new or empty directory");
  }
  // The write lock first: a demo still writing this store keeps it (Busy).
  ASSIGN_OR_RETURN(auto lock, FileLock::Acquire(db));
  StoreOptions so;
  so.read_only = true;
  so.create_if_missing = false;
  auto store_or = Store::Open(db, so);
  if (!store_or.ok()) return store_or.status();
  store_or->reset();
  // Empty the directory while holding the lock on it; the demo's own
  // Store::Open then takes the lock again for the new store.
  for (const auto& e : fs::directory_iterator(db, ec)) {
    fs::remove_all(e.path(), ec);
    if (ec) break;
  }
  if (ec)
    return Status::IOError("cannot remove the earlier demo store '" + db + "': " + ec.message());
  return Status::OK();
}

// The plain-file sibling: absent, empty, or only `latest` and global_step*.
Status PrepareFilesDir(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return Status::OK();
  if (!fs::is_directory(dir, ec)) {
    return Status::InvalidArgument("'" + dir + "' exists and is not a directory; not touching it");
  }
  auto foreign = [&](const std::string& name) {
    return Status::InvalidArgument("'" + dir + "' holds '" + name +
                                   "', which the demo did not write; not deleting it");
  };
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    std::string name = e.path().filename().string();
    if (name != "latest" && !IsDemoTag(name)) return foreign(name);
  }
  fs::remove_all(dir, ec);
  if (ec) return Status::IOError("cannot remove '" + dir + "': " + ec.message());
  return Status::OK();
}

std::string StripSlash(std::string s) {
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The last step checkpointed: every `every` steps up to it; the steps after
// it are replayed by the resumed run. It leaves at least one step (two
// intervals when possible); 0 when no checkpoint would be left to resume from.
int LastCheckpointStep(int steps, int every) {
  int c = ((steps - 2 * every) / every) * every;
  if (c < every) c = ((steps - 1) / every) * every;
  return c < every || c >= steps ? 0 : c;
}

// What the uninterrupted run cost and saved.
struct RunTotals {
  std::vector<float> losses;  // by step, 1..steps
  uint64_t kv_logical = 0, kv_new = 0, file_bytes = 0;
  double kv_secs = 0, file_secs = 0, train_secs = 0;
  int saves = 0;
  uint64_t store_disk = 0, files_disk = 0;
};

void PrintHeader(const DemoOptions& o, const Trainer& run, int last_ckpt, const std::string& db,
                 const std::string& files_dir) {
  int64_t frozen = 0, trainable = 0, buffers = 0;
  for (const auto& p : run.net->parameters())
    (p.requires_grad() ? trainable : frozen) += p.nbytes();
  for (const auto& b : run.net->buffers()) buffers += b.nbytes();
  std::printf("ckptkv demo: frozen embedding %" PRId64 "x%" PRId64
              " (%.1f MiB) + MLP (%.1f MiB of "
              "parameters, %.2f KiB of buffers), Adam lr %g\n",
              o.vocab, o.dim, frozen / kMiB, trainable / kMiB, buffers / 1024.0, kLr);
  std::printf("training %d steps, checkpoint every %d steps up to step %d\n", o.steps, o.every,
              last_ckpt);
  std::printf("store: %s    plain files for comparison: %s\n\n", db.c_str(), files_dir.c_str());
}

// The uninterrupted run: trains every step and checkpoints every `every`
// steps up to `last_ckpt`, into the store and as plain files, one table row
// per checkpoint.
RunTotals TrainAndCheckpoint(const DemoOptions& o, Trainer& run, int last_ckpt,
                             const std::string& db, const std::string& files_dir) {
  std::printf("%-16s %8s %12s %10s %8s %8s | %10s %8s\n", "tag", "loss", "logical MiB", "new MiB",
              "dedup", "save s", "file MiB", "file s");
  RunTotals t;
  t.losses.assign(o.steps + 1, 0.0f);
  {
    KvCheckpointEngine kv;
    TorchCheckpointEngine files;
    kv.makedirs(db, /*exist_ok=*/true);
    std::ofstream(fs::path(db) / kDemoMarker)
        << "made by ckptkv demo; a rerun replaces this store\n";
    files.makedirs(files_dir, /*exist_ok=*/true);
    for (int step = 1; step <= o.steps; step++) {
      double ts = NowSeconds();
      t.losses[step] = run.Step(step);
      t.train_secs += NowSeconds() - ts;
      if (step % o.every != 0 || step > last_ckpt) continue;
      const std::string tag = "global_step" + std::to_string(step);
      c10::IValue sd = run.StateDict(step);

      double t0 = NowSeconds();
      kv.create(tag);
      const fs::path kv_dir = fs::path(db) / tag;
      kv.makedirs(kv_dir.string(), /*exist_ok=*/true);  // DeepSpeed's _create_checkpoint_file
      kv.save(sd, (kv_dir / kFile).string());
      kv.commit(tag);
      double kv_dt = NowSeconds() - t0;
      const TagInfo& info = kv.last_commit();

      t0 = NowSeconds();
      files.create(files_dir, tag);
      const fs::path file_dir = fs::path(files_dir) / tag;
      files.makedirs(file_dir.string(), /*exist_ok=*/true);
      files.save(sd, (file_dir / kFile).string());
      files.commit(tag);
      double file_dt = NowSeconds() - t0;
      uint64_t fbytes = TreeBytes(file_dir.string());

      double dedup = info.new_bytes > 0 ? double(info.logical_bytes) / double(info.new_bytes) : 0.0;
      char dedup_s[32];
      if (info.new_bytes > 0)
        std::snprintf(dedup_s, sizeof dedup_s, "%.2fx", dedup);
      else
        std::snprintf(dedup_s, sizeof dedup_s, "inf");
      std::printf("%-16s %8.5f %12.2f %10.2f %8s %8.3f | %10.2f %8.3f\n", tag.c_str(),
                  t.losses[step], info.logical_bytes / kMiB, info.new_bytes / kMiB, dedup_s, kv_dt,
                  fbytes / kMiB, file_dt);
      std::fflush(stdout);
      t.kv_logical += info.logical_bytes;
      t.kv_new += info.new_bytes;
      t.kv_secs += kv_dt;
      t.file_bytes += fbytes;
      t.file_secs += file_dt;
      t.saves++;
    }
    t.store_disk = kv.store() != nullptr ? kv.store()->DiskBytes() : TreeBytes(db);
  }  // the engines close here; the store's write lock is released
  t.files_disk = TreeBytes(files_dir);
  return t;
}

void PrintTotals(const RunTotals& t, int steps) {
  std::printf("\n%d checkpoints, %.1f MiB logical in all\n", t.saves, t.kv_logical / kMiB);
  std::printf("  %-26s %10s %12s %10s\n", "", "written", "on disk", "seconds");
  std::printf("  %-26s %7.1f MiB %8.1f MiB %10.3f\n", "ckptkv store (new chunks)", t.kv_new / kMiB,
              t.store_disk / kMiB, t.kv_secs);
  std::printf("  %-26s %7.1f MiB %8.1f MiB %10.3f\n", "plain torch files", t.file_bytes / kMiB,
              t.files_disk / kMiB, t.file_secs);
  if (t.kv_new > 0 && t.store_disk > 0 && t.kv_secs > 0) {
    std::printf(
        "  dedup %.2fx: the store takes %.2fx less disk than the files and saved %.2fx faster\n",
        double(t.kv_logical) / double(t.kv_new), double(t.files_disk) / double(t.store_disk),
        t.file_secs / t.kv_secs);
  }
  std::printf("  (training itself: %.2f s for %d steps)\n", t.train_secs, steps);
}

// Resume: a fresh model and optimizer (initialised differently on purpose),
// the latest checkpoint, and the steps after it, whose losses must equal the
// uninterrupted run's bit for bit. Returns the exit code: 0; 1 when the
// store has no tag; 3 when the losses differ or the latest checkpoint is
// not `last_ckpt`.
int ResumeAndCompare(const DemoOptions& o, const torch::Tensor& task_w, const std::string& db,
                     int last_ckpt, const std::vector<float>& losses, double t_start) {
  std::printf("\nresume: fresh model + optimizer, loading the latest checkpoint from %s\n",
              db.c_str());
  Trainer resumed(o, kResumeInitSeed, task_w);
  int from = 0;
  {
    KvCheckpointEngine kv;
    std::optional<std::string> tag = kv.open(db);
    if (!tag) return ReportError(Status::NotFound("store '" + db + "' has no committed tag"));
    double t0 = NowSeconds();
    c10::IValue sd = kv.load(db + "/" + *tag + "/" + kFile);
    double load_dt = NowSeconds() - t0;
    kv.close(*tag);
    from = resumed.Restore(sd);
    std::printf("loaded %s (global step %d) in %.3f s; training steps %d..%d again\n", tag->c_str(),
                from, load_dt, from + 1, o.steps);
  }
  if (from != last_ckpt) {
    std::fprintf(stderr, "error: latest checkpoint is global step %d, expected %d\n", from,
                 last_ckpt);
    return 3;
  }
  std::printf("\n%6s %16s %16s\n", "step", "uninterrupted", "resumed");
  int mismatches = 0;
  for (int step = from + 1; step <= o.steps; step++) {
    float l = resumed.Step(step);
    bool same = FloatBits(l) == FloatBits(losses[step]);
    if (!same) mismatches++;
    std::printf("%6d %16.9g %16.9g%s\n", step, losses[step], l, same ? "" : "   <-- differs");
  }
  const int replayed = o.steps - from;
  std::printf("\ntotal %.2f s\n", NowSeconds() - t_start);
  if (mismatches != 0) {
    std::printf("resume: MISMATCH (%d of %d losses differ)\n", mismatches, replayed);
    return 3;
  }
  std::printf("resume: exact (%d of %d losses bit-identical)\n", replayed, replayed);
  return 0;
}

}  // namespace

int RunDemo(const DemoOptions& options) {
  if (!options.verbose) spdlog::set_level(spdlog::level::warn);
  const std::string db = StripSlash(options.db);
  const std::string files_dir = db + "-files";
  const int last_ckpt = LastCheckpointStep(options.steps, options.every);
  if (last_ckpt == 0) {
    return ReportError(
        Status::InvalidArgument("--steps " + std::to_string(options.steps) + " with --every " +
                                std::to_string(options.every) +
                                " leaves no checkpoint to resume from; use --steps > --every"));
  }
  if (Status s = PrepareStoreDir(db); !s.ok()) return ReportError(s);
  if (Status s = PrepareFilesDir(files_dir); !s.ok()) return ReportError(s);

  torch::set_num_threads(1);  // bit-exact reductions
  const double t_start = NowSeconds();
  torch::manual_seed(kTaskSeed);
  const torch::Tensor task_w =
      torch::randn({options.dim, options.dim}) / std::sqrt(double(options.dim));

  Trainer run(options, kInitSeed, task_w);
  PrintHeader(options, run, last_ckpt, db, files_dir);
  const RunTotals totals = TrainAndCheckpoint(options, run, last_ckpt, db, files_dir);
  PrintTotals(totals, options.steps);
  if (!options.keep_files) {
    std::error_code ec;
    fs::remove_all(files_dir, ec);
  }
  const int rc = ResumeAndCompare(options, task_w, db, last_ckpt, totals.losses, t_start);
  if (rc != 0) return rc;
  std::printf("inspect the store with: ckptkv ls --db %s ; ckptkv verify --db %s\n", db.c_str(),
              db.c_str());
  return 0;
}

}  // namespace ckptkv::tools
