#include "vmm-core/memory/guest_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <utility>

#include "common/error.h"
#include "vmm-core/arch/layout.h"

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22  // Linux 5.14; older C library headers lack it
#endif
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace clonevm::vmm {
namespace {

constexpr uint64_t kPage = 4096;

void requireValidSize(uint64_t size) {
  require(size >= 2 * layout::kMiB && size % (2 * layout::kMiB) == 0,
          "guest memory size must be a non-zero multiple of 2 MiB, got {} bytes", size);
}

// Applies `advice` (MADV_POPULATE_READ or _WRITE) to the pages at these offsets of a mapping
// of `size` bytes, a run of contiguous pages at a time.
uint64_t populatePages(uint8_t* mapping, uint64_t size, std::vector<uint64_t> pageOffsets, int advice,
                       const char* step) {
  std::erase_if(pageOffsets, [&](uint64_t o) { return o % kPage != 0 || o >= size; });
  std::sort(pageOffsets.begin(), pageOffsets.end());
  pageOffsets.erase(std::unique(pageOffsets.begin(), pageOffsets.end()), pageOffsets.end());
  uint64_t mapped = 0;
  for (size_t first = 0; first < pageOffsets.size();) {
    size_t end = first + 1;
    while (end < pageOffsets.size() && pageOffsets[end] == pageOffsets[end - 1] + kPage) ++end;
    uint64_t length = (end - first) * kPage;
    if (::madvise(mapping + pageOffsets[first], length, advice) != 0) {
      if (errno == EINVAL) return mapped;  // an older kernel: the pages fault in as touched
      throwSystemError(errno, step, fmt::format("{:#x}+{:#x}", pageOffsets[first], length));
    }
    mapped += end - first;
    first = end;
  }
  return mapped;
}

}  // namespace

GuestMemory GuestMemory::create(uint64_t size, const std::string& name, bool hugePages) {
  requireValidSize(size);
  GuestMemory memory;
  memory.fd_ = UniqueFd(CLONE_SYSCALL(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING),
                                      "memfd_create guest memory", name));
  CLONE_SYSCALL(::ftruncate(memory.fd_.get(), static_cast<off_t>(size)),
                "size guest memory memfd", name);
  memory.size_ = size;
  memory.map(MAP_SHARED, name);
  // THP for shmem is per-mount policy; the hint is harmless where it is off.
  if (hugePages) ::madvise(memory.mapping_, size, MADV_HUGEPAGE);
  return memory;
}

GuestMemory GuestMemory::mapCopyOnWrite(const std::string& path, uint64_t size,
                                        const std::vector<std::pair<uint64_t, uint64_t>>& dataExtents) {
  requireValidSize(size);
  GuestMemory memory;
  memory.fd_ = UniqueFd(CLONE_SYSCALL(::open(path.c_str(), O_RDONLY | O_CLOEXEC),
                                      "open memory file for a copy-on-write mapping", path));
  struct stat info {};
  CLONE_SYSCALL(::fstat(memory.fd_.get(), &info), "stat memory file", path);
  // A shorter file would fault SIGBUS past its end, in KVM or in the core.
  require(S_ISREG(info.st_mode) && static_cast<uint64_t>(info.st_size) == size,
          "{}: a regular file of {} bytes is needed for guest memory, found {} bytes", path,
          size, static_cast<uint64_t>(info.st_size));
  memory.size_ = size;
  memory.copyOnWrite_ = true;
  memory.map(MAP_PRIVATE | MAP_ANONYMOUS, path);
  for (auto [offset, length] : dataExtents) {
    require(offset < size && length <= size - offset, "{}: data extent {:#x}+{:#x} is outside {} bytes",
            path, offset, length, size);
    uint64_t from = offset / kPage * kPage;
    uint64_t to = std::min(size, (offset + length + kPage - 1) / kPage * kPage);
    void* placed = ::mmap(memory.mapping_ + from, to - from, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE, memory.fd_.get(),
                          static_cast<off_t>(from));
    if (placed == MAP_FAILED) {
      throwSystemError(errno, "mmap a data extent of the memory file",
                       fmt::format("{} at {:#x}+{:#x}", path, from, to - from));
    }
  }
  // A written page is a 4 KiB copy, never a 2 MiB one.
  ::madvise(memory.mapping_, size, MADV_NOHUGEPAGE);
  return memory;
}

void GuestMemory::map(int flags, const std::string& what) {
  void* mapping = ::mmap(nullptr, size_, PROT_READ | PROT_WRITE, flags | MAP_NORESERVE,
                         (flags & MAP_ANONYMOUS) != 0 ? -1 : fd_.get(), 0);
  if (mapping == MAP_FAILED) throwSystemError(errno, "mmap guest memory", what);
  mapping_ = static_cast<uint8_t*>(mapping);
  uint64_t low = std::min(size_, layout::kLowRamEnd);
  regions_.push_back({0, low, 0, mapping_});
  if (size_ > low) {
    regions_.push_back({layout::kHighRamStart, size_ - low, low, mapping_ + low});
  }
}

uint64_t GuestMemory::populate(std::vector<uint64_t> pageOffsets) const {
  return populatePages(mapping_, size_, std::move(pageOffsets), MADV_POPULATE_READ,
                       "map guest memory in (MADV_POPULATE_READ)");
}

uint64_t GuestMemory::populateWritable(std::vector<uint64_t> pageOffsets) const {
  return populatePages(mapping_, size_, std::move(pageOffsets), MADV_POPULATE_WRITE,
                       "map guest memory in for writing (MADV_POPULATE_WRITE)");
}

void GuestMemory::unmapPagesKeepingContents() const {
  require(!copyOnWrite_, "copy-on-write guest memory cannot be unmapped: its written pages exist nowhere else");
  // A shared mapping of a memfd: MADV_DONTNEED drops the page table entries only.
  CLONE_SYSCALL(::madvise(mapping_, size_, MADV_DONTNEED), "unmap guest memory pages (MADV_DONTNEED)");
}

GuestMemory::ResidentPages GuestMemory::residentPages() const {
  // /proc/PID/pagemap (Documentation/admin-guide/mm/pagemap.rst): bits a process may read.
  constexpr uint64_t kPresent = 1ull << 63;
  constexpr uint64_t kFileOrSharedAnon = 1ull << 61;
  constexpr uint64_t kExclusive = 1ull << 56;
  auto isZeroPage = [](const uint8_t* bytes) {
    return bytes[0] == 0 && std::memcmp(bytes, bytes + 1, kPage - 1) == 0;
  };
  UniqueFd pagemap(CLONE_SYSCALL(::open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC),
                                 "open the page map", "/proc/self/pagemap"));
  ResidentPages resident;
  std::vector<uint64_t> entries(4096);
  uint64_t first = reinterpret_cast<uintptr_t>(mapping_) / kPage;
  for (uint64_t page = 0; page < size_ / kPage; page += entries.size()) {
    size_t count = std::min<uint64_t>(entries.size(), size_ / kPage - page);
    ssize_t got = ::pread(pagemap.get(), entries.data(), count * 8, static_cast<off_t>((first + page) * 8));
    if (got != static_cast<ssize_t>(count * 8)) {
      throwSystemError(got < 0 ? errno : EIO, "read the page map of guest memory", "/proc/self/pagemap");
    }
    for (size_t i = 0; i < count; ++i) {
      if ((entries[i] & kPresent) == 0) continue;
      resident.pages.push_back((page + i) * kPage);
      bool ownCopy = (entries[i] & kFileOrSharedAnon) == 0 && (entries[i] & kExclusive) != 0;
      // Some kernels map a page of its own, not the shared zero page, where a template hole
      // is only read: such a page still reads as zeros.
      if (copyOnWrite_ && ownCopy && !isZeroPage(mapping_ + (page + i) * kPage)) {
        resident.written.push_back((page + i) * kPage);
      }
    }
  }
  return resident;
}

int GuestMemory::fd() const {
  require(!copyOnWrite_,
          "guest memory is a copy-on-write mapping of its template: no device process can map it");
  return fd_.get();
}

bool GuestMemory::hostGivesShmemHugePages() {
  std::ifstream setting("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  std::string line;
  std::getline(setting, line);
  // The active choice is bracketed: "always within_size advise [never] deny force".
  return line.find("[never]") == std::string::npos && line.find("[deny]") == std::string::npos &&
         !line.empty();
}

GuestMemory::GuestMemory(GuestMemory&& other) noexcept
    : fd_(std::move(other.fd_)),
      copyOnWrite_(other.copyOnWrite_),
      size_(std::exchange(other.size_, 0)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      regions_(std::move(other.regions_)) {}

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  if (this != &other) {
    if (mapping_ != nullptr) ::munmap(mapping_, size_);
    fd_ = std::move(other.fd_);
    copyOnWrite_ = other.copyOnWrite_;
    size_ = std::exchange(other.size_, 0);
    mapping_ = std::exchange(other.mapping_, nullptr);
    regions_ = std::move(other.regions_);
  }
  return *this;
}

GuestMemory::~GuestMemory() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

uint64_t GuestMemory::endAddress() const {
  const auto& last = regions_.back();
  return last.guestAddress + last.size;
}

bool GuestMemory::contains(uint64_t address, uint64_t length) const {
  for (const auto& region : regions_) {
    if (address >= region.guestAddress && address - region.guestAddress <= region.size &&
        length <= region.size - (address - region.guestAddress)) {
      return true;
    }
  }
  return false;
}

std::span<uint8_t> GuestMemory::slice(uint64_t address, uint64_t length) const {
  for (const auto& region : regions_) {
    if (address >= region.guestAddress && address - region.guestAddress <= region.size &&
        length <= region.size - (address - region.guestAddress)) {
      return {region.host + (address - region.guestAddress), length};
    }
  }
  throw Error(fmt::format("guest range {:#x}+{:#x} is outside guest memory", address, length));
}

void GuestMemory::write(uint64_t address, std::span<const uint8_t> bytes) const {
  std::memcpy(slice(address, bytes.size()).data(), bytes.data(), bytes.size());
}

void GuestMemory::read(uint64_t address, std::span<uint8_t> bytes) const {
  std::memcpy(bytes.data(), slice(address, bytes.size()).data(), bytes.size());
}

}  // namespace clonevm::vmm
