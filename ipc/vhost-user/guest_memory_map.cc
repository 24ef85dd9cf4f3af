#include "ipc/vhost-user/guest_memory_map.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <limits>
#include <utility>

#include "common/error.h"

namespace clonevm::ipc::vhost {
namespace {

// Whether [start, start + size) wraps past 2^64 (size > 0).
bool wraps(uint64_t start, uint64_t size) {
  return size - 1 > std::numeric_limits<uint64_t>::max() - start;
}

bool overlaps(uint64_t aStart, uint64_t aSize, uint64_t bStart, uint64_t bSize) {
  // Inclusive last bytes avoid overflow at the top of the address space.
  return aStart <= bStart + (bSize - 1) && bStart <= aStart + (aSize - 1);
}

uint64_t startOf(const MemoryRegion& region, AddressSpace space) {
  return space == AddressSpace::kGuestPhysical ? region.guestAddress : region.userAddress;
}

const char* nameOf(AddressSpace space) {
  return space == AddressSpace::kGuestPhysical ? "guest physical" : "front-end user";
}

std::string describe(const MemoryRegion& region) {
  return fmt::format("region guest {:#x} user {:#x} size {:#x} offset {:#x}", region.guestAddress,
                     region.userAddress, region.size, region.mmapOffset);
}

}  // namespace

GuestMemoryMap::GuestMemoryMap(size_t maxRegions) : maxRegions_(maxRegions) {}

GuestMemoryMap::~GuestMemoryMap() { clear(); }

GuestMemoryMap::GuestMemoryMap(GuestMemoryMap&& other) noexcept
    : maxRegions_(other.maxRegions_),
      regions_(std::move(other.regions_)),
      generation_(other.generation_) {
  other.regions_.clear();
}

GuestMemoryMap& GuestMemoryMap::operator=(GuestMemoryMap&& other) noexcept {
  if (this != &other) {
    clear();
    maxRegions_ = other.maxRegions_;
    regions_ = std::move(other.regions_);
    other.regions_.clear();
    generation_ = other.generation_ + 1;
  }
  return *this;
}

std::vector<MemoryRegion> GuestMemoryMap::regions() const {
  std::vector<MemoryRegion> result;
  for (const auto& mapping : regions_) result.push_back(mapping.region);
  return result;
}

std::vector<GuestMemoryMap::HostMapping> GuestMemoryMap::hostMappings() const {
  std::vector<HostMapping> result;
  for (const auto& mapping : regions_) result.push_back({mapping.host, mapping.base, mapping.length});
  return result;
}

void GuestMemoryMap::validate(const MemoryRegion& region, std::span<const Mapping> others) const {
  require(region.size != 0, "vhost-user memory {} has zero size", describe(region));
  require(!wraps(region.guestAddress, region.size),
          "vhost-user memory {} wraps around the guest physical address space", describe(region));
  require(!wraps(region.userAddress, region.size),
          "vhost-user memory {} wraps around the user address space", describe(region));
  require(!wraps(region.mmapOffset, region.size),
          "vhost-user memory {} wraps around the file offset range", describe(region));
  require(region.mmapOffset + (region.size - 1) <
              static_cast<uint64_t>(std::numeric_limits<off_t>::max()),
          "vhost-user memory {} ends beyond the largest file offset", describe(region));
  require(region.size <= std::numeric_limits<size_t>::max() / 2,
          "vhost-user memory {} is too large to map", describe(region));
  for (const auto& other : others) {
    const auto& o = other.region;
    require(!overlaps(region.guestAddress, region.size, o.guestAddress, o.size),
            "vhost-user memory {} overlaps {} in guest physical space", describe(region),
            describe(o));
    require(!overlaps(region.userAddress, region.size, o.userAddress, o.size),
            "vhost-user memory {} overlaps {} in user address space", describe(region),
            describe(o));
  }
}

GuestMemoryMap::Mapping GuestMemoryMap::map(const MemoryRegion& region, int fd) {
  struct stat st {};
  CLONE_SYSCALL(::fstat(fd, &st), "stat vhost-user memory region fd");
  // Only a file has a size to check; mapping past its end would SIGBUS on access.
  require(S_ISREG(st.st_mode), "vhost-user memory {}: its fd is not a regular file or memfd",
          describe(region));
  require(static_cast<uint64_t>(st.st_size) >= region.mmapOffset &&
              static_cast<uint64_t>(st.st_size) - region.mmapOffset >= region.size,
          "vhost-user memory {}: the file behind it is only {:#x} bytes", describe(region),
          st.st_size);

  static const uint64_t kPageSize = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t alignedOffset = region.mmapOffset & ~(kPageSize - 1);
  uint64_t lead = region.mmapOffset - alignedOffset;
  size_t length = static_cast<size_t>(region.size + lead);
  void* base = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd,
                      static_cast<off_t>(alignedOffset));
  if (base == MAP_FAILED) {
    throwSystemError(errno, "mmap vhost-user memory", describe(region));
  }
  Mapping mapping;
  mapping.region = region;
  mapping.base = base;
  mapping.length = length;
  mapping.host = static_cast<uint8_t*>(base) + lead;
  return mapping;
}

void GuestMemoryMap::unmap(Mapping& mapping) {
  if (mapping.base != nullptr) ::munmap(mapping.base, mapping.length);
  mapping.base = nullptr;
  mapping.host = nullptr;
}

void GuestMemoryMap::setTable(std::span<const MemoryRegion> regions, std::vector<UniqueFd> fds) {
  require(regions.size() == fds.size(), "vhost-user memory table: {} regions but {} fds",
          regions.size(), fds.size());
  require(regions.size() <= maxRegions_, "vhost-user memory table has {} regions, at most {}",
          regions.size(), maxRegions_);
  std::vector<Mapping> fresh;
  try {
    for (size_t i = 0; i < regions.size(); ++i) {
      validate(regions[i], fresh);
      fresh.push_back(map(regions[i], fds[i].get()));
    }
  } catch (...) {
    for (auto& mapping : fresh) unmap(mapping);
    throw;
  }
  clear();
  regions_ = std::move(fresh);
  ++generation_;
}

void GuestMemoryMap::addRegion(const MemoryRegion& region, UniqueFd fd) {
  require(regions_.size() < maxRegions_, "vhost-user memory: cannot add {}, all {} slots used",
          describe(region), maxRegions_);
  validate(region, regions_);
  regions_.push_back(map(region, fd.get()));
  ++generation_;
}

void GuestMemoryMap::removeRegion(const MemoryRegion& region) {
  for (auto it = regions_.begin(); it != regions_.end(); ++it) {
    const auto& r = it->region;
    if (r.guestAddress == region.guestAddress && r.userAddress == region.userAddress &&
        r.size == region.size) {
      unmap(*it);
      regions_.erase(it);
      ++generation_;
      return;
    }
  }
  throw Error(fmt::format("vhost-user memory: no {} to remove", describe(region)));
}

void GuestMemoryMap::clear() {
  for (auto& mapping : regions_) unmap(mapping);
  if (!regions_.empty()) ++generation_;
  regions_.clear();
}

void GuestMemoryMap::translate(AddressSpace space, uint64_t address, uint64_t length,
                               std::vector<GuestSpan>& out) const {
  size_t firstNew = out.size();
  uint64_t cursor = address;
  uint64_t remaining = length;
  while (remaining > 0) {
    const Mapping* found = nullptr;
    for (const auto& mapping : regions_) {
      uint64_t start = startOf(mapping.region, space);
      if (cursor >= start && cursor - start < mapping.region.size) {
        found = &mapping;
        break;
      }
    }
    if (found == nullptr) {
      out.resize(firstNew);
      throw Error(fmt::format("vhost-user: {} range {:#x}+{:#x} is outside guest memory "
                              "(byte {:#x} is not mapped)",
                              nameOf(space), address, length, cursor));
    }
    uint64_t offset = cursor - startOf(found->region, space);
    uint64_t chunk = std::min(remaining, found->region.size - offset);
    out.emplace_back(found->host + offset, static_cast<size_t>(chunk));
    remaining -= chunk;
    cursor += chunk;  // cannot wrap: chunk ends inside a region that does not wrap
  }
}

GuestSpan GuestMemoryMap::translateContiguous(AddressSpace space, uint64_t address,
                                              uint64_t length) const {
  std::vector<GuestSpan> spans;
  translate(space, address, length, spans);
  require(spans.size() <= 1,
          "vhost-user: {} range {:#x}+{:#x} crosses a memory region boundary", nameOf(space),
          address, length);
  return spans.empty() ? GuestSpan() : spans.front();
}

}  // namespace clonevm::ipc::vhost
