// AsyncSaver: saves whose hashing and writing run in the background.
//
// Submit takes a snapshot of a file's tensors (a host copy into buffers of
// a pool kept across saves, so that later saves of the same shapes copy
// into memory already faulted in) and queues the file's write; the caller
// may change or free its tensors as soon as Submit returns. One worker
// thread writes the queued files in order (Store's calls for one pending
// tag never race with each other); it starts on a file while Submit is
// still copying it, storing each tensor once its copy is done. Wait(tag) blocks until the tag's
// files are written and returns the first error of them; the commit comes after it and stays the
// one atomic, durable step.
//
// The pool holds at most `buffer_bytes`. A Submit that needs more than is
// free waits for queued writes to release their buffers; a file larger than
// the whole pool is not snapshot: Submit waits for the queue and writes it
// itself (as a synchronous save would). GPU tensors are copied into pinned
// buffers when CUDA is available.
//
// Thread-safety: every method may be called from any thread.
#ifndef CKPTKV_ENGINE_ASYNC_SAVER_H_
#define CKPTKV_ENGINE_ASYNC_SAVER_H_

#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "engine/kv_checkpoint_engine.h"
#include "engine/state_codec.h"
#include "store/status.h"

namespace ckptkv {

struct AsyncSaveOptions {
  // Bytes of snapshot buffers the pool may hold; 0 = a quarter of the
  // machine's physical memory.
  uint64_t buffer_bytes = 0;
};

// What Submit did, for reports and benchmarks.
struct SnapshotReport {
  uint64_t bytes = 0;        // tensor bytes copied
  double seconds = 0;        // time the caller was blocked in Submit
  bool synchronous = false;  // the file did not fit the pool and was written in Submit
};

class AsyncSaver {
 public:
  explicit AsyncSaver(Store& store, AsyncSaveOptions options = {});
  // Waits for the queued writes (their errors are dropped: call Wait first).
  ~AsyncSaver();
  AsyncSaver(const AsyncSaver&) = delete;
  AsyncSaver& operator=(const AsyncSaver&) = delete;

  // Snapshots `encoded`'s tensors and queues the file (see above). An error
  // here is one of the snapshot (a device copy) or of a synchronous write;
  // queued write errors come from Wait.
  Result<SnapshotReport> Submit(const std::string& tag, const std::string& file,
                                EncodedState encoded, TensorPlacer::Placements placements);
  // Blocks until every submitted file of `tag` is written: what they cost.
  // On the first error of them the pending tag is aborted in the store (it
  // must never commit without a file) and the error, saying so, returned.
  Result<SaveReport> WaitForCommit(const std::string& tag);
  // Drops the queued files of `tag` not yet started, waits for one being
  // written, and forgets the tag's results (before an abort).
  void Cancel(const std::string& tag);

 private:
  // How far Submit's copies into a job's buffers have come.
  struct Progress {
    void Advance(size_t n);  // tensors [0, n) are copied
    void Fail(Status s);     // a copy failed: waiters get `s`
    Status WaitFor(size_t n);

    std::mutex mu;
    std::condition_variable cv;
    size_t ready = 0;
    bool failed = false;
    Status error;
  };
  struct Job {
    std::string tag, file;
    EncodedState encoded;  // its tensors are views of `buffers`
    TensorPlacer::Placements placements;
    std::vector<at::Tensor> buffers;  // returned to the pool when written
    std::shared_ptr<Progress> progress;
  };
  struct TagState {
    size_t queued = 0;  // submitted, not yet finished
    Status error;
    SaveReport report;
  };

  void Run();
  // A byte buffer of exactly `bytes` from the pool; waits for releases while
  // the pool is full. `lock` holds mu_.
  at::Tensor Acquire(uint64_t bytes, bool pinned, std::unique_lock<std::mutex>& lock);
  void Release(std::vector<at::Tensor> buffers);
  // A file of `tag` was written (or failed): counts it. mu_ held.
  void Finished(const std::string& tag, const Result<SaveReport>& r);

  Store& store_;
  uint64_t limit_ = 0;
  mutable std::mutex mu_;
  std::condition_variable cv_;  // jobs queued / finished, buffers released
  std::deque<Job> queue_;
  bool running_job_ = false;
  std::string running_tag_;
  bool stop_ = false;
  std::map<std::string, TagState> tags_;
  std::multimap<uint64_t, at::Tensor> free_;  // by size
  uint64_t held_ = 0;                         // bytes in use + free
  std::thread worker_;
};

}  // namespace ckptkv

#endif  // CKPTKV_ENGINE_ASYNC_SAVER_H_
