// A small pool of long-lived worker threads shared by the kernels.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tqpipe {

// A few long-lived workers for parallel_for: starting threads per call costs tens of microseconds,
// as much as a decode-sized product itself.
class WorkerPool {
 public:
  static WorkerPool& get() {
    static WorkerPool pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
    return pool;
  }
  size_t size() const { return threads_.size() + 1; }
  // Runs fn(0) .. fn(parts-1), part 0 on the calling thread; returns when all are done.
  void run(size_t parts, const std::function<void(size_t)>& fn) {
    std::unique_lock<std::mutex> call(call_mutex_);  // one job at a time (several mlx streams may call)
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      parts_ = parts;
      next_ = 1;
      pending_ = parts - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    for (;;) {  // help with the remaining parts, then wait for the workers' ones
      size_t i;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        if (next_ >= parts_) break;
        i = next_++;
      }
      fn(i);
      finish_one();
    }
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }
  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  explicit WorkerPool(size_t workers) {
    for (size_t i = 0; i < workers; ++i) threads_.emplace_back([this] { loop(); });
  }
  void finish_one() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (--pending_ == 0) done_.notify_one();
  }
  void loop() {
    size_t seen = 0;
    for (;;) {
      const std::function<void(size_t)>* job;
      size_t i;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_ != seen && job_ && next_ < parts_); });
        if (stop_) return;
        job = job_;
        i = next_++;
        if (next_ >= parts_) seen = generation_;
      }
      (*job)(i);
      finish_one();
    }
  }
  std::vector<std::thread> threads_;
  std::mutex call_mutex_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(size_t)>* job_ = nullptr;
  size_t parts_ = 0, next_ = 0, pending_ = 0, generation_ = 0;
  bool stop_ = false;
};

// Split [0, total) over the pool when the work (in weights touched) is large enough to pay for it.
// parts_per_thread > 1 cuts it finer, the parts claimed as threads come free: a thread the OS
// preempts (for a writer or reader thread of the same process) then delays only its current part,
// not half of the job.
template <class F>
inline void parallel_for(size_t total, size_t work, F&& fn, size_t parts_per_thread = 1) {
  auto& pool = WorkerPool::get();
  const size_t nt = std::min({pool.size(), total, std::max<size_t>(1, work >> 16)});
  if (nt <= 1) {
    fn(size_t(0), total);
    return;
  }
  const size_t parts = std::min({total, nt * std::max<size_t>(1, parts_per_thread), std::max<size_t>(1, work >> 16)});
  const size_t step = (total + parts - 1) / parts;
  pool.run(parts, [&](size_t t) {
    const size_t a = t * step, b = std::min(total, a + step);
    if (a < b) fn(a, b);
  });
}

}  // namespace tqpipe
