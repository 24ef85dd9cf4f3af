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
#include <cstring>
#include <optional>

#include "common/error.h"
#include "common/userfaultfd.h"

namespace clonevm::vmm {
namespace {

// Prefetch reads the image through a bounce buffer of this size at most per ioctl.
constexpr uint64_t kMaxRunBytes = 1 << 20;

// An anonymous mapping, unmapped when done, so a prefetch leaves no heap behind in the fork.
class BounceBuffer {
 public:
  explicit BounceBuffer(size_t size) : size_(size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throwSystemError(errno, "mmap prefetch buffer");
    data_ = static_cast<uint8_t*>(p);
  }
  ~BounceBuffer() { ::munmap(data_, size_); }
  BounceBuffer(const BounceBuffer&) = delete;
  BounceBuffer& operator=(const BounceBuffer&) = delete;
  uint8_t* data() { return data_; }

 private:
  uint8_t* data_;
  size_t size_;
};

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
  require(size_ % kPageBytes == 0, "guest memory of {} bytes is not a multiple of {}", size_,
          kPageBytes);
  for (const auto& [offset, length] : extents_) {
    require(offset % kPageBytes == 0 && length % kPageBytes == 0 && offset + length <= size_ &&
                offset + length > offset,
            "{}: data extent ({:#x}, {:#x}) is not page-aligned inside the image", imagePath,
            offset, length);
  }
  image_ = UniqueFd(CLONE_SYSCALL(::open(imagePath.c_str(), O_RDONLY | O_CLOEXEC),
                                  "open template memory image", imagePath));
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
  devicesChanged_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                                           "eventfd (fill thread device list)"));
  filled_.assign(size_ / kPageBytes, false);
}

LazyMemoryFill::~LazyMemoryFill() {
  auto s = stats();
  log_.info("memory fill: {} faults ({} from devices, {} on pages already filled), {} pages "
            "copied, {} zero-filled, {} of them prefetched",
            s.faults, s.deviceFaults, s.refaults, s.copiedPages, s.zeroedPages, s.prefetchedPages);
  stopThread();
}

void LazyMemoryFill::stopThread() {
  if (!thread_.joinable()) return;
  uint64_t one = 1;
  // An eventfd write fails only on overflow, which one write a thread's life cannot reach.
  (void)!::write(stopEvent_.get(), &one, sizeof(one));
  thread_.join();
}

std::vector<std::pair<uint64_t, uint64_t>>::const_iterator LazyMemoryFill::extentAfter(
    uint64_t offset) const {
  return std::upper_bound(extents_.begin(), extents_.end(), offset,
                          [](uint64_t value, const auto& e) { return value < e.first + e.second; });
}

void LazyMemoryFill::fillRange(uint64_t from, uint64_t to, const uint8_t* source) {
  // Returns 0 or an errno; a partial fill (EAGAIN with progress) continues where it stopped.
  auto fill = [&](uint64_t start, uint64_t end) -> int {
    while (start < end) {
      int64_t done = 0;
      int rc;
      if (source != nullptr) {
        uffdio_copy copy{};
        copy.dst = reinterpret_cast<uint64_t>(base_ + start);
        copy.src = reinterpret_cast<uint64_t>(source + (start - from));
        copy.len = end - start;
        rc = ::ioctl(uffd_.get(), UFFDIO_COPY, &copy);
        done = copy.copy;
      } else {
        uffdio_zeropage zero{};
        zero.range.start = reinterpret_cast<uint64_t>(base_ + start);
        zero.range.len = end - start;
        rc = ::ioctl(uffd_.get(), UFFDIO_ZEROPAGE, &zero);
        done = zero.zeropage;
      }
      if (rc == 0) return 0;
      if (errno != EAGAIN) return errno;
      if (done > 0) start += static_cast<uint64_t>(done);
    }
    return 0;
  };
  int error = fill(from, to);
  if (error == EEXIST) {
    // A page of the range exists already (it raced with a fault): the others one by one.
    // An ioctl that fails with EEXIST wakes no waiter, so the range is woken at the end.
    for (uint64_t page = from; page < to; page += kPageBytes) {
      int pageError = fill(page, page + kPageBytes);
      if (pageError != 0 && pageError != EEXIST) {
        throwSystemError(pageError, source ? "UFFDIO_COPY page" : "UFFDIO_ZEROPAGE page", imagePath_);
      }
    }
    wake(from, to - from);
  } else if (error != 0) {
    throwSystemError(error, source ? "UFFDIO_COPY" : "UFFDIO_ZEROPAGE", imagePath_);
  }
}

void LazyMemoryFill::wake(uint64_t offset, uint64_t length) {
  uffdio_range range{reinterpret_cast<uint64_t>(base_ + offset), length};
  CLONE_SYSCALL(::ioctl(uffd_.get(), UFFDIO_WAKE, &range), "UFFDIO_WAKE", imagePath_);
}

void LazyMemoryFill::fillRun(uint64_t first, uint64_t end, uint8_t* buffer, FillKind kind) {
  uint64_t start = first * kPageBytes;
  uint64_t stop = end * kPageBytes;
  {
    // Counted before the fills wake whoever faulted, so that they see their own pages.
    uint64_t dataBytes = 0;
    for (auto it = extentAfter(start); it != extents_.end() && it->first < stop; ++it) {
      dataBytes += std::min(stop, it->first + it->second) - std::max(start, it->first);
    }
    std::lock_guard lock(mutex_);
    if (kind == FillKind::kRefill) {
      stats_.refaults += end - first;
    } else {
      stats_.copiedPages += dataBytes / kPageBytes;
      stats_.zeroedPages += (stop - start - dataBytes) / kPageBytes;
      if (kind == FillKind::kPrefetch) stats_.prefetchedPages += end - first;
    }
  }
  // Copy only the image's data; zero-fill its holes instead of reading them.
  uint64_t at = start;
  for (auto it = extentAfter(start); it != extents_.end() && it->first < stop; ++it) {
    uint64_t dataStart = std::max(at, it->first);
    uint64_t dataEnd = std::min(stop, it->first + it->second);
    if (dataStart > at) fillRange(at, dataStart, nullptr);
    uint8_t* into = buffer + (dataStart - start);
    for (uint64_t done = 0; done < dataEnd - dataStart;) {
      ssize_t n = ::pread(image_.get(), into + done, dataEnd - dataStart - done,
                          static_cast<off_t>(dataStart + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throwSystemError(errno, "read template memory image", imagePath_);
      require(n > 0, "{}: the memory image ends at {:#x}, inside a data extent", imagePath_,
              dataStart + done);
      done += static_cast<uint64_t>(n);
    }
    fillRange(dataStart, dataEnd, into);
    at = dataEnd;
  }
  if (at < stop) fillRange(at, stop, nullptr);
  for (uint64_t page = first; page < end; ++page) filled_[page] = true;
}

void LazyMemoryFill::prefetch(std::vector<uint64_t> pageOffsets) {
  std::erase_if(pageOffsets, [&](uint64_t o) { return o % kPageBytes != 0 || o >= size_; });
  if (pageOffsets.empty()) return;
  std::sort(pageOffsets.begin(), pageOffsets.end());
  std::lock_guard fillLock(fillMutex_);
  BounceBuffer buffer(kMaxRunBytes);
  constexpr uint64_t kMaxRunPages = kMaxRunBytes / kPageBytes;
  size_t i = 0;
  while (i < pageOffsets.size()) {
    uint64_t first = pageOffsets[i] / kPageBytes;
    if (filled_[first]) {
      ++i;
      continue;
    }
    uint64_t end = first + 1;
    ++i;
    while (i < pageOffsets.size() && end - first < kMaxRunPages) {
      uint64_t page = pageOffsets[i] / kPageBytes;
      if (page == end - 1) {  // a duplicate
        ++i;
        continue;
      }
      if (page != end || filled_[page]) break;
      ++end;
      ++i;
    }
    fillRun(first, end, buffer.data(), FillKind::kPrefetch);
  }
}

uint64_t LazyMemoryFill::fillAllData() {
  BounceBuffer buffer(kMaxRunBytes);
  constexpr uint64_t kMaxRunPages = kMaxRunBytes / kPageBytes;
  uint64_t filled = 0;
  for (const auto& [offset, length] : extents_) {
    uint64_t page = offset / kPageBytes;
    uint64_t end = (offset + length) / kPageBytes;
    while (page < end) {
      // A run at a time, so that faults (after start()) wait at most one run.
      std::lock_guard fillLock(fillMutex_);
      if (filled_[page]) {
        ++page;
        continue;
      }
      uint64_t runEnd = page + 1;
      while (runEnd < end && runEnd - page < kMaxRunPages && !filled_[runEnd]) ++runEnd;
      fillRun(page, runEnd, buffer.data(), FillKind::kPrefetch);
      filled += runEnd - page;
      page = runEnd;
    }
  }
  return filled;
}

void LazyMemoryFill::handHolesToTheKernel() {
  {
    std::lock_guard lock(mutex_);
    require(devices_.empty(), "{}: holes cannot go to the kernel while a device process's "
            "faults come to the fill", imagePath_);
  }
  {
    std::lock_guard fillLock(fillMutex_);
    for (const auto& [offset, length] : extents_) {
      for (uint64_t page = offset / kPageBytes; page < (offset + length) / kPageBytes; ++page) {
        require(filled_[page], "{}: data page at {:#x} is not filled yet; holes cannot go to "
                "the kernel", imagePath_, page * kPageBytes);
      }
    }
    // Wakes any fault still queued: it retries as a plain shmem fault.
    uffdio_range range{reinterpret_cast<uint64_t>(base_), size_};
    CLONE_SYSCALL(::ioctl(uffd_.get(), UFFDIO_UNREGISTER, &range), "UFFDIO_UNREGISTER guest memory",
                  imagePath_);
  }
  stopThread();
}

void LazyMemoryFill::addDeviceFaults(UniqueFd userfaultfd, std::vector<DeviceMapping> mappings,
                                     std::string name) {
  for (const auto& m : mappings) {
    require(m.address % kPageBytes == 0 && m.length % kPageBytes == 0 &&
                m.memoryOffset % kPageBytes == 0 && m.memoryOffset <= size_ &&
                m.length <= size_ - m.memoryOffset && m.address + m.length > m.address,
            "{}: its mapping ({:#x}, {:#x}) of guest memory offset {:#x} is not page-aligned "
            "inside guest memory",
            name, m.address, m.length, m.memoryOffset);
  }
  auto device = std::make_unique<DeviceSource>();
  device->userfaultfd = std::move(userfaultfd);
  device->mappings = std::move(mappings);
  device->name = std::move(name);
  {
    std::lock_guard lock(mutex_);
    devices_.push_back(std::move(device));
  }
  uint64_t one = 1;
  CLONE_SYSCALL(::write(devicesChanged_.get(), &one, sizeof(one)), "wake the fill thread");
}

void LazyMemoryFill::start(bool recordFaults) {
  recording_ = recordFaults;
  thread_ = std::thread([this] { handleFaults(); });
  pthread_setname_np(thread_.native_handle(), "uffd-fill");
}

bool LazyMemoryFill::resolve(uint64_t offset, bool recording) {
  uint64_t index = offset / kPageBytes;
  alignas(kPageBytes) static thread_local uint8_t page[kPageBytes];
  bool fresh;
  {
    // Counted before the fill wakes the faulting thread, so that it sees its own fault.
    std::lock_guard lock(mutex_);
    stats_.faults++;
  }
  {
    std::lock_guard fillLock(fillMutex_);
    fresh = !filled_[index];
    if (recording && fresh) {
      // Before the fill wakes the faulting thread: whoever it tells next (endRecording())
      // finds the page recorded.
      std::lock_guard lock(mutex_);
      recorded_.push_back(index * kPageBytes);
    }
    // A page filled since this fault was queued (two threads faulted on it) is filled
    // again: that meets EEXIST and wakes the page (a waiter left asleep is a vCPU or vhost
    // worker stuck for good). Should the page be missing after all, this fills it, where a
    // bare wake would have the thread fault on it forever.
    fillRun(index, index + 1, page, fresh ? FillKind::kFault : FillKind::kRefill);
  }
  return fresh;
}

std::optional<std::string> LazyMemoryFill::handleDeviceFaults(DeviceSource& device,
                                                              bool recording) {
  uffd_msg messages[16];
  ssize_t n = ::read(device.userfaultfd.get(), messages, sizeof(messages));
  if (n < 0 && (errno == EAGAIN || errno == EINTR)) return std::nullopt;
  if (n < 0) return fmt::format("read its userfaultfd: {}", std::strerror(errno));
  for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
    if (messages[i].event != UFFD_EVENT_PAGEFAULT) continue;
    uint64_t address = messages[i].arg.pagefault.address & ~(kPageBytes - 1);
    auto mapping = std::find_if(device.mappings.begin(), device.mappings.end(), [&](const auto& m) {
      return address >= m.address && address - m.address < m.length;
    });
    if (mapping != device.mappings.end()) {
      {
        std::lock_guard lock(mutex_);
        stats_.deviceFaults++;
      }
      resolve(mapping->memoryOffset + (address - mapping->address), recording);
    } else {
      log_.warn("{}: a fault at {:#x}, outside the guest memory it mapped", device.name, address);
    }
    // Its thread sleeps on its own userfaultfd: the fill above woke only the core's.
    uffdio_range range{address, kPageBytes};
    if (::ioctl(device.userfaultfd.get(), UFFDIO_WAKE, &range) != 0) {
      return fmt::format("UFFDIO_WAKE at {:#x}: {}", address, std::strerror(errno));
    }
  }
  return std::nullopt;
}

void LazyMemoryFill::handleFaults() {
  uffd_msg messages[16];
  std::vector<pollfd> fds;
  std::vector<DeviceSource*> polled;
  try {
    while (true) {
      fds = {{uffd_.get(), POLLIN, 0}, {stopEvent_.get(), POLLIN, 0},
             {devicesChanged_.get(), POLLIN, 0}};
      polled.clear();
      {
        std::lock_guard lock(mutex_);
        for (auto& device : devices_) {
          if (device->failed) continue;
          fds.push_back({device->userfaultfd.get(), POLLIN, 0});
          polled.push_back(device.get());
        }
      }
      int ready = ::poll(fds.data(), fds.size(), -1);
      if (ready < 0 && errno == EINTR) continue;
      if (ready < 0) throwSystemError(errno, "poll userfaultfd");
      if (fds[1].revents) return;
      if (fds[2].revents) {
        uint64_t count;
        (void)!::read(devicesChanged_.get(), &count, sizeof(count));
        continue;
      }
      bool recording = recording_;
      for (size_t d = 0; d < polled.size(); ++d) {
        short events = fds[3 + d].revents;
        if (events == 0) continue;
        std::optional<std::string> error;
        if (events & (POLLERR | POLLHUP | POLLNVAL)) {
          error = fmt::format("its userfaultfd reports poll events {:#x}", events);
        } else {
          error = handleDeviceFaults(*polled[d], recording);
        }
        if (error) {
          // The device process is gone or its fd broke: it cannot be served any more, and
          // the VM goes on (as when a back-end hangs up).
          log_.error("{}: stopped resolving its memory faults: {}", polled[d]->name, *error);
          std::lock_guard lock(mutex_);
          polled[d]->failed = true;
        }
      }
      if (fds[0].revents == 0) continue;
      ssize_t n = ::read(uffd_.get(), messages, sizeof(messages));
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n < 0) throwSystemError(errno, "read userfaultfd");
      for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
        if (messages[i].event != UFFD_EVENT_PAGEFAULT) continue;
        uint64_t offset = messages[i].arg.pagefault.address - reinterpret_cast<uint64_t>(base_);
        if (offset >= size_) continue;
        resolve(offset, recording);
      }
    }
  } catch (const std::exception& e) {
    // A fork whose memory cannot be filled cannot run: its vCPUs would wait forever.
    log_.critical("guest memory fill failed: {}; ending the VM", e.what());
    std::_Exit(5);
  }
}

std::vector<uint64_t> LazyMemoryFill::endRecording() {
  recording_ = false;
  std::lock_guard lock(mutex_);
  std::vector<uint64_t> pages = recorded_;
  std::sort(pages.begin(), pages.end());
  return pages;
}

LazyMemoryFill::Stats LazyMemoryFill::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

}  // namespace clonevm::vmm
