// clone-blk-bench: a vhost-user-blk benchmark driver. It is a front-end and a guest driver in
// one process, with no VM: it connects to any vhost-user-blk back-end (clone-block,
// qemu-storage-daemon, ...), shares a memfd as guest memory, sets up split virtqueues with
// kick/call eventfds and issues virtio-blk requests at a fixed queue depth, one thread per
// queue, each waiting on its queue's call eventfd.
//
//   clone-blk-bench --socket S [--rw randread|randwrite|read|write] [--bs 4096] [--iodepth 1]
//                   [--queues 1] [--seconds 5] [--warmup 0] [--size BYTES] [--fill] [--verify]
//
// It prints one line of key=value pairs (iops, mibps, lat_mean_us, lat_p50_us, lat_p99_us, ...)
// and exits 0, or prints an error and exits 1. Every completion is checked: the head must be a
// request in flight, the used length must be what the request wrote (data + status for a read,
// status for a write), the status byte must be VIRTIO_BLK_S_OK, and reads are checked against
// the pattern the driver writes (clone_blk_bench_pattern.h): the stamps of the first and last
// sector of each read by default, every byte with --check-all or --verify, nothing with
// --no-data-check (a disk the driver did not fill). A back-end that completes nothing, completes twice, or returns
// wrong data cannot produce a number.
//
// --fill writes the pattern over the whole region first (not timed); --fill-only does only that
// (tests/bench/blk_backends.sh prepares its images with it). --verify fills, runs the
// workload checking every byte it reads, then reads the whole region back and checks it.
//
// The hot path allocates nothing: buffers, descriptors and the latency histogram are set up
// before the clock starts; descriptor addresses never change, a submission writes the request
// header, the data direction flag, the status byte and one avail entry.

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <exception>
#include <iostream>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/error.h"
#include "common/unique_fd.h"
#include "ipc/vhost-user/frontend.h"
#include "ipc/vhost-user/message.h"
#include "ipc/vhost-user/virtqueue.h"
#include "tests/bench/clone_blk_bench_pattern.h"

namespace clonevm::bench {
namespace {

using namespace clonevm::ipc::vhost;

// VIRTIO 1.2 5.2: feature bits, request types, status values, config layout.
constexpr unsigned kBlkFeatureSizeMax = 1;
constexpr unsigned kBlkFeatureSegMax = 2;
constexpr unsigned kBlkFeatureReadOnly = 5;
constexpr unsigned kBlkFeatureBlkSize = 6;
constexpr unsigned kBlkFeatureFlush = 9;
constexpr unsigned kBlkFeatureMq = 12;
constexpr uint32_t kBlkTypeIn = 0;
constexpr uint32_t kBlkTypeOut = 1;
constexpr uint8_t kBlkStatusOk = 0;
constexpr uint8_t kStatusUnset = 0xff;

struct BlkRequestHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};

struct BlkConfigPrefix {  // virtio_blk_config up to blk_size
  uint64_t capacity;
  uint32_t sizeMax;
  uint32_t segMax;
  uint16_t cylinders;
  uint8_t heads;
  uint8_t sectors;
  uint32_t blkSize;
};
static_assert(sizeof(BlkConfigPrefix) == 24);

enum class DataCheck { kNone, kEdges, kFull };

struct Options {
  std::string socketPath;
  std::string rw = "randread";
  uint64_t blockSize = 4096;
  uint32_t iodepth = 1;
  uint32_t queues = 1;
  double seconds = 5;
  double warmup = 0;
  uint64_t regionBytes = 0;  // 0: the whole disk
  uint32_t queueSize = 0;    // 0: the smallest power of two >= 128 that fits the depth
  uint64_t seed = 0x5eed;
  bool fill = false;
  bool fillOnly = false;
  bool verify = false;
  bool noDataCheck = false;
  bool checkAll = false;
  bool noEventIdx = false;
  bool verbose = false;
  std::string label;
};

uint64_t nowNs() {
  timespec ts;
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

// User + system CPU time of this process, all threads.
double processCpuSeconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  auto seconds = [](const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

// Latency histogram, log-linear: exact below 128 ns, then 64 buckets per power of two (error
// under 1.6%). Fixed size, so recording never allocates.
class LatencyHistogram {
 public:
  static constexpr unsigned kLinear = 128;
  static constexpr unsigned kSubBuckets = 64;
  static constexpr unsigned kBuckets = kLinear + (64 - 7) * kSubBuckets;

  void record(uint64_t ns) {
    ++counts_[index(ns)];
    ++count_;
    sum_ += ns;
  }
  void merge(const LatencyHistogram& other) {
    for (unsigned i = 0; i < kBuckets; ++i) counts_[i] += other.counts_[i];
    count_ += other.count_;
    sum_ += other.sum_;
  }
  uint64_t count() const { return count_; }
  double meanNs() const { return count_ ? static_cast<double>(sum_) / static_cast<double>(count_) : 0; }
  // The midpoint of the bucket holding the q-quantile.
  double quantileNs(double q) const {
    if (count_ == 0) return 0;
    uint64_t rank = static_cast<uint64_t>(std::ceil(q * static_cast<double>(count_)));
    rank = std::clamp<uint64_t>(rank, 1, count_);
    uint64_t seen = 0;
    for (unsigned i = 0; i < kBuckets; ++i) {
      seen += counts_[i];
      if (seen >= rank) return midpoint(i);
    }
    return midpoint(kBuckets - 1);
  }

 private:
  static unsigned index(uint64_t ns) {
    if (ns < kLinear) return static_cast<unsigned>(ns);
    unsigned msb = 63 - static_cast<unsigned>(std::countl_zero(ns));  // >= 7
    unsigned shift = msb - 6;
    return kLinear + (msb - 7) * kSubBuckets + static_cast<unsigned>((ns >> shift) - kSubBuckets);
  }
  static double midpoint(unsigned i) {
    if (i < kLinear) return i;
    unsigned octave = (i - kLinear) / kSubBuckets;
    unsigned sub = (i - kLinear) % kSubBuckets;
    unsigned shift = octave + 1;
    double low = static_cast<double>((uint64_t{kSubBuckets} + sub) << shift);
    return low + static_cast<double>(uint64_t{1} << shift) / 2;
  }

  std::vector<uint64_t> counts_ = std::vector<uint64_t>(kBuckets);
  uint64_t count_ = 0;
  uint64_t sum_ = 0;
};

// The guest memory: one memfd, guest physical addresses are offsets into it.
class GuestMemory {
 public:
  explicit GuestMemory(uint64_t size) : size_(size) {
    fd_ = UniqueFd(CLONE_SYSCALL(::memfd_create("clone-blk-bench", MFD_CLOEXEC), "memfd_create"));
    CLONE_SYSCALL(::ftruncate(fd_.get(), static_cast<off_t>(size)), "size the guest memory memfd");
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_.get(), 0);
    if (p == MAP_FAILED) throwSystemError(errno, "map the guest memory memfd");
    base_ = static_cast<uint8_t*>(p);
  }
  ~GuestMemory() { ::munmap(base_, size_); }
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;

  uint64_t allocate(uint64_t bytes, uint64_t alignment) {
    next_ = (next_ + alignment - 1) & ~(alignment - 1);
    require(next_ + bytes <= size_, "guest memory layout overflows {} bytes", size_);
    uint64_t address = next_;
    next_ += bytes;
    return address;
  }
  uint8_t* host(uint64_t guestAddress) { return base_ + guestAddress; }
  MemoryRegionSpec spec() const {
    return {0, size_, reinterpret_cast<uint64_t>(base_), 0, fd_.get()};
  }

 private:
  UniqueFd fd_;
  uint64_t size_;
  uint8_t* base_ = nullptr;
  uint64_t next_ = 0;
};

// What one phase asks of every queue.
struct Phase {
  const char* name;
  bool write;
  bool random;
  bool singlePass;  // sequential, each queue covers its slice once, no deadline
  DataCheck check;
  bool fullWrite;   // writes carry the whole pattern, not only the stamps
  uint64_t measureFromNs = 0;
  uint64_t deadlineNs = 0;
};

struct QueueStats {
  LatencyHistogram latency;
  uint64_t bytes = 0;
  uint64_t kicks = 0;
  uint64_t interrupts = 0;
  uint64_t completions = 0;  // warm-up and drain included
};

// Layout of one queue, computed once for the memory size.
struct QueueGeometry {
  uint32_t queueSize;
  uint32_t depth;
  uint32_t dataSegments;  // data descriptors per request
  uint64_t segmentBytes;  // bytes per data descriptor (the last may be shorter)
  uint64_t blockSize;
  uint32_t descriptorsPerRequest() const { return dataSegments + 2; }
  uint64_t bufferStride() const { return (blockSize + 4095) & ~uint64_t{4095}; }
  uint64_t bytes() const {
    return 3 * 4096 + descriptorTableBytes(queueSize) + availRingBytes(queueSize) +
           usedRingBytes(queueSize) + 64ull * depth + bufferStride() * depth + 8192;
  }
};

// One virtqueue driven as a guest driver would: fixed request slots, each with its own
// header, data buffer, status byte and descriptor chain.
class QueueDriver {
 public:
  QueueDriver(GuestMemory& memory, uint32_t index, const QueueGeometry& geometry, bool eventIdx,
              uint64_t seed, int socketFd)
      : memory_(memory), index_(index), g_(geometry), eventIdx_(eventIdx), seed_(seed),
        socketFd_(socketFd) {
    descGuest_ = memory.allocate(descriptorTableBytes(g_.queueSize), 4096);
    availGuest_ = memory.allocate(availRingBytes(g_.queueSize), 4096);
    usedGuest_ = memory.allocate(usedRingBytes(g_.queueSize), 4096);
    desc_ = reinterpret_cast<VringDescriptor*>(memory.host(descGuest_));
    avail_ = reinterpret_cast<uint16_t*>(memory.host(availGuest_));
    used_ = memory.host(usedGuest_);
    uint64_t headers = memory.allocate(64ull * g_.depth, 64);
    uint64_t buffers = memory.allocate(g_.bufferStride() * g_.depth, 4096);
    slots_.resize(g_.depth);
    for (uint32_t s = 0; s < g_.depth; ++s) {
      Slot& slot = slots_[s];
      uint64_t headerGuest = headers + 64ull * s;
      uint64_t statusGuest = headerGuest + 32;
      uint64_t dataGuest = buffers + g_.bufferStride() * s;
      slot.header = reinterpret_cast<BlkRequestHeader*>(memory.host(headerGuest));
      slot.status = memory.host(statusGuest);
      slot.data = memory.host(dataGuest);
      slot.head = static_cast<uint16_t>(s * g_.descriptorsPerRequest());
      uint16_t d = slot.head;
      desc_[d] = {headerGuest, sizeof(BlkRequestHeader), kDescFlagNext, static_cast<uint16_t>(d + 1)};
      uint64_t left = g_.blockSize;
      for (uint32_t k = 0; k < g_.dataSegments; ++k) {
        uint64_t length = std::min(left, g_.segmentBytes);
        ++d;
        desc_[d] = {dataGuest + k * g_.segmentBytes, static_cast<uint32_t>(length), kDescFlagNext,
                    static_cast<uint16_t>(d + 1)};
        left -= length;
      }
      ++d;
      desc_[d] = {statusGuest, 1, kDescFlagWrite, 0};
    }
    kick_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd (kick)"));
    call_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd (call)"));
  }

  VringAddresses addresses() const {
    return {reinterpret_cast<uint64_t>(memory_.host(descGuest_)),
            reinterpret_cast<uint64_t>(memory_.host(availGuest_)),
            reinterpret_cast<uint64_t>(memory_.host(usedGuest_)), 0, 0};
  }
  int kickFd() const { return kick_.get(); }
  int callFd() const { return call_.get(); }

  // Runs `phase` over the byte range [start, end) of the disk; throws on any bad completion.
  void run(const Phase& phase, uint64_t start, uint64_t end, QueueStats& stats) {
    phase_ = &phase;
    stats_ = &stats;
    start_ = start;
    blocks_ = (end - start) / g_.blockSize;
    require(blocks_ > 0, "queue {}: its region is smaller than one block", index_);
    nextSequential_ = 0;
    rng_ = seed_ ^ (0x9e3779b97f4a7c15ull * (index_ + 1)) ^ nowNs();
    if (rng_ == 0) rng_ = 1;
    for (uint32_t s = 0; s < g_.depth; ++s) {
      if (!submit(slots_[s])) break;
    }
    publishAndKick();
    uint64_t lastProgress = nowNs();
    while (inFlight_ > 0) {
      unsigned completed = reap();
      if (completed > 0) {
        publishAndKick();
        lastProgress = nowNs();
        continue;
      }
      if (eventIdx_) {
        // Ask for a call at the next used entry, then look again before sleeping.
        std::atomic_ref<uint16_t>(avail_[2 + g_.queueSize]).store(lastUsed_, std::memory_order_relaxed);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        if (usedIndex() != lastUsed_) continue;
      }
      waitForCall();
      require(nowNs() - lastProgress < 10'000'000'000ull,
              "queue {}: {} requests in flight and no completion for 10 s (avail {}, used {})",
              index_, inFlight_, availShadow_, usedIndex());
    }
  }

 private:
  struct Slot {
    BlkRequestHeader* header = nullptr;
    uint8_t* status = nullptr;
    uint8_t* data = nullptr;
    uint16_t head = 0;
    bool inFlight = false;
    bool write = false;
    uint64_t offset = 0;
    uint64_t submittedNs = 0;
  };

  uint64_t nextRandom() {
    rng_ ^= rng_ >> 12;
    rng_ ^= rng_ << 25;
    rng_ ^= rng_ >> 27;
    return rng_ * 0x2545f4914f6cdd1dull;
  }

  // Fills in and queues the next request in `slot`; false when the phase submits no more.
  bool submit(Slot& slot) {
    const Phase& p = *phase_;
    uint64_t block;
    if (p.singlePass) {
      if (nextSequential_ >= blocks_) return false;
      block = nextSequential_++;
    } else {
      if (nowNs() >= p.deadlineNs) return false;
      if (p.random) {
        block = nextRandom() % blocks_;
      } else {
        block = nextSequential_++ % blocks_;
      }
    }
    slot.offset = start_ + block * g_.blockSize;
    slot.write = p.write;
    uint64_t sector = slot.offset / kSectorBytes;
    uint64_t sectors = g_.blockSize / kSectorBytes;
    auto* words = reinterpret_cast<uint64_t*>(slot.data);
    if (p.write) {
      for (uint64_t i = 0; i < sectors; ++i) {
        if (p.fullWrite) {
          writeFullSector(words + i * kWordsPerSector, sector + i, seed_);
        } else {
          writeStamp(words + i * kWordsPerSector, sector + i, seed_);
        }
      }
    } else if (p.check != DataCheck::kNone) {
      // Poison what will be checked, so a back-end that does not copy fails the check.
      words[0] = ~words[0];
      words[(sectors - 1) * kWordsPerSector] = 0;
      if (p.check == DataCheck::kFull) std::memset(slot.data, 0xa5, g_.blockSize);
    }
    *slot.header = {p.write ? kBlkTypeOut : kBlkTypeIn, 0, sector};
    uint16_t flags = p.write ? kDescFlagNext : static_cast<uint16_t>(kDescFlagNext | kDescFlagWrite);
    for (uint32_t k = 1; k <= g_.dataSegments; ++k) desc_[slot.head + k].flags = flags;
    *slot.status = kStatusUnset;
    slot.inFlight = true;
    ++inFlight_;
    slot.submittedNs = nowNs();
    avail_[2 + availShadow_ % g_.queueSize] = slot.head;
    ++availShadow_;
    return true;
  }

  void publishAndKick() {
    if (availShadow_ == availPublished_) return;
    uint16_t old = availPublished_;
    std::atomic_ref<uint16_t>(avail_[1]).store(availShadow_, std::memory_order_release);
    availPublished_ = availShadow_;
    std::atomic_thread_fence(std::memory_order_seq_cst);
    bool kick;
    if (eventIdx_) {
      uint16_t event = std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(
                           used_ + 4 + 8ull * g_.queueSize)).load(std::memory_order_relaxed);
      kick = static_cast<uint16_t>(availShadow_ - event - 1) < static_cast<uint16_t>(availShadow_ - old);
    } else {
      uint16_t flags = std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(used_))
                           .load(std::memory_order_relaxed);
      kick = (flags & kUsedFlagNoNotify) == 0;
    }
    if (kick) {
      uint64_t one = 1;
      CLONE_SYSCALL(::write(kick_.get(), &one, sizeof(one)), "kick eventfd write");
      ++stats_->kicks;
    }
  }

  uint16_t usedIndex() {
    return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(used_ + 2))
        .load(std::memory_order_acquire);
  }

  // Handles every new used entry, resubmitting into the freed slots; returns how many.
  unsigned reap() {
    uint16_t usedIdx = usedIndex();
    auto fresh = static_cast<uint16_t>(usedIdx - lastUsed_);
    if (fresh == 0) return 0;
    require(fresh <= inFlight_, "queue {}: the back-end moved the used index by {} with {} in flight",
            index_, fresh, inFlight_);
    for (uint16_t i = 0; i < fresh; ++i) {
      const uint8_t* element = used_ + 4 + 8ull * ((lastUsed_ + i) % g_.queueSize);
      uint32_t id, length;
      std::memcpy(&id, element, 4);
      std::memcpy(&length, element + 4, 4);
      complete(id, length);
    }
    lastUsed_ = usedIdx;
    return fresh;
  }

  void complete(uint32_t id, uint32_t length) {
    uint64_t done = nowNs();
    uint32_t per = g_.descriptorsPerRequest();
    require(id % per == 0 && id / per < g_.depth && slots_[id / per].inFlight,
            "queue {}: the back-end completed head {}, which is not a request in flight", index_, id);
    Slot& slot = slots_[id / per];
    slot.inFlight = false;
    --inFlight_;
    const Phase& p = *phase_;
    uint8_t status = *slot.status;
    require(status == kBlkStatusOk, "queue {}: {} of {} bytes at offset {} failed with status {}",
            index_, slot.write ? "write" : "read", g_.blockSize, slot.offset, status);
    uint32_t expected = slot.write ? 1 : static_cast<uint32_t>(g_.blockSize + 1);
    require(length == expected,
            "queue {}: {} at offset {}: used length {}, expected {} (data written + status byte)",
            index_, slot.write ? "write" : "read", slot.offset, length, expected);
    if (!slot.write) checkData(slot, p.check);
    ++stats_->completions;
    if (done >= p.measureFromNs && (p.singlePass || done <= p.deadlineNs)) {
      stats_->latency.record(done - slot.submittedNs);
      stats_->bytes += g_.blockSize;
    }
    submit(slot);
  }

  void checkData(const Slot& slot, DataCheck check) {
    if (check == DataCheck::kNone) return;
    auto* words = reinterpret_cast<const uint64_t*>(slot.data);
    uint64_t sector = slot.offset / kSectorBytes;
    uint64_t sectors = g_.blockSize / kSectorBytes;
    for (uint64_t i = 0; i < sectors; ++i) {
      if (check == DataCheck::kEdges && i != 0 && i != sectors - 1) continue;
      const uint64_t* s = words + i * kWordsPerSector;
      bool ok = check == DataCheck::kFull ? fullSectorMatches(s, sector + i, seed_)
                                          : stampMatches(s, sector + i, seed_);
      require(ok,
              "queue {}: read at offset {}: sector {} does not hold the pattern (word0 {:#x} "
              "word1 {:#x}); was the disk filled by this driver (--fill) with seed {:#x}?",
              index_, slot.offset, sector + i, s[0], s[1], seed_);
    }
  }

  void waitForCall() {
    pollfd fds[2] = {{call_.get(), POLLIN, 0}, {socketFd_, POLLRDHUP, 0}};
    int n = ::poll(fds, 2, 100);
    if (n < 0 && errno == EINTR) return;
    CLONE_SYSCALL(n, "poll the call eventfd");
    if (fds[1].revents & (POLLRDHUP | POLLHUP | POLLERR)) {
      throw Error(fmt::format("queue {}: the back-end closed its socket with {} requests in flight",
                              index_, inFlight_));
    }
    if (fds[0].revents & POLLIN) {
      uint64_t count = 0;
      if (::read(call_.get(), &count, sizeof(count)) == sizeof(count)) stats_->interrupts += count;
    }
  }

  GuestMemory& memory_;
  uint32_t index_;
  QueueGeometry g_;
  bool eventIdx_;
  uint64_t seed_;
  int socketFd_;
  uint64_t descGuest_ = 0, availGuest_ = 0, usedGuest_ = 0;
  VringDescriptor* desc_ = nullptr;
  uint16_t* avail_ = nullptr;  // flags, idx, ring[size], used_event
  uint8_t* used_ = nullptr;    // flags, idx, {id, len}[size], avail_event
  std::vector<Slot> slots_;
  UniqueFd kick_, call_;
  uint16_t availShadow_ = 0, availPublished_ = 0, lastUsed_ = 0;
  uint32_t inFlight_ = 0;
  const Phase* phase_ = nullptr;
  QueueStats* stats_ = nullptr;
  uint64_t start_ = 0, blocks_ = 0, nextSequential_ = 0, rng_ = 1;
};

struct Device {
  uint64_t capacityBytes = 0;
  uint64_t features = 0;
  uint64_t protocols = 0;
  uint32_t sizeMax = 0;
  uint32_t segMax = 0;
  uint32_t blkSize = 512;
  uint64_t queuesOffered = 1;
};

int run(const Options& o) {
  bool write = o.rw == "randwrite" || o.rw == "write";
  bool random = o.rw == "randread" || o.rw == "randwrite";
  require(o.blockSize % kSectorBytes == 0 && o.blockSize > 0, "--bs {} is not a multiple of 512",
          o.blockSize);
  require(o.iodepth >= 1 && o.queues >= 1, "--iodepth and --queues must be at least 1");

  Frontend frontend = Frontend::connect(o.socketPath, FrontendOptions{std::chrono::seconds(10)});
  Device dev;
  uint64_t offered = frontend.getFeatures();
  require(hasBit(offered, feature::kVersion1), "the back-end does not offer VIRTIO_F_VERSION_1");
  if (hasBit(offered, feature::kProtocolFeatures)) {
    uint64_t offeredProtocols = frontend.getProtocolFeatures();
    dev.protocols = offeredProtocols & (bit(protocol::kMq) | bit(protocol::kReplyAck) |
                                        bit(protocol::kConfig) | bit(protocol::kStatus));
    frontend.setProtocolFeatures(dev.protocols);
  }
  frontend.setOwner();
  if (hasBit(dev.protocols, protocol::kMq)) dev.queuesOffered = frontend.getQueueNum();
  require(o.queues <= dev.queuesOffered, "--queues {}: the back-end has {} queue(s)", o.queues,
          dev.queuesOffered);
  require(hasBit(dev.protocols, protocol::kConfig),
          "the back-end does not offer the CONFIG protocol feature; the driver needs the capacity");
  BlkConfigPrefix config{};
  auto raw = frontend.getConfig(0, sizeof(config));
  require(raw.size() == sizeof(config), "GET_CONFIG returned {} bytes", raw.size());
  std::memcpy(&config, raw.data(), sizeof(config));
  dev.capacityBytes = config.capacity * kSectorBytes;

  uint64_t wanted = bit(feature::kVersion1) | bit(feature::kProtocolFeatures) |
                    bit(kBlkFeatureSizeMax) | bit(kBlkFeatureSegMax) | bit(kBlkFeatureBlkSize) |
                    bit(kBlkFeatureReadOnly) | bit(kBlkFeatureFlush);
  if (!o.noEventIdx) wanted |= bit(feature::kRingEventIdx);
  if (o.queues > 1) wanted |= bit(kBlkFeatureMq);
  dev.features = offered & wanted;
  bool eventIdx = hasBit(dev.features, feature::kRingEventIdx);
  if (hasBit(dev.features, kBlkFeatureSizeMax)) dev.sizeMax = config.sizeMax;
  if (hasBit(dev.features, kBlkFeatureSegMax)) dev.segMax = config.segMax;
  if (hasBit(dev.features, kBlkFeatureBlkSize)) dev.blkSize = config.blkSize;
  require((!write && !o.fill && !o.verify) || !hasBit(dev.features, kBlkFeatureReadOnly),
          "the back-end's disk is read-only");
  require(dev.blkSize >= kSectorBytes && o.blockSize % dev.blkSize == 0,
          "--bs {} is not a multiple of the device's block size {}", o.blockSize, dev.blkSize);
  frontend.setFeatures(dev.features);

  QueueGeometry geometry{};
  geometry.depth = o.iodepth;
  geometry.blockSize = o.blockSize;
  geometry.segmentBytes = o.blockSize;
  if (dev.sizeMax != 0 && dev.sizeMax < o.blockSize) {
    geometry.segmentBytes = dev.sizeMax & ~uint64_t{kSectorBytes - 1};
    require(geometry.segmentBytes > 0, "the device's size_max {} is under one sector", dev.sizeMax);
  }
  geometry.dataSegments =
      static_cast<uint32_t>((o.blockSize + geometry.segmentBytes - 1) / geometry.segmentBytes);
  require(dev.segMax == 0 || geometry.dataSegments <= dev.segMax,
          "--bs {} needs {} segments, the device takes {}", o.blockSize, geometry.dataSegments,
          dev.segMax);
  uint32_t descriptors = geometry.descriptorsPerRequest() * o.iodepth;
  geometry.queueSize = o.queueSize ? o.queueSize : std::bit_ceil(std::max<uint32_t>(128, descriptors));
  require(std::has_single_bit(geometry.queueSize) && geometry.queueSize <= 32768,
          "queue size {} is not a power of two up to 32768", geometry.queueSize);
  require(descriptors <= geometry.queueSize,
          "--iodepth {} needs {} descriptors, more than the queue size {}", o.iodepth, descriptors,
          geometry.queueSize);

  uint64_t region = o.regionBytes ? std::min(o.regionBytes, dev.capacityBytes) : dev.capacityBytes;
  region -= region % o.blockSize;
  require(region >= o.blockSize * o.queues, "the disk ({} bytes) is too small for --bs {}",
          dev.capacityBytes, o.blockSize);

  GuestMemory memory(geometry.bytes() * o.queues);
  std::vector<std::unique_ptr<QueueDriver>> queues;
  for (uint32_t q = 0; q < o.queues; ++q) {
    queues.push_back(std::make_unique<QueueDriver>(memory, q, geometry, eventIdx, o.seed,
                                                   frontend.socketFd()));
  }
  auto spec = memory.spec();
  frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
  for (uint32_t q = 0; q < o.queues; ++q) {
    frontend.setVringNum(q, geometry.queueSize);
    frontend.setVringBase(q, 0);
    frontend.setVringAddr(q, queues[q]->addresses());
    frontend.setVringCall(q, queues[q]->callFd());
    frontend.setVringKick(q, queues[q]->kickFd());
    if (hasBit(dev.features, feature::kProtocolFeatures)) frontend.setVringEnable(q, true);
  }
  if (hasBit(dev.protocols, protocol::kStatus)) frontend.setStatus(0x0f);  // ... | DRIVER_OK
  if (o.verbose) {
    fmt::print(stderr,
               "clone-blk-bench: features offered {:#x} acked {:#x}, protocols {:#x}, queues "
               "offered {}, capacity {} bytes, size_max {}, seg_max {}, blk_size {}, queue size "
               "{}, {} data descriptor(s) per request, event idx {}\n",
               offered, dev.features, dev.protocols, dev.queuesOffered, dev.capacityBytes,
               dev.sizeMax, dev.segMax, dev.blkSize, geometry.queueSize, geometry.dataSegments,
               eventIdx ? "on" : "off");
  }

  // Runs a phase on every queue, one thread each; sequential phases give each queue a slice.
  auto runPhase = [&](const Phase& phase, bool sliced) {
    std::vector<QueueStats> stats(o.queues);
    std::vector<std::thread> threads;
    std::mutex errorLock;
    std::string firstError;
    uint64_t slice = (region / o.queues) / o.blockSize * o.blockSize;
    for (uint32_t q = 0; q < o.queues; ++q) {
      uint64_t start = sliced ? slice * q : 0;
      uint64_t end = sliced ? start + slice : region;
      threads.emplace_back([&, q, start, end] {
        try {
          queues[q]->run(phase, start, end, stats[q]);
        } catch (const std::exception& e) {
          std::lock_guard lock(errorLock);
          if (firstError.empty()) firstError = e.what();
        }
      });
    }
    for (auto& t : threads) t.join();
    require(firstError.empty(), "{} phase: {}", phase.name, firstError);
    QueueStats total;
    for (auto& s : stats) {
      total.latency.merge(s.latency);
      total.bytes += s.bytes;
      total.kicks += s.kicks;
      total.interrupts += s.interrupts;
      total.completions += s.completions;
    }
    return total;
  };

  bool fullCheck = o.verify;
  if (o.fill || o.fillOnly || o.verify) {
    Phase fill{"fill", true, false, true, DataCheck::kNone, true};
    uint64_t t0 = nowNs();
    QueueStats filled = runPhase(fill, true);
    double took = static_cast<double>(nowNs() - t0) / 1e9;
    if (o.fillOnly) {
      for (uint32_t q = 0; q < o.queues; ++q) frontend.getVringBase(q);
      fmt::print("clone-blk-bench:{}{} fill bytes={} bs={} iodepth={} queues={} seconds={:.2f} "
                 "mibps={:.1f}\n",
                 o.label.empty() ? "" : " label=", o.label, filled.bytes, o.blockSize, o.iodepth,
                 o.queues, took, static_cast<double>(filled.bytes) / took / (1024.0 * 1024.0));
      return 0;
    }
    if (o.verbose) {
      fmt::print(stderr, "clone-blk-bench: filled {} bytes in {:.2f} s\n", region, took);
    }
  }
  DataCheck check = o.noDataCheck              ? DataCheck::kNone
                    : fullCheck || o.checkAll ? DataCheck::kFull
                                              : DataCheck::kEdges;
  Phase main{"workload", write, random, false, check, fullCheck};
  uint64_t start = nowNs();
  main.measureFromNs = start + static_cast<uint64_t>(o.warmup * 1e9);
  main.deadlineNs = main.measureFromNs + static_cast<uint64_t>(o.seconds * 1e9);
  double cpuBefore = processCpuSeconds();
  QueueStats stats = runPhase(main, !random);
  double driverCpuUsPerIo = (processCpuSeconds() - cpuBefore) * 1e6 /
                            static_cast<double>(std::max<uint64_t>(stats.completions, 1));
  double window = o.seconds;
  if (o.verify) {
    Phase readBack{"read-back", false, false, true, DataCheck::kFull, true};
    runPhase(readBack, true);
  }
  for (uint32_t q = 0; q < o.queues; ++q) frontend.getVringBase(q);  // stops the rings

  uint64_t ios = stats.latency.count();
  require(ios > 0, "no request completed in the measured {} s", o.seconds);
  double iops = static_cast<double>(ios) / window;
  double mibps = static_cast<double>(stats.bytes) / window / (1024.0 * 1024.0);
  fmt::print(
      "clone-blk-bench:{}{} rw={} bs={} iodepth={} queues={} seconds={:.2f} ios={} iops={:.0f} "
      "mibps={:.1f} lat_mean_us={:.1f} lat_p50_us={:.1f} lat_p99_us={:.1f} kicks={} "
      "interrupts={} event_idx={} driver_cpu_us_per_io={:.1f} verify={}\n",
      o.label.empty() ? "" : " label=", o.label, o.rw, o.blockSize, o.iodepth, o.queues, window, ios,
      iops, mibps, stats.latency.meanNs() / 1e3, stats.latency.quantileNs(0.5) / 1e3,
      stats.latency.quantileNs(0.99) / 1e3, stats.kicks, stats.interrupts, eventIdx ? 1 : 0,
      driverCpuUsPerIo, o.verify ? "ok" : "off");
  return 0;
}

}  // namespace
}  // namespace clonevm::bench

int main(int argc, char** argv) {
  clonevm::bench::Options o;
  CLI::App app{"clone-blk-bench: drive a vhost-user-blk back-end with no VM and measure it"};
  app.add_option("--socket", o.socketPath, "the back-end's unix socket")->required();
  app.add_option("--rw", o.rw, "workload")
      ->check(CLI::IsMember({"randread", "randwrite", "read", "write"}));
  app.add_option("--bs", o.blockSize, "request size (multiple of 512; K, M suffixes)")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--iodepth", o.iodepth, "requests in flight per queue")->check(CLI::Range(1, 4096));
  app.add_option("--queues", o.queues, "queues, one thread each")->check(CLI::Range(1, 64));
  app.add_option("--seconds", o.seconds, "measured duration")->check(CLI::Range(0.01, 3600.0));
  app.add_option("--warmup", o.warmup, "seconds run before measuring")->check(CLI::Range(0.0, 600.0));
  app.add_option("--size", o.regionBytes, "use only the first BYTES of the disk (default: all)")
      ->transform(CLI::AsSizeValue(false));
  app.add_option("--queue-size", o.queueSize, "virtqueue size (default: fits the depth, >= 128)");
  app.add_option("--seed", o.seed, "data pattern seed");
  app.add_flag("--fill", o.fill, "write the pattern over the region before the workload");
  app.add_flag("--fill-only", o.fillOnly, "write the pattern over the region and stop");
  app.add_flag("--verify", o.verify,
               "fill, check every byte read during the workload, then read the region back");
  app.add_flag("--check-all", o.checkAll,
               "check every byte read (default: the first and last sector of each read)");
  app.add_flag("--no-data-check", o.noDataCheck, "do not check read data (disk not filled by us)");
  app.add_flag("--no-event-idx", o.noEventIdx, "do not negotiate VIRTIO_RING_F_EVENT_IDX");
  app.add_option("--label", o.label, "a tag copied into the result line");
  app.add_flag("-v,--verbose", o.verbose, "print the negotiated setup on stderr");
  CLI11_PARSE(app, argc, argv);
  try {
    return clonevm::bench::run(o);
  } catch (const std::exception& e) {
    std::cerr << "clone-blk-bench: " << e.what() << "\n";
    return 1;
  }
}
