#include "store/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <memory>

namespace ckptkv {

size_t ThreadPool::WorkerCount(size_t threads) {
  if (threads != 0) return threads;
  return std::min<size_t>(4, std::max(1u, std::thread::hardware_concurrency()));
}

ThreadPool::ThreadPool(size_t threads) {
  const size_t n = WorkerCount(threads);
  for (size_t i = 0; i < n; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::WorkerLoop() {
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task();
  }
}

void ThreadPool::ParallelFor(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (n == 1 || workers_.empty()) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct Shared {
    std::atomic<size_t> next{0};
    std::mutex mu;
    std::condition_variable done_cv;
    size_t running = 0;
  };
  auto shared = std::make_shared<Shared>();
  auto drain = [shared, n, &fn] {
    for (size_t i = shared->next.fetch_add(1); i < n; i = shared->next.fetch_add(1)) fn(i);
  };
  size_t helpers = std::min(workers_.size(), n - 1);
  shared->running = helpers;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t h = 0; h < helpers; ++h) {
      queue_.emplace_back([shared, drain] {
        drain();
        std::lock_guard<std::mutex> l(shared->mu);
        if (--shared->running == 0) shared->done_cv.notify_all();
      });
    }
  }
  cv_.notify_all();
  drain();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->done_cv.wait(lock, [&] { return shared->running == 0; });
}

}  // namespace ckptkv
