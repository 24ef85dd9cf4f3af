#include "vmm-core/memory/lazy_fill.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>

#include "common/error.h"
#include "vmm-core/memory/userfaultfd.h"

namespace clonevm::vmm {
namespace {

constexpr uint64_t kPage = 4096;

}  // namespace

LazyMemoryFill::LazyMemoryFill(const GuestMemory& memory, const std::string& imagePath,
                               std::vector<std::pair<uint64_t, uint64_t>> dataExtents,
                               spdlog::logger& log)
    : memory_(memory),
      base_(memory.mappingForRegistration().data()),
      size_(memory.mappingForRegistration().size()),
      imagePath_(imagePath),
      extents_(std::move(dataExtents)),
      log_(log) {
  require(size_ % kChunkBytes == 0, "guest memory of {} bytes is not a multiple of {}", size_,
          kChunkBytes);
  image_ = UniqueFd(CLONE_SYSCALL(::open(imagePath.c_str(), O_RDONLY | O_CLOEXEC),
                                  "open template memory image", imagePath));
  void* mapping = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED | MAP_NORESERVE, image_.get(), 0);
  if (mapping == MAP_FAILED) throwSystemError(errno, "mmap template memory image", imagePath);
  imageMapping_ = static_cast<const uint8_t*>(mapping);

  uffd_ = openUserfaultfd();
  uffdio_api api{};
  api.api = UFFD_API;
  CLONE_SYSCALL(::ioctl(uffd_.get(), UFFDIO_API, &api), "UFFDIO_API");
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(base_);
  reg.range.len = size_;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  CLONE_SYSCALL(::ioctl(uffd_.get(), UFFDIO_REGISTER, &reg), "UFFDIO_REGISTER guest memory");
  require((reg.ioctls & (1ull << _UFFDIO_COPY)) && (reg.ioctls & (1ull << _UFFDIO_ZEROPAGE)),
          "userfaultfd: the kernel offers no UFFDIO_COPY/ZEROPAGE for guest memory");
  stopEvent_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC), "eventfd (fill thread stop)"));
  filled_.assign(size_ / kChunkBytes, 0);
}

LazyMemoryFill::~LazyMemoryFill() {
  auto s = stats();
  log_.info("memory fill: {} faults, {} chunks copied, {} zero-filled, {} prefetched", s.faults,
            s.copiedChunks, s.zeroedChunks, s.prefetchedChunks);
  if (thread_.joinable()) {
    uint64_t one = 1;
    (void)!::write(stopEvent_.get(), &one, sizeof(one));
    thread_.join();
  }
  if (imageMapping_ != nullptr) ::munmap(const_cast<uint8_t*>(imageMapping_), size_);
}

bool LazyMemoryFill::chunkHasData(uint64_t start, uint64_t end) const {
  // The first extent ending after `start`.
  auto it = std::upper_bound(extents_.begin(), extents_.end(), start,
                             [](uint64_t value, const auto& e) { return value < e.first + e.second; });
  return it != extents_.end() && it->first < end;
}

void LazyMemoryFill::fillChunk(uint64_t chunkIndex, bool prefetching) {
  if (filled_[chunkIndex]) return;
  uint64_t start = chunkIndex * kChunkBytes;
  uint64_t end = start + kChunkBytes;
  bool data = chunkHasData(start, end);
  if (prefetching && !data) return;  // zero chunks cost a fault later, not memory now
  // A page of the chunk may exist already (EEXIST): then fill the rest page by page.
  auto fill = [&](uint64_t from, uint64_t to, bool copy) -> int {
    while (true) {
      if (copy) {
        uffdio_copy copy{};
        copy.dst = reinterpret_cast<uint64_t>(base_ + from);
        copy.src = reinterpret_cast<uint64_t>(imageMapping_ + from);
        copy.len = to - from;
        if (::ioctl(uffd_.get(), UFFDIO_COPY, &copy) == 0) return 0;
      } else {
        uffdio_zeropage zero{};
        zero.range.start = reinterpret_cast<uint64_t>(base_ + from);
        zero.range.len = to - from;
        if (::ioctl(uffd_.get(), UFFDIO_ZEROPAGE, &zero) == 0) return 0;
      }
      if (errno != EAGAIN) return errno;
    }
  };
  auto fillRange = [&](uint64_t from, uint64_t to, bool copy) {
    int error = fill(from, to, copy);
    if (error == EEXIST) {
      for (uint64_t page = from; page < to; page += kPage) {
        int pageError = fill(page, page + kPage, copy);
        if (pageError != 0 && pageError != EEXIST) throwSystemError(pageError, "userfaultfd fill page");
      }
    } else if (error != 0) {
      throwSystemError(error, copy ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE", imagePath_);
    }
  };
  if (!data) {
    fillRange(start, end, false);
  } else {
    // Copy only the image's data; zero-fill its holes instead of reading them: a read fault
    // on a hole of a tmpfs file allocates a page in it (and changes its extent map).
    uint64_t at = start;
    auto it = std::upper_bound(extents_.begin(), extents_.end(), start,
                               [](uint64_t value, const auto& e) { return value < e.first + e.second; });
    for (; it != extents_.end() && it->first < end; ++it) {
      uint64_t dataStart = std::max(at, it->first);
      uint64_t dataEnd = std::min(end, it->first + it->second);
      if (dataStart > at) fillRange(at, dataStart, false);
      fillRange(dataStart, dataEnd, true);
      at = dataEnd;
    }
    if (at < end) fillRange(at, end, false);
  }
  filled_[chunkIndex] = 1;
  std::lock_guard lock(mutex_);
  (data ? stats_.copiedChunks : stats_.zeroedChunks)++;
  if (prefetching) stats_.prefetchedChunks++;
}

void LazyMemoryFill::prefetch(const std::vector<uint64_t>& chunkOffsets) {
  for (uint64_t offset : chunkOffsets) {
    if (offset % kChunkBytes != 0 || offset >= size_) continue;
    fillChunk(offset / kChunkBytes, true);
  }
}

void LazyMemoryFill::start(std::chrono::milliseconds recordFor) {
  if (recordFor.count() > 0) recordUntil_ = std::chrono::steady_clock::now() + recordFor;
  thread_ = std::thread([this] { handleFaults(); });
  pthread_setname_np(thread_.native_handle(), "uffd-fill");
}

void LazyMemoryFill::handleFaults() {
  pollfd fds[2] = {{uffd_.get(), POLLIN, 0}, {stopEvent_.get(), POLLIN, 0}};
  uffd_msg messages[32];
  try {
    while (true) {
      int ready = ::poll(fds, 2, -1);
      if (ready < 0 && errno == EINTR) continue;
      if (ready < 0) throwSystemError(errno, "poll userfaultfd");
      if (fds[1].revents) return;
      ssize_t n = ::read(uffd_.get(), messages, sizeof(messages));
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n < 0) throwSystemError(errno, "read userfaultfd");
      bool recording = recordUntil_ != std::chrono::steady_clock::time_point{} &&
                       std::chrono::steady_clock::now() < recordUntil_;
      for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
        if (messages[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t offset = messages[i].arg.pagefault.address - reinterpret_cast<uint64_t>(base_);
        if (offset >= size_) continue;
        uint64_t chunk = offset / kChunkBytes;
        bool fresh = !filled_[chunk];
        fillChunk(chunk, false);
        std::lock_guard lock(mutex_);
        stats_.faults++;
        if (recording && fresh) recorded_.push_back(chunk * kChunkBytes);
      }
    }
  } catch (const std::exception& e) {
    // A fork whose memory cannot be filled cannot run: its vCPUs would wait forever.
    log_.critical("guest memory fill failed: {}; ending the VM", e.what());
    std::_Exit(5);
  }
}

std::vector<uint64_t> LazyMemoryFill::recordedChunks() {
  auto now = std::chrono::steady_clock::now();
  if (recordUntil_ > now) std::this_thread::sleep_for(recordUntil_ - now);
  std::lock_guard lock(mutex_);
  std::vector<uint64_t> chunks = recorded_;
  std::sort(chunks.begin(), chunks.end());
  return chunks;
}

LazyMemoryFill::Stats LazyMemoryFill::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

}  // namespace clonevm::vmm
