#include "engine/kv_checkpoint_engine.h"

#include <ATen/Context.h>
#include <ATen/Functions.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <filesystem>
#include <unordered_map>

#include "engine/async_saver.h"
#include "engine/state_codec.h"
#include "engine/torch_call.h"
#include "store/names.h"

namespace ckptkv {

namespace fs = std::filesystem;

namespace {

std::string Normal(const std::string& p) {
  std::string s = fs::path(p).lexically_normal().string();
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  return s;
}

bool StartsWith(const std::string& s, const std::string& prefix) {
  return s.size() > prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

Result<WriteStats> SaveTensor(Store& store, const std::string& tag, const std::string& file,
                              const std::string& param, const at::Tensor& tensor,
                              const Placement* placement) {
  const std::string where = TensorName(tag, file, param);
  ASSIGN_OR_RETURN(fb::DType dtype, ToDType(tensor.scalar_type(), where));
  TensorMeta meta;
  meta.dtype = dtype;
  meta.shape = tensor.sizes().vec();
  meta.requires_grad = tensor.requires_grad();
  if (placement != nullptr) meta.placement = *placement;
  at::Tensor t = tensor.detach();
  if (t.is_conj()) t = t.resolve_conj();
  if (t.is_neg()) t = t.resolve_neg();
  // A view saves only its own elements: contiguous views point into their
  // storage; others are copied once.
  if (!t.is_contiguous()) t = t.contiguous();
  ByteSource src;
  src.length = static_cast<uint64_t>(t.numel()) * t.element_size();
  if (t.device().is_cpu()) {
    src.data = static_cast<const uint8_t*>(t.data_ptr());
  } else {
    // Device tensors are copied to the host one chunk at a time.
    at::Tensor flat = t.reshape({-1});
    const int64_t es = t.element_size();
    const auto options = at::TensorOptions().dtype(t.scalar_type()).device(at::kCPU);
    src.fill = [flat, es, options, where](uint64_t off, uint64_t len, uint8_t* dst) {
      return TorchCall(TorchErrorKind::kDevice, where, [&] {
        at::Tensor host = at::from_blob(dst, {static_cast<int64_t>(len) / es}, options);
        host.copy_(flat.narrow(0, static_cast<int64_t>(off) / es, static_cast<int64_t>(len) / es));
        return Status::OK();
      });
    };
  }
  return store.PutTensor(tag, file, param, meta, src);
}

// A loaded host tensor on the device map_location (or its saved device) names.
Result<at::Tensor> PlaceLoaded(at::Tensor t, const std::string& where,
                               const std::string& saved_device, const MapLocation& map_location) {
  c10::Device target = at::kCPU;
  if (map_location) {
    target = *map_location;
  } else {
    std::optional<c10::Device> saved = ParseDevice(saved_device);
    if (!saved) {
      return Status::Corruption(where + ": saved device '" + saved_device + "' is not a device");
    }
    target = *saved;
  }
  if (target.is_cuda() && !at::hasCUDA()) {
    return Status::InvalidArgument(where + ": tensor was saved from " + saved_device +
                                   " but CUDA is not available; load with map_location=cpu");
  }
  if (!target.is_cpu()) {
    const bool grad = t.requires_grad();
    t = t.detach().to(target);
    if (grad) t.set_requires_grad(true);
  }
  return t;
}

}  // namespace

Result<SaveReport> SaveEncodedFile(Store& store, const std::string& tag, const std::string& file,
                                   EncodedState encoded, const TensorPlacer::Placements& placements,
                                   const std::function<Status(size_t)>& before_tensor) {
  const std::string where = FileName(tag, file);
  RETURN_IF_ERROR(store.ClearFile(tag, file));
  SaveReport report;
  for (size_t i = 0; i < encoded.tensors.size(); ++i) {
    const StateTensor& st = encoded.tensors[i];
    if (before_tensor) RETURN_IF_ERROR(before_tensor(i));
    WriteStats stats;
    auto pl = placements.find(st.tensor.unsafeGetTensorImpl());
    const Placement* placement = pl == placements.end() ? nullptr : &pl->second;
    RETURN_IF_ERROR(TorchCall(TorchErrorKind::kUserValue, where, [&] {
      ASSIGN_OR_RETURN(stats, SaveTensor(store, tag, file, st.param, st.tensor, placement));
      return Status::OK();
    }));
    report.stats.Add(stats);
    report.tensors++;
  }
  RETURN_IF_ERROR(store.PutFile(tag, file, std::move(encoded.tree)));
  return report;
}

KvCheckpointEngine::KvCheckpointEngine(KvEngineConfig config)
    : CheckpointEngine("KvCheckpointEngine"), config_(std::move(config)) {}

KvCheckpointEngine::~KvCheckpointEngine() {
  if (saver_) {
    for (const auto& [tag, dir] : save_dirs_) saver_->Cancel(tag);
    saver_.reset();
  }
  if (store_) {
    for (const auto& [tag, dir] : save_dirs_) {
      spdlog::warn("[ckptkv] tag {} was created but never committed; its blocks await gc", tag);
      store_->AbortTag(tag);
      if (config_.placer) config_.placer->EndTag(tag);
    }
  }
}

Store& KvCheckpointEngine::EnsureStore(const std::string& dir_hint) {
  if (store_) return *store_;
  std::string dir = config_.db.empty() ? dir_hint : config_.db;
  if (dir.empty()) {
    ThrowIfError(Status::FailedPrecondition(
        "no store to use: call makedirs(save_dir) / create(save_dir, tag) / open(load_dir), "
        "or set KvEngineConfig::db"));
  }
  StoreOptions options = config_.store;
  if (!options.node.enabled && config_.node_from_env) {
    NodeOptions env = ValueOrThrow(NodeOptionsFromEnv());
    if (env.enabled) {
      options.node.enabled = true;
      options.node.rank = env.rank;
      options.node.world_size = env.world_size;
      options.node.commit_timeout_s = env.commit_timeout_s;
    }
  }
  store_ = ValueOrThrow(Store::Open(dir, options));
  return *store_;
}

KvCheckpointEngine::Target KvCheckpointEngine::ResolvePath(const std::string& path,
                                                           bool for_load) const {
  const std::string p = Normal(path);
  auto try_prefix = [&](const std::string& dir, const std::string& tag, Target* out) {
    std::string prefix = (dir.empty() ? "" : Normal(dir) + "/") + tag + "/";
    if (!StartsWith(p, prefix)) return false;
    *out = Target{tag, p.substr(prefix.size())};
    return true;
  };
  Target t;
  if (!for_load) {
    for (const auto& [tag, dir] : save_dirs_) {
      if (try_prefix(dir, tag, &t)) return t;
    }
  } else if (!last_dir_.empty()) {
    for (const auto& tag : open_tags_) {
      if (try_prefix(last_dir_, tag, &t)) return t;
    }
  }
  fs::path fp(p);
  t.file = fp.filename().string();
  t.tag = fp.parent_path().filename().string();
  if (t.tag.empty() || t.file.empty()) {
    ThrowIfError(Status::InvalidArgument("path '" + path +
                                         "' does not name a file of a tag; expected "
                                         "<save_dir>/<tag>/<file>"));
  }
  return t;
}

void KvCheckpointEngine::makedirs(const std::string& path, bool exist_ok) {
  if (path.empty()) ThrowIfError(Status::InvalidArgument("makedirs: path is empty"));
  if (save_dirs_.empty()) {
    // DeepSpeed's first call names the save_dir.
    last_dir_ = Normal(path);
    EnsureStore(last_dir_);
    return;
  }
  // Later calls name "<save_dir>/<tag>": directories are virtual here.
  fs::path fp(Normal(path));
  std::string tag = fp.filename().string();
  if (!exist_ok && store_ && !save_dirs_.count(tag) && store_->GetTag(tag).ok()) {
    ThrowIfError(Status::AlreadyExists("makedirs: '" + path + "' exists (tag " + Quote(tag) +
                                       " is committed)"));
  }
}

void KvCheckpointEngine::create(const std::string& tag) {
  std::string dir = last_dir_;
  if (dir.empty() && !config_.db.empty()) dir = config_.db;
  create(dir, tag);
}

void KvCheckpointEngine::create(const std::string& save_dir, const std::string& tag) {
  Store& store = EnsureStore(save_dir);
  if (!save_dir.empty()) last_dir_ = Normal(save_dir);
  BeginOptions options;
  options.overwrite = config_.overwrite;
  // Through a node writer, the writer places the committed tag: it alone
  // sees every rank's files.
  options.place_after_commit = config_.placer != nullptr;
  ThrowIfError(store.BeginTag(tag, options));
  save_dirs_[tag] = last_dir_;
  spdlog::debug("[ckptkv] create {}", tag);
}

void KvCheckpointEngine::save(const c10::IValue& state_dict, const std::string& path) {
  if (!store_) {
    ThrowIfError(Status::FailedPrecondition("save of '" + path +
                                            "' before create; call create(save_dir, tag) first"));
  }
  Target target = ResolvePath(path, /*for_load=*/false);
  if (!store_->IsPending(target.tag)) {
    ThrowIfError(Status::FailedPrecondition("save of '" + path + "' into tag " + Quote(target.tag) +
                                            " without create; call create(" + Quote(target.tag) +
                                            ") first"));
  }
  ThrowIfError(ValidateFile(target.file));
  const std::string where = FileName(target.tag, target.file);
  EncodedState encoded = ValueOrThrow(EncodeState(state_dict, where));
  TensorPlacer::Placements placements;
  if (config_.placer && !store_->through_node_writer()) {
    placements = config_.placer->Place(target.tag, target.file, state_dict);
  }
  const auto t0 = std::chrono::steady_clock::now();
  if (config_.async_save) {
    if (!saver_) {
      AsyncSaveOptions o;
      o.buffer_bytes = config_.async_buffer_bytes;
      saver_ = std::make_unique<AsyncSaver>(*store_, o);
    }
    SnapshotReport snap = ValueOrThrow(
        saver_->Submit(target.tag, target.file, std::move(encoded), std::move(placements)));
    last_blocked_s_ = snap.seconds;
    last_background_ = !snap.synchronous;
    spdlog::debug("[ckptkv] snapshot of {}: {} bytes in {:.3f} s{}", where, snap.bytes,
                  snap.seconds, snap.synchronous ? " (written synchronously)" : "");
    return;
  }
  SaveReport report = ValueOrThrow(
      SaveEncodedFile(*store_, target.tag, target.file, std::move(encoded), placements));
  last_blocked_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  last_background_ = false;
  last_save_ = report;
  spdlog::debug("[ckptkv] saved {}: {} tensors, {} bytes, {} new", where, report.tensors,
                report.stats.logical_bytes, report.stats.new_bytes);
}

bool KvCheckpointEngine::commit(const std::string& tag) {
  CommitInfo info;
  info.tag = tag;
  return commit(info);
}

bool KvCheckpointEngine::commit(const CommitInfo& info) {
  if (!store_) {
    ThrowIfError(Status::FailedPrecondition("commit of tag " + Quote(info.tag) +
                                            " without create; call create(" + Quote(info.tag) +
                                            ") first"));
  }
  if (saver_) {
    Result<SaveReport> written = saver_->WaitForCommit(info.tag);
    if (!written.ok()) {  // the saver aborted the tag
      save_dirs_.erase(info.tag);
      if (config_.placer) config_.placer->EndTag(info.tag);
      ThrowIfError(written.status());
    }
    last_save_ = *written;
  }
  CommitOptions options;
  options.overwrite = config_.overwrite;
  options.set_latest = info.save_latest;
  last_commit_ = ValueOrThrow(store_->CommitTag(info.tag, options));
  save_dirs_.erase(info.tag);
  if (config_.placer && !store_->through_node_writer()) {
    Status placed = config_.placer->AfterCommit(*store_, info.tag);
    if (!placed.ok()) {
      spdlog::warn("[ckptkv] {}: committed; placing it after the commit failed: {}", info.tag,
                   placed.ToString());
    }
    config_.placer->EndTag(info.tag);
  }
  spdlog::info("[ckptkv] Checkpoint {} is ready now! ({} files, {} tensors, {} bytes, {} new)",
               info.tag, last_commit_.files.size(), last_commit_.tensors,
               last_commit_.logical_bytes, last_commit_.new_bytes);
  return true;
}

std::optional<std::string> KvCheckpointEngine::open(const std::string& load_dir,
                                                    const std::optional<std::string>& tag) {
  Store& store = EnsureStore(load_dir);
  if (!load_dir.empty()) last_dir_ = Normal(load_dir);
  std::string chosen;
  if (!tag || tag->empty() || *tag == "latest") {
    auto latest = ValueOrThrow(store.Latest());
    if (latest) {
      chosen = *latest;
    } else {
      auto tags = ValueOrThrow(store.ListTags());
      if (tags.empty()) return std::nullopt;
      chosen = tags.back().tag;
    }
  } else {
    chosen = *tag;
  }
  ThrowIfError(store.GetTag(chosen).status());
  open_tags_.insert(chosen);
  return chosen;
}

c10::IValue KvCheckpointEngine::load(const std::string& path, MapLocation map_location) {
  if (!store_) {
    fs::path fp(Normal(path));
    EnsureStore(fp.parent_path().parent_path().string());
  }
  Target target = ResolvePath(path, /*for_load=*/true);
  ThrowIfError(ValidateTag(target.tag));
  ThrowIfError(ValidateFile(target.file));
  const std::string where = FileName(target.tag, target.file);
  std::string tree_bytes = ValueOrThrow(store_->GetFileTree(target.tag, target.file));
  // Every tensor's bytes in one batch of block reads, then the tree.
  const std::vector<std::string> params = ValueOrThrow(StoredTensorPaths(tree_bytes, where));
  const std::vector<at::Tensor> host =
      ValueOrThrow(TorchCall(TorchErrorKind::kUserValue, where, [&] {
        return ReadStoredTensors(*store_, target.tag, target.file, params);
      }));
  std::unordered_map<std::string, const at::Tensor*> by_param;
  for (size_t i = 0; i < params.size(); ++i) by_param.emplace(params[i], &host[i]);
  TensorLoader loader = [&](const std::string& param,
                            const std::string& device) -> Result<at::Tensor> {
    const std::string name = TensorName(target.tag, target.file, param);
    auto it = by_param.find(param);
    if (it == by_param.end()) return Status::Corruption(name + ": tensor node without a record");
    return TorchCall(TorchErrorKind::kUserValue, name,
                     [&] { return PlaceLoaded(*it->second, name, device, map_location); });
  };
  return ValueOrThrow(DecodeState(std::string_view(tree_bytes), loader, where));
}

void KvCheckpointEngine::close(const std::string& tag) { open_tags_.erase(tag); }

}  // namespace ckptkv
