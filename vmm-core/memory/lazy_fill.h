#pragma once
// Fills a fork's guest memory lazily from a template's memory image (DESIGN §3, docs/FORK.md).
//
// The fork's memfd mapping is registered with userfaultfd in MISSING mode. A handler thread
// resolves each fault for a whole aligned chunk (64 KiB): UFFDIO_COPY from the image (mapped
// read-only, so every fork reads one page-cache copy) where the chunk holds data, and
// UFFDIO_ZEROPAGE where the image has a hole. KVM's own accesses (vCPU entry, kvmclock
// updates, get_user_pages) fault through the same mapping and are resolved the same way.
//
// The working set: chunks faulted during the first moments after start() can be recorded,
// and a recorded set prefetched in bulk before the vCPUs run.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "vmm-core/memory/guest_memory.h"

namespace clonevm::vmm {

class LazyMemoryFill {
 public:
  static constexpr uint64_t kChunkBytes = 64 * 1024;

  struct Stats {
    uint64_t faults = 0;         // fault messages handled
    uint64_t copiedChunks = 0;   // chunks filled with UFFDIO_COPY
    uint64_t zeroedChunks = 0;   // chunks filled with UFFDIO_ZEROPAGE
    uint64_t prefetchedChunks = 0;
  };

  // `imagePath` has memory.size() bytes; `dataExtents` (offset, length) are its data
  // extents, sorted (the rest reads as zero).
  LazyMemoryFill(const GuestMemory& memory, const std::string& imagePath,
                 std::vector<std::pair<uint64_t, uint64_t>> dataExtents, spdlog::logger& log);
  ~LazyMemoryFill();
  LazyMemoryFill(const LazyMemoryFill&) = delete;
  LazyMemoryFill& operator=(const LazyMemoryFill&) = delete;

  // Fills the chunks at these offsets now (before start(): no fault is waiting). Offsets are
  // validated; bad ones are skipped.
  void prefetch(const std::vector<uint64_t>& chunkOffsets);
  // Starts the fault-handling thread. With recordFor > 0, the chunks faulted in during that
  // time are kept for recordedChunks().
  void start(std::chrono::milliseconds recordFor = std::chrono::milliseconds(0));
  // Waits until the recording window has passed; returns the chunks faulted in it, sorted.
  std::vector<uint64_t> recordedChunks();
  Stats stats() const;

 private:
  void handleFaults();
  // Fills the chunk holding `offset` unless it is filled already. Handler thread or before start().
  void fillChunk(uint64_t chunkIndex, bool prefetching);
  bool chunkHasData(uint64_t start, uint64_t end) const;

  const GuestMemory& memory_;
  uint8_t* base_;
  uint64_t size_;
  std::string imagePath_;
  std::vector<std::pair<uint64_t, uint64_t>> extents_;
  spdlog::logger& log_;
  UniqueFd image_;
  const uint8_t* imageMapping_ = nullptr;
  UniqueFd uffd_;
  UniqueFd stopEvent_;
  std::vector<uint8_t> filled_;  // one per chunk; handler thread (or before start) only
  std::thread thread_;

  mutable std::mutex mutex_;
  Stats stats_;
  std::chrono::steady_clock::time_point recordUntil_{};
  std::vector<uint64_t> recorded_;
};

}  // namespace clonevm::vmm
