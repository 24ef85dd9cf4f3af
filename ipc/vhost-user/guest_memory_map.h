#pragma once
// The back-end's view of guest memory: the regions the front-end sent (SET_MEM_TABLE,
// ADD_MEM_REG, REM_MEM_REG), each mmap()ed MAP_SHARED from the fd that came with it.
//
// Every address the front-end or the guest supplies reaches host memory through translate(),
// the one bounds-checked translation of this library: a range is accepted only when every
// byte of it lies inside mapped regions. Nothing else computes pointers into guest memory.
//
// Regions are validated when they arrive: non-zero size, no wraparound of the guest physical,
// user or file range, no overlap with another region in guest physical or user address space,
// the file large enough for the range (so an access never SIGBUSes on a short file), and at
// most maxRegions() of them.

#include <cstdint>
#include <span>
#include <vector>

#include "common/unique_fd.h"
#include "ipc/vhost-user/message.h"

namespace clonevm::ipc::vhost {

// Which address a number is: a guest physical address (descriptor buffers) or an address in
// the front-end's own address space (vring addresses, when ACCESS_PLATFORM is off).
enum class AddressSpace { kGuestPhysical, kFrontendUser };

// A host byte range inside guest memory, already bounds-checked.
using GuestSpan = std::span<uint8_t>;

class GuestMemoryMap {
 public:
  // What GET_MAX_MEM_SLOTS answers unless the device asks for fewer (libvhost-user's value).
  static constexpr size_t kDefaultMaxRegions = 32;

  explicit GuestMemoryMap(size_t maxRegions = kDefaultMaxRegions);
  ~GuestMemoryMap();
  GuestMemoryMap(GuestMemoryMap&&) noexcept;
  GuestMemoryMap& operator=(GuestMemoryMap&&) noexcept;
  GuestMemoryMap(const GuestMemoryMap&) = delete;
  GuestMemoryMap& operator=(const GuestMemoryMap&) = delete;

  size_t maxRegions() const { return maxRegions_; }
  size_t regionCount() const { return regions_.size(); }
  std::vector<MemoryRegion> regions() const;
  // Where this process mapped each region, in regions() order: its first byte, and the
  // page-aligned mapping around it (postcopy registers those with a userfaultfd).
  struct HostMapping {
    uint8_t* host;
    void* base;
    size_t length;
  };
  std::vector<HostMapping> hostMappings() const;
  // Bumped on every change, so users of cached spans know to translate again.
  uint64_t generation() const { return generation_; }

  // SET_MEM_TABLE: replaces every region. fds[i] backs regions[i]. On error the old table
  // stays in place.
  void setTable(std::span<const MemoryRegion> regions, std::vector<UniqueFd> fds);
  // ADD_MEM_REG.
  void addRegion(const MemoryRegion& region, UniqueFd fd);
  // REM_MEM_REG: removes the region with the same guest address, user address and size (the
  // mmap offset is ignored, as the spec says). Throws if there is none.
  void removeRegion(const MemoryRegion& region);
  void clear();

  // The host bytes of [address, address + length) in `space`, appended to `out` as one span
  // per region touched (a range may cross from one region into an adjacent one). Throws
  // clonevm::Error, appending nothing, unless every byte is mapped. A zero length appends
  // nothing and is always valid.
  void translate(AddressSpace space, uint64_t address, uint64_t length,
                 std::vector<GuestSpan>& out) const;
  // The same for a range that must lie inside one region (ring structures).
  GuestSpan translateContiguous(AddressSpace space, uint64_t address, uint64_t length) const;

 private:
  struct Mapping {
    MemoryRegion region;
    uint8_t* host = nullptr;  // the region's first byte
    void* base = nullptr;     // what mmap returned (page aligned)
    size_t length = 0;        // what to munmap
  };

  // Checks `region` on its own and against `others`; throws with the reason.
  void validate(const MemoryRegion& region, std::span<const Mapping> others) const;
  static Mapping map(const MemoryRegion& region, int fd);
  static void unmap(Mapping& mapping);

  size_t maxRegions_;
  std::vector<Mapping> regions_;
  uint64_t generation_ = 0;
};

}  // namespace clonevm::ipc::vhost
