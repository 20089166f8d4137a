// ParallelFor over XLA's intra-op thread pool, shared by the CPU kernels.
#ifndef T5LIKE_KERNELS_PARALLEL_FOR_H_
#define T5LIKE_KERNELS_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace t5like {

// Runs body(chunk) for chunk in [0, chunks) on the caller and helpers from the pool. Helpers that
// start late find no chunk left and touch nothing, so the caller never waits on a busy pool.
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t chunks,
                        const std::function<void(int64_t)>& body) {
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    const std::function<void(int64_t)>* body;
    int64_t chunks;
  };
  auto job = std::make_shared<Job>();
  job->body = &body;
  job->chunks = chunks;
  auto work = [](Job* j) {
    for (int64_t c; (c = j->next.fetch_add(1, std::memory_order_relaxed)) < j->chunks;) {
      (*j->body)(c);
      j->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job, work] { work(job.get()); });
  work(job.get());
  while (job->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

}  // namespace t5like

#endif  // T5LIKE_KERNELS_PARALLEL_FOR_H_
