// ThreadPool: a fixed set of workers for hashing and encoding chunks.
//
// ParallelFor runs fn(i) for i in [0, n) on the workers and the calling
// thread and returns when all are done. Thread-safe; calls from several
// threads share the workers.
#ifndef CKPTKV_STORE_THREAD_POOL_H_
#define CKPTKV_STORE_THREAD_POOL_H_

#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ckptkv {

class ThreadPool {
 public:
  // The number of workers a pool of `threads` has: `threads`, or for 0
  // the default, min(4, hardware threads).
  static size_t WorkerCount(size_t threads);

  // threads == 0 picks WorkerCount(0).
  explicit ThreadPool(size_t threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  size_t size() const { return workers_.size(); }
  void ParallelFor(size_t n, const std::function<void(size_t)>& fn);

 private:
  void WorkerLoop();

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace ckptkv

#endif  // CKPTKV_STORE_THREAD_POOL_H_
