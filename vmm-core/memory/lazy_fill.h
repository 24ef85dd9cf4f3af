#pragma once
// Fills a fork's guest memory lazily from a template's memory image (DESIGN §3, docs/FORK.md).
//
// The fork's memfd mapping is registered with userfaultfd in MISSING mode. A handler thread
// resolves each fault for the one 4 KiB page that faulted: UFFDIO_COPY from the image where
// the page holds data, UFFDIO_ZEROPAGE where the image has a hole. Every page filled is a page
// the fork owns for good (memfd pages are never shared or merged), so filling more than was
// touched is memory lost per fork. KVM's own accesses (vCPU entry, kvmclock updates,
// get_user_pages) fault through the same mapping and are resolved the same way.
//
// The image is read with pread, not mapped: its page cache is shared by every fork and paid
// once by the host, and is then not counted in any fork's PSS.
//
// The working set: pages faulted during the first moments after start() can be recorded,
// and a recorded set prefetched in bulk (contiguous pages in one ioctl) before the vCPUs run.
//
// Device processes (vhost-user postcopy): a back-end that maps the same memfd registers its
// mapping with a userfaultfd of its own and hands it over (addDeviceFaults). Its faults are
// read here too: the page is filled through the core's mapping (the memfd page then exists
// for every mapping) and the back-end's thread is woken on its userfaultfd.

#include <atomic>
#include <chrono>
#include <memory>
#include <cstdint>
#include <mutex>
#include <optional>
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
  static constexpr uint64_t kPageBytes = 4096;

  struct Stats {
    uint64_t faults = 0;           // fault messages handled
    uint64_t copiedPages = 0;      // pages filled with UFFDIO_COPY (faults and prefetch)
    uint64_t zeroedPages = 0;      // pages filled with UFFDIO_ZEROPAGE (faults and prefetch)
    uint64_t prefetchedPages = 0;  // of those, filled by prefetch()
    uint64_t deviceFaults = 0;     // fault messages from device processes' userfaultfds
    uint64_t refaults = 0;         // faults on pages already filled (filled again: EEXIST)
  };

  // Where a device process mapped guest memory: [address, address + length) of its address
  // space holds the memfd's bytes from memoryOffset on.
  struct DeviceMapping {
    uint64_t address = 0;
    uint64_t length = 0;
    uint64_t memoryOffset = 0;
  };

  // `imagePath` has memory.size() bytes; `dataExtents` (offset, length) are its data
  // extents, sorted (the rest reads as zero).
  LazyMemoryFill(const GuestMemory& memory, const std::string& imagePath,
                 std::vector<std::pair<uint64_t, uint64_t>> dataExtents, spdlog::logger& log);
  ~LazyMemoryFill();
  LazyMemoryFill(const LazyMemoryFill&) = delete;
  LazyMemoryFill& operator=(const LazyMemoryFill&) = delete;

  // Fills the pages at these offsets now (before start(): no fault is waiting), runs of
  // contiguous pages with one ioctl each. Offsets need not be sorted; unaligned or out of
  // range ones are skipped.
  void prefetch(std::vector<uint64_t> pageOffsets);
  // Fills every page of the image's data extents that is not filled yet, now (before or
  // after start(): a run at a time under the fill lock), runs of up to 1 MiB with one
  // UFFDIO_COPY each. For a fork whose memory a device process also maps without postcopy:
  // that mapping is not registered with this userfaultfd, so a page the
  // device touched before the core filled it would be a zero page for good (the later
  // UFFDIO_COPY meets EEXIST). Holes need nothing: a page first touched by the device reads
  // zero, as the template's did. Returns the pages filled.
  uint64_t fillAllData();
  // After fillAllData(), with no device process's faults to resolve: unregisters guest
  // memory from the userfaultfd and stops the fill thread. What is left unfilled is holes,
  // and the kernel's own shmem fault zero-fills those without a round trip to a thread (a
  // round trip is a few context switches, dear under nested virtualisation: docs/FORK.md).
  // Faults from then on are not counted. Throws if a data page is unfilled or a device
  // source was added.
  void handHolesToTheKernel();
  // Resolves the faults of a device process's userfaultfd from now on (before or after
  // start()). `name` names the device in logs. Throws on a mapping outside guest memory.
  void addDeviceFaults(UniqueFd userfaultfd, std::vector<DeviceMapping> mappings,
                       std::string name);
  // Starts the fault-handling thread. With recordFaults, the pages it fills are kept until
  // endRecording().
  void start(bool recordFaults = false);
  // Ends the record start() began; returns the pages filled on a fault since, sorted.
  std::vector<uint64_t> endRecording();
  Stats stats() const;

 private:
  struct DeviceSource {
    UniqueFd userfaultfd;
    std::vector<DeviceMapping> mappings;
    std::string name;
    bool failed = false;
  };
  void handleFaults();
  // Ends the fault-handling thread, if it runs, and waits for it.
  void stopThread();
  // One page fault at guest-memory offset `offset`; returns whether it filled the page.
  bool resolve(uint64_t offset, bool recording);
  // Reads and resolves what is queued on one device's userfaultfd; returns what went wrong
  // with the device's fd (the core's own failures throw).
  std::optional<std::string> handleDeviceFaults(DeviceSource& device, bool recording);
  // How a run is filled, for the statistics: a fault's page, a prefetched run, or a page
  // filled again (a fault on a page already filled).
  enum class FillKind { kFault, kPrefetch, kRefill };
  // Fills pages [first, end) (page indices). `buffer` holds at least the run's bytes. Under
  // fillMutex_.
  void fillRun(uint64_t first, uint64_t end, uint8_t* buffer, FillKind kind);
  // Fills [from, to) (bytes) with one ioctl; on EEXIST (a page there exists already: a
  // racing fault) page by page.
  void fillRange(uint64_t from, uint64_t to, const uint8_t* source);
  // Wakes whoever waits on a fault in [offset, offset + length) (bytes).
  void wake(uint64_t offset, uint64_t length);
  // The first extent ending after `offset`.
  std::vector<std::pair<uint64_t, uint64_t>>::const_iterator extentAfter(uint64_t offset) const;

  const GuestMemory& memory_;
  uint8_t* base_;
  uint64_t size_;
  std::string imagePath_;
  std::vector<std::pair<uint64_t, uint64_t>> extents_;
  spdlog::logger& log_;
  UniqueFd image_;
  UniqueFd uffd_;
  UniqueFd stopEvent_;
  UniqueFd devicesChanged_;  // addDeviceFaults() makes the handler poll the new fd too
  std::mutex fillMutex_;     // filled_ and the fills: the handler thread and fillAllData()
  std::vector<bool> filled_;  // one bit per page
  std::thread thread_;
  std::vector<std::unique_ptr<DeviceSource>> devices_;  // appended under mutex_

  mutable std::mutex mutex_;
  Stats stats_;
  std::atomic<bool> recording_{false};
  std::vector<uint64_t> recorded_;
};

}  // namespace clonevm::vmm
