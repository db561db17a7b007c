// The Store handle of ckptkv._ckptkv (ckptkv.store.Store wraps it). Store
// calls run without the GIL; the browser's caches (tags, verify and gc
// reports), the pending tags and the placer are guarded by mu_.
#ifndef CKPTKV_PYTHON_SRC_PY_STORE_H_
#define CKPTKV_PYTHON_SRC_PY_STORE_H_

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <spdlog/spdlog.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <ATen/Functions.h>

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "checkpoint/query/placer.h"
#include "engine/async_saver.h"
#include "engine/kv_checkpoint_engine.h"
#include "engine/state_codec.h"
#include "engine/torch_call.h"
#include "python/src/py_state.h"
#include "store/names.h"
#include "tools/json_text.h"
#include "tools/kv_browser/analysis.h"
#include "tools/kv_browser/browser_core.h"

namespace ckptkv::py {

inline pyb::dict TagInfoDict(const TagInfo& t) {
  pyb::dict d;
  d["tag"] = t.tag;
  d["committed_at_ms"] = t.committed_at_ms;
  d["sequence"] = t.sequence;
  d["files"] = t.files;
  d["tensors"] = t.tensors;
  d["logical_bytes"] = t.logical_bytes;
  d["new_bytes"] = t.new_bytes;
  d["new_blocks"] = t.new_blocks;
  d["stored_new_bytes"] = t.stored_new_bytes;
  d["parent_tag"] = t.parent_tag.empty() ? pyb::object(pyb::none()) : pyb::str(t.parent_tag);
  return d;
}

inline pyb::dict StatsDict(const WriteStats& s, uint64_t tensors) {
  pyb::dict d;
  d["tensors"] = tensors;
  d["logical_bytes"] = s.logical_bytes;
  d["chunks"] = s.chunks;
  d["new_blocks"] = s.new_blocks;
  d["new_bytes"] = s.new_bytes;
  d["stored_new_bytes"] = s.stored_new_bytes;
  return d;
}

class PyStore {
 public:
  // world_size above 0: one of the ranks writing the store through its
  // node writer (NodeOptions).
  PyStore(const std::string& path, bool create, bool read_only, uint32_t chunk_size,
          const std::string& codec, size_t threads, uint64_t async_buffer_bytes, int rank,
          int world_size, double commit_timeout)
      : async_buffer_bytes_(async_buffer_bytes) {
    StoreOptions o;
    if (world_size > 0 && !read_only) {
      o.node.enabled = true;
      o.node.rank = rank;
      o.node.world_size = world_size;
      o.node.commit_timeout_s = commit_timeout;
    }
    o.create_if_missing = create && !read_only;
    o.read_only = read_only;
    if (chunk_size != 0) o.chunk_size = chunk_size;
    o.codec = CodecNamed(codec);
    o.threads = threads;
    std::unique_ptr<Store> store;
    {
      pyb::gil_scoped_release nogil;
      store = ValueOrThrow(Store::Open(path, o));
    }
    browser_ = kvb::Browser::Adopt(
        std::move(store), read_only ? kvb::Browser::Mode::kReadOnly : kvb::Browser::Mode::kWrite);
  }

  // The open store, kept alive for the length of the caller's call even if
  // another thread closes the handle meanwhile. FailedPrecondition once
  // closed.
  std::shared_ptr<kvb::Browser> Hold() {
    std::lock_guard<std::mutex> l(mu_);
    if (!browser_) ThrowIfError(Status::FailedPrecondition("the store is closed"));
    return browser_;
  }

  // Forgets the cached tags and reports (after a query committed a tag
  // through the store).
  void Invalidate() {
    std::lock_guard<std::mutex> l(mu_);
    if (browser_) browser_->Invalidate();
  }

  void Close() {
    std::shared_ptr<kvb::Browser> last;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!browser_) return;
      if (saver_) {
        // Queued background writes end before their tags are aborted.
        pyb::gil_scoped_release nogil;
        for (const auto& tag : pending_) saver_->Cancel(tag);
        saver_.reset();
      }
      for (const auto& tag : pending_) browser_->store().AbortTag(tag);
      pending_.clear();
      last = std::move(browser_);
    }
    // The store closes here, or when the last call holding it ends.
    pyb::gil_scoped_release nogil;
    last.reset();
  }
  bool closed() {
    std::lock_guard<std::mutex> l(mu_);
    return browser_ == nullptr;
  }

  std::string Json(const std::function<Result<kvb::json>(kvb::Browser&)>& f) {
    auto held = Hold();
    pyb::gil_scoped_release nogil;
    std::lock_guard<std::mutex> l(mu_);
    kvb::json j = ValueOrThrow(f(*held));
    return tools::JsonText(j, -1);
  }

  static Codec CodecNamed(const std::string& name) {
    if (name.empty() || name == "raw") return Codec::kRaw;
    if (name == "zstd") return Codec::kZstd;
    if (name == "grouped-zstd") return Codec::kGroupedZstd;
    ThrowIfError(Status::InvalidArgument("compression '" + name +
                                         "' is not known; valid: None (raw), 'zstd', "
                                         "'grouped-zstd'"));
    return Codec::kRaw;
  }

  void Begin(const std::string& tag, bool overwrite, const std::optional<std::string>& codec) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    if (s.IsPending(tag)) {
      // The store would start it afresh, dropping the other writer's saves.
      ThrowIfError(Status::FailedPrecondition("tag " + Quote(tag) +
                                              " is already begun and not committed; commit or "
                                              "abort its writer first"));
    }
    BeginOptions bo;
    bo.overwrite = overwrite;
    if (codec) bo.codec = CodecNamed(*codec);
    // Through a node writer the writer places the tag after its commit.
    bo.place_after_commit = true;
    ThrowIfError(s.BeginTag(tag, bo));
    std::lock_guard<std::mutex> l(mu_);
    pending_.insert(tag);
  }

  pyb::dict Save(const std::string& tag, const std::string& file, pyb::handle value,
                 pyb::handle lower, bool place, bool background) {
    auto held = Hold();
    Store& s = held->store();
    ThrowIfError(ValidateFile(file));
    if (!s.IsPending(tag)) {
      ThrowIfError(Status::FailedPrecondition("save of " + FileName(tag, file) + ": tag " +
                                              Quote(tag) + " is not begun; call begin(" +
                                              Quote(tag) + ") first"));
    }
    const std::string where = FileName(tag, file);
    EncodedState enc = EncodePy(value, lower, where);
    SaveReport r;
    if (background) {
      SnapshotReport snap;
      {
        pyb::gil_scoped_release nogil;
        TensorPlacer::Placements placements;
        if (place && !s.through_node_writer()) placements = Place(tag, file, enc);
        std::shared_ptr<AsyncSaver> saver = Saver(s);
        snap = ValueOrThrow(saver->Submit(tag, file, std::move(enc), std::move(placements)));
      }
      pyb::dict d;
      d["background"] = !snap.synchronous;
      d["snapshot_bytes"] = snap.bytes;
      d["blocked_seconds"] = snap.seconds;
      return d;
    }
    {
      pyb::gil_scoped_release nogil;
      TensorPlacer::Placements placements;
      if (place && !s.through_node_writer()) placements = Place(tag, file, enc);
      r = ValueOrThrow(SaveEncodedFile(s, tag, file, std::move(enc), placements));
    }
    return StatsDict(r.stats, r.tensors);
  }

  pyb::dict Commit(const std::string& tag, bool set_latest, bool overwrite) {
    auto held = Hold();
    Store& s = held->store();
    TagInfo info;
    {
      pyb::gil_scoped_release nogil;
      if (std::shared_ptr<AsyncSaver> saver = CurrentSaver()) {
        Result<SaveReport> written = saver->WaitForCommit(tag);
        if (!written.ok()) {  // the saver aborted the tag
          std::lock_guard<std::mutex> l(mu_);
          EndTag(tag);
          ThrowIfError(written.status());
        }
      }
      CommitOptions o;
      o.set_latest = set_latest;
      o.overwrite = overwrite;
      info = ValueOrThrow(s.CommitTag(tag, o));
      std::shared_ptr<checkpoint::DeepSpeedPlacer> placer;
      {
        std::lock_guard<std::mutex> l(mu_);
        if (placed_.count(tag)) placer = placer_;
      }
      if (placer) {
        Status placed = placer->AfterCommit(s, tag);
        if (!placed.ok()) {
          spdlog::warn("[ckptkv] {}: committed; placing it after the commit failed: {}", tag,
                       placed.ToString());
        }
      }
      std::lock_guard<std::mutex> l(mu_);
      EndTag(tag);
    }
    return TagInfoDict(info);
  }

  void Abort(const std::string& tag) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    if (std::shared_ptr<AsyncSaver> saver = CurrentSaver()) saver->Cancel(tag);
    s.AbortTag(tag);
    std::lock_guard<std::mutex> l(mu_);
    EndTag(tag);
  }

  void Delete(const std::string& tag) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    ThrowIfError(s.DeleteTag(tag));
    std::lock_guard<std::mutex> l(mu_);
    held->Invalidate();
  }

  std::string Gc(bool dry_run) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    GcStats g = ValueOrThrow(s.Gc(dry_run));
    std::lock_guard<std::mutex> l(mu_);
    held->Invalidate();
    return tools::JsonText(kvb::GcJson(g, dry_run), -1);
  }

  std::string Verify(const std::optional<std::string>& tag) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    return tools::JsonText(ValueOrThrow(kvb::VerifyStore(s, tag, /*repair=*/false)), -1);
  }

  std::optional<std::string> Latest() {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    return ValueOrThrow(s.Latest());
  }

  pyb::dict Tag(const std::string& tag) {
    auto held = Hold();
    Store& s = held->store();
    TagInfo info;
    {
      pyb::gil_scoped_release nogil;
      info = ValueOrThrow(s.GetTag(tag));
    }
    return TagInfoDict(info);
  }

  std::vector<std::string> Files(const std::string& tag) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    return ValueOrThrow(s.ListFiles(tag));
  }

  std::vector<std::string> Params(const std::string& tag, const std::string& file) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    return ValueOrThrow(s.ListParams(tag, file));
  }

  pyb::object Load(const std::string& tag, const std::string& file, pyb::handle rebuild,
                   pyb::handle tensor_hook) {
    auto held = Hold();
    Store& s = held->store();
    return DecodePy(s, tag, file, DecodeHooks{rebuild, tensor_hook});
  }

  pyb::dict TensorInfo(const std::string& tag, const std::string& file, const std::string& param) {
    auto held = Hold();
    Store& s = held->store();
    TensorRecordRef rec;
    {
      pyb::gil_scoped_release nogil;
      rec = ValueOrThrow(s.GetTensorRecord(tag, file, param));
    }
    pyb::dict d;
    std::vector<int64_t> shape;
    if (rec->shape()) shape.assign(rec->shape()->begin(), rec->shape()->end());
    d["shape"] = shape;
    d["dtype"] = std::string(DTypeName(rec->dtype()));
    d["nbytes"] = rec->byte_length();
    d["itemsize"] = DTypeSize(rec->dtype());
    d["requires_grad"] = rec->requires_grad();
    d["chunk_size"] = rec->chunk_size();
    d["inline"] = rec->inline_data() != nullptr;
    d["placed"] = rec->placement() != nullptr;
    return d;
  }

  at::Tensor ReadTensor(const std::string& tag, const std::string& file, const std::string& param) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    return ValueOrThrow(ReadStoredTensor(s, tag, file, param));
  }

  // Elements [first, first + count) of the tensor's row-major elements, as
  // a 1-D tensor; only the chunks holding them are read.
  at::Tensor ReadElements(const std::string& tag, const std::string& file, const std::string& param,
                          uint64_t first, uint64_t count) {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    const std::string where = TensorName(tag, file, param);
    TensorRecordRef rec = ValueOrThrow(s.GetTensorRecord(tag, file, param));
    const uint64_t es = DTypeSize(rec->dtype());
    const uint64_t numel = es == 0 ? 0 : rec->byte_length() / es;
    if (first > numel || count > numel - first) {
      ThrowIfError(Status::InvalidArgument(
          where + ": elements [" + std::to_string(first) + ", " + std::to_string(first) + "+" +
          std::to_string(count) + ") are outside its " + std::to_string(numel) + " elements"));
    }
    at::Tensor t = ValueOrThrow(TorchCall(TorchErrorKind::kUserValue, where, [&] {
      return Result<at::Tensor>(at::empty({static_cast<int64_t>(count)},
                                          at::TensorOptions().dtype(ToScalarType(rec->dtype()))));
    }));
    if (count > 0) {
      ThrowIfError(s.ReadTensorRange(*rec.get(), first * es, count * es,
                                     static_cast<uint8_t*>(t.data_ptr()), where));
    }
    return t;
  }

  uint64_t BlockBytesRead() { return Hold()->store().BlockBytesRead(); }
  std::string Dir() { return Hold()->store().dir(); }
  bool ReadOnly() { return Hold()->store().read_only(); }
  uint64_t DiskBytes() {
    auto held = Hold();
    Store& s = held->store();
    pyb::gil_scoped_release nogil;
    return s.DiskBytes();
  }

 private:
  // The IValue view of the encoded value (objects as their payloads), with
  // the very tensors that are about to be stored, for the placer.
  TensorPlacer::Placements Place(const std::string& tag, const std::string& file,
                                 const EncodedState& enc) {
    std::unordered_map<std::string, at::Tensor> by_param;
    for (const auto& t : enc.tensors) by_param.emplace(t.param, t.tensor);
    TensorLoader loader = [&](const std::string& param, const std::string&) -> Result<at::Tensor> {
      auto it = by_param.find(param);
      if (it == by_param.end()) return Status::NotFound("param " + param);
      return it->second;
    };
    auto view = DecodeState(std::string_view(enc.tree), loader, FileName(tag, file));
    if (!view.ok()) return {};
    std::lock_guard<std::mutex> l(mu_);
    if (!placer_) placer_ = std::make_shared<checkpoint::DeepSpeedPlacer>();
    placed_.insert(tag);
    auto placer = placer_;
    return placer->Place(tag, file, *view);
  }

  // Under mu_.
  // The background writer (created by the first background save).
  // Shared: a call using it keeps it alive (and, holding the store too, its
  // queued writes can finish) if close() drops it meanwhile.
  std::shared_ptr<AsyncSaver> Saver(Store& s) {
    std::lock_guard<std::mutex> l(mu_);
    if (!saver_) {
      AsyncSaveOptions o;
      o.buffer_bytes = async_buffer_bytes_;
      saver_ = std::make_shared<AsyncSaver>(s, o);
    }
    return saver_;
  }
  std::shared_ptr<AsyncSaver> CurrentSaver() {
    std::lock_guard<std::mutex> l(mu_);
    return saver_;
  }

  void EndTag(const std::string& tag) {
    pending_.erase(tag);
    if (placer_ && placed_.erase(tag)) placer_->EndTag(tag);
    if (browser_) browser_->Invalidate();
  }

  std::mutex mu_;
  std::shared_ptr<kvb::Browser> browser_;
  std::set<std::string> pending_;
  uint64_t async_buffer_bytes_ = 0;
  // Writes of background saves; destroyed (after its queue) before the
  // store closes.
  std::shared_ptr<AsyncSaver> saver_;
  std::set<std::string> placed_;
  std::shared_ptr<checkpoint::DeepSpeedPlacer> placer_;
};

}  // namespace ckptkv::py

#endif  // CKPTKV_PYTHON_SRC_PY_STORE_H_
