#include "engine/async_saver.h"

#include <ATen/Context.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <ATen/Functions.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>

#include "engine/torch_call.h"
#include "store/names.h"

namespace ckptkv {

namespace {

uint64_t DefaultBufferBytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES);
  const long page = ::sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return 1ull << 30;
  return static_cast<uint64_t>(pages) * static_cast<uint64_t>(page) / 4;
}

uint64_t TensorBytes(const at::Tensor& t) {
  return static_cast<uint64_t>(t.numel()) * t.element_size();
}

}  // namespace

AsyncSaver::AsyncSaver(Store& store, AsyncSaveOptions options)
    : store_(store), limit_(options.buffer_bytes ? options.buffer_bytes : DefaultBufferBytes()) {
  worker_ = std::thread([this] { Run(); });
}

AsyncSaver::~AsyncSaver() {
  {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return queue_.empty() && !running_job_; });
    stop_ = true;
  }
  cv_.notify_all();
  worker_.join();
}

at::Tensor AsyncSaver::Acquire(uint64_t bytes, bool pinned, std::unique_lock<std::mutex>& lock) {
  for (;;) {
    auto it = free_.find(bytes);
    while (it != free_.end() && it->first == bytes && it->second.is_pinned() != pinned) ++it;
    if (it != free_.end() && it->first == bytes) {
      at::Tensor b = std::move(it->second);
      free_.erase(it);
      return b;
    }
    if (held_ + bytes <= limit_) break;
    if (!free_.empty()) {
      // Buffers of other sizes make room (a changed shape, another file).
      auto victim = std::prev(free_.end());
      held_ -= victim->first;
      free_.erase(victim);
      continue;
    }
    // Every buffer is in use by a queued write: it releases them when done.
    cv_.wait(lock);
  }
  held_ += bytes;
  auto options = at::TensorOptions().dtype(at::kByte);
  if (pinned) options = options.pinned_memory(true);
  return at::empty({static_cast<int64_t>(bytes)}, options);
}

void AsyncSaver::Release(std::vector<at::Tensor> buffers) {
  for (auto& b : buffers) {
    if (b.defined()) free_.emplace(TensorBytes(b), std::move(b));
  }
}

Result<SnapshotReport> AsyncSaver::Submit(const std::string& tag, const std::string& file,
                                          EncodedState encoded,
                                          TensorPlacer::Placements placements) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::string where = FileName(tag, file);
  SnapshotReport report;
  for (const auto& st : encoded.tensors) report.bytes += TensorBytes(st.tensor);

  if (report.bytes > limit_) {
    // Larger than the pool: written here, after what is queued (the calls
    // for one pending tag must not race).
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return queue_.empty() && !running_job_; });
      tags_[tag].queued++;
      running_job_ = true;
      running_tag_ = tag;
    }
    Result<SaveReport> r = SaveEncodedFile(store_, tag, file, std::move(encoded), placements);
    {
      std::lock_guard<std::mutex> lock(mu_);
      Finished(tag, r);
    }
    cv_.notify_all();
    RETURN_IF_ERROR(r.status());
    report.synchronous = true;
    report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return report;
  }

  // Buffers first; the job is queued with views of them, and the copies
  // follow one tensor at a time: the writer stores tensor i as soon as its
  // copy is done, so hashing and writing overlap the snapshot.
  Job job;
  job.tag = tag;
  job.file = file;
  job.progress = std::make_shared<Progress>();
  std::vector<at::Tensor> sources, targets;
  Status made = TorchCall(TorchErrorKind::kDevice, where, [&] {
    std::vector<at::Tensor> buffers;
    {
      std::unique_lock<std::mutex> lock(mu_);
      for (const auto& st : encoded.tensors) {
        const uint64_t n = TensorBytes(st.tensor);
        const bool pinned = st.tensor.is_cuda() && at::hasCUDA();
        buffers.push_back(n ? Acquire(n, pinned, lock) : at::Tensor());
      }
    }
    job.buffers = buffers;
    for (size_t i = 0; i < encoded.tensors.size(); ++i) {
      StateTensor& st = encoded.tensors[i];
      at::Tensor src = st.tensor.detach();
      at::Tensor snap = buffers[i].defined()
                            ? buffers[i].view(src.scalar_type()).view(src.sizes())
                            : at::empty(src.sizes(), at::TensorOptions().dtype(src.scalar_type()));
      // The copy goes through an alias without autograd: snap may require grad.
      targets.push_back(snap.detach());
      sources.push_back(src);
      if (st.tensor.requires_grad()) snap.set_requires_grad(true);
      auto pl = placements.find(st.tensor.unsafeGetTensorImpl());
      if (pl != placements.end()) job.placements.emplace(snap.unsafeGetTensorImpl(), pl->second);
      st.tensor = std::move(snap);
    }
    return Status::OK();
  });
  if (!made.ok()) {
    std::lock_guard<std::mutex> lock(mu_);
    Release(std::move(job.buffers));
    cv_.notify_all();
    return made;
  }
  job.encoded = std::move(encoded);
  std::shared_ptr<Progress> progress = job.progress;
  {
    std::lock_guard<std::mutex> lock(mu_);
    tags_[tag].queued++;
    queue_.push_back(std::move(job));
  }
  cv_.notify_all();
  Status copied = TorchCall(TorchErrorKind::kDevice, where, [&] {
    for (size_t i = 0; i < sources.size(); ++i) {
      const at::Tensor& src = sources[i];
      if (src.numel() > 0) {
        // copy_ materializes conjugate / negative views and any strides.
        const bool async_copy = src.is_cuda() && targets[i].is_pinned();
        targets[i].copy_(src, async_copy);
        if (async_copy) {
          // The copy must land before the writer reads it, and before Submit
          // returns: a training step may change the tensor right after.
          c10::impl::getDeviceGuardImpl(src.device().type())->getStream(src.device()).synchronize();
        }
      }
      progress->Advance(i + 1);
    }
    return Status::OK();
  });
  if (!copied.ok()) {
    progress->Fail(copied);  // the writer's wait ends with this error
    return copied;
  }
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

void AsyncSaver::Progress::Advance(size_t n) {
  {
    std::lock_guard<std::mutex> lock(mu);
    ready = n;
  }
  cv.notify_all();
}

void AsyncSaver::Progress::Fail(Status s) {
  {
    std::lock_guard<std::mutex> lock(mu);
    error = std::move(s);
    failed = true;
  }
  cv.notify_all();
}

Status AsyncSaver::Progress::WaitFor(size_t n) {
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return failed || ready >= n; });
  return failed ? error : Status::OK();
}

void AsyncSaver::Finished(const std::string& tag, const Result<SaveReport>& r) {
  TagState& ts = tags_[tag];
  ts.queued--;
  if (r.ok()) {
    ts.report.stats.Add(r->stats);
    ts.report.tensors += r->tensors;
  } else if (ts.error.ok()) {
    ts.error = r.status();
  }
  running_job_ = false;
}

void AsyncSaver::Run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [this] { return stop_ || (!queue_.empty() && !running_job_); });
    if (queue_.empty()) {
      if (stop_) return;
      continue;
    }
    Job job = std::move(queue_.front());
    queue_.pop_front();
    running_job_ = true;
    running_tag_ = job.tag;
    lock.unlock();
    const size_t n = job.encoded.tensors.size();
    Result<SaveReport> r =
        SaveEncodedFile(store_, job.tag, job.file, std::move(job.encoded), job.placements,
                        [&](size_t i) { return job.progress->WaitFor(i + 1); });
    // The tree is stored after the last tensor; a failed copy of a tensor
    // the save did not reach is still an error of the file.
    if (r.ok()) {
      Status all = job.progress->WaitFor(n);
      if (!all.ok()) r = all;
    }
    job.encoded.tensors.clear();  // the views of the buffers
    lock.lock();
    Finished(job.tag, r);
    Release(std::move(job.buffers));
    cv_.notify_all();
  }
}

Result<SaveReport> AsyncSaver::WaitForCommit(const std::string& tag) {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] {
    auto it = tags_.find(tag);
    return it == tags_.end() || it->second.queued == 0;
  });
  auto it = tags_.find(tag);
  if (it == tags_.end()) return SaveReport{};
  TagState ts = std::move(it->second);
  tags_.erase(it);
  lock.unlock();
  if (!ts.error.ok()) {
    store_.AbortTag(tag);
    return ts.error.WithContext("commit of tag " + Quote(tag) +
                                " abandoned: a background save failed");
  }
  return ts.report;
}

void AsyncSaver::Cancel(const std::string& tag) {
  std::unique_lock<std::mutex> lock(mu_);
  std::vector<Job> dropped;
  for (auto it = queue_.begin(); it != queue_.end();) {
    if (it->tag == tag) {
      dropped.push_back(std::move(*it));
      it = queue_.erase(it);
    } else {
      ++it;
    }
  }
  // Their buffers return to the pool once no Submit copies into them.
  lock.unlock();
  for (Job& j : dropped) (void)j.progress->WaitFor(j.encoded.tensors.size());
  lock.lock();
  for (Job& j : dropped) {
    j.encoded.tensors.clear();
    Release(std::move(j.buffers));
  }
  cv_.wait(lock, [&] { return !(running_job_ && running_tag_ == tag); });
  tags_.erase(tag);
  cv_.notify_all();
}

}  // namespace ckptkv
