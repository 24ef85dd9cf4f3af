#pragma once
// Guest RAM, laid out as up to two regions around the 32-bit PCI hole. Either one memfd
// mapped MAP_SHARED (device processes map the same fd), or, for a fork without device
// processes, a MAP_PRIVATE copy-on-write mapping of its template's memory file (docs/FORK.md,
// "Copy-on-write forks").
//
// This is the only way to touch guest memory from the core. Every guest-supplied address and
// length is validated here, once: slice() refuses any range not wholly inside one region.

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/unique_fd.h"

namespace clonevm::vmm {

struct MemoryRegion {
  uint64_t guestAddress;  // guest physical address of the first byte
  uint64_t size;
  uint64_t fdOffset;      // offset of the first byte within the memfd
  uint8_t* host;          // host mapping of the first byte
};

class GuestMemory {
 public:
  // Creates `size` bytes of guest RAM (a multiple of 2 MiB; RAM above 3 GiB moves to 4 GiB).
  // `hugePages`: ask for transparent huge pages (off for a fork filled through userfaultfd,
  // which places 4 KiB pages).
  static GuestMemory create(uint64_t size, const std::string& name = "clone-guest-ram",
                            bool hugePages = true);
  // Maps the memory file `path` (exactly `size` bytes; a template's `memory`) MAP_PRIVATE:
  // the guest reads the file's page cache, shared with every other mapping of it, and a
  // page the guest writes becomes this process's own copy. The file is never written.
  // Only its `dataExtents` (offset, length) are mapped from the file; the holes are private
  // anonymous memory, which reads as the shared zero page: a hole faulted through a mapping
  // of a tmpfs file would allocate a page in the file, and change its extent map.
  // Device processes cannot map such memory: fd() throws.
  static GuestMemory mapCopyOnWrite(const std::string& path, uint64_t size,
                                    const std::vector<std::pair<uint64_t, uint64_t>>& dataExtents);

  GuestMemory(GuestMemory&&) noexcept;
  GuestMemory& operator=(GuestMemory&&) noexcept;
  GuestMemory(const GuestMemory&) = delete;
  GuestMemory& operator=(const GuestMemory&) = delete;
  ~GuestMemory();

  // False when the host ignores MADV_HUGEPAGE on shmem
  // (/sys/kernel/mm/transparent_hugepage/shmem_enabled is "never" or "deny"): guest RAM then
  // faults in 4 KiB pages, which makes boot markedly slower.
  static bool hostGivesShmemHugePages();

  uint64_t size() const { return size_; }
  // The memfd, for device processes to map. Throws for copy-on-write memory: a device
  // mapping the template file would not see the guest's writes.
  int fd() const;
  bool copyOnWrite() const { return copyOnWrite_; }
  // Maps the pages at these memory offsets (4 KiB pages; any order; out-of-range ones
  // skipped) into this process now, for reading, a run of contiguous pages at a time: a
  // copy-on-write fork's prefetch. Returns the pages mapped (0 where the kernel lacks
  // MADV_POPULATE_READ, Linux 5.14).
  uint64_t populate(std::vector<uint64_t> pageOffsets) const;
  // The same for writing (MADV_POPULATE_WRITE): each page of copy-on-write memory becomes
  // this process's own copy now, with the same bytes, rather than at the guest's first write.
  uint64_t populateWritable(std::vector<uint64_t> pageOffsets) const;
  // Unmaps every page of memfd memory from this process's page tables; the memfd keeps
  // their bytes, and the next touch maps them again (in the kernel: no fault reaches a
  // userfaultfd for a page the memfd holds). KVM's mappings go with them. Afterwards,
  // residentPages() shows what was touched since. Throws for copy-on-write memory, whose
  // private pages this would discard.
  void unmapPagesKeepingContents() const;
  struct ResidentPages {
    std::vector<uint64_t> pages;    // mapped now (/proc/self/pagemap's present bit), sorted
    std::vector<uint64_t> written;  // of those, this process's own copies (anonymous and
                                    // exclusive) that are not all zeros, sorted
  };
  // The 4 KiB pages (offsets) this process has mapped now: what a copy-on-write fork has
  // touched (with the neighbours the kernel maps around each file fault), and written.
  ResidentPages residentPages() const;
  const std::vector<MemoryRegion>& regions() const { return regions_; }
  // One past the highest guest physical address backed by RAM.
  uint64_t endAddress() const;

  // The host bytes of [address, address+length). Throws clonevm::Error unless the whole range
  // lies inside one region.
  std::span<uint8_t> slice(uint64_t address, uint64_t length) const;
  bool contains(uint64_t address, uint64_t length) const;
  // The whole mapping (memfd offset 0 at its first byte), for registering it with
  // userfaultfd and for a snapshot's read of all of it; guest data goes through slice().
  std::span<uint8_t> mappingForRegistration() const { return {mapping_, size_}; }

  void write(uint64_t address, std::span<const uint8_t> bytes) const;
  void read(uint64_t address, std::span<uint8_t> bytes) const;

  template <typename T>
  void writeObject(uint64_t address, const T& value) const {
    static_assert(std::is_trivially_copyable_v<T>);
    std::memcpy(slice(address, sizeof(T)).data(), &value, sizeof(T));
  }
  template <typename T>
  T readObject(uint64_t address) const {
    static_assert(std::is_trivially_copyable_v<T>);
    T value;
    std::memcpy(&value, slice(address, sizeof(T)).data(), sizeof(T));
    return value;
  }

 private:
  GuestMemory() = default;
  // Maps size_ bytes of fd_ (or anonymous memory, with MAP_ANONYMOUS in `flags`) and lays
  // out the regions.
  void map(int flags, const std::string& what);

  UniqueFd fd_;
  bool copyOnWrite_ = false;
  uint64_t size_ = 0;
  uint8_t* mapping_ = nullptr;
  std::vector<MemoryRegion> regions_;
};

}  // namespace clonevm::vmm
