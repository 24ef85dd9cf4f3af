#pragma once
// Test-only: a guest's view of a memfd-backed guest memory and a split ring driver over it.
// The tests play the guest driver (and the front-end) with this; it writes descriptors and
// avail entries the way a driver does and reads the used ring back.

#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"
#include "ipc/vhost-user/frontend.h"
#include "ipc/vhost-user/guest_memory_map.h"
#include "ipc/vhost-user/virtqueue.h"

namespace clonevm::ipc::vhost::testing {

// A memfd mapped into the test: guest physical addresses start at `guestBase`, and the
// front-end "user address" of a byte is its address in this mapping.
class TestGuestMemory {
 public:
  explicit TestGuestMemory(uint64_t size = 1 << 20, uint64_t guestBase = 0x100000)
      : size_(size), guestBase_(guestBase) {
    fd_ = UniqueFd(CLONE_SYSCALL(::memfd_create("test-guest", MFD_CLOEXEC), "memfd_create"));
    CLONE_SYSCALL(::ftruncate(fd_.get(), static_cast<off_t>(size)), "ftruncate");
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd_.get(), 0);
    if (p == MAP_FAILED) throw std::runtime_error("mmap test guest memory");
    base_ = static_cast<uint8_t*>(p);
  }
  ~TestGuestMemory() { ::munmap(base_, size_); }
  TestGuestMemory(const TestGuestMemory&) = delete;
  TestGuestMemory& operator=(const TestGuestMemory&) = delete;

  int fd() const { return fd_.get(); }
  uint64_t size() const { return size_; }
  uint64_t guestBase() const { return guestBase_; }
  uint64_t userBase() const { return reinterpret_cast<uint64_t>(base_); }
  MemoryRegion region() const { return {guestBase_, size_, userBase(), 0}; }
  MemoryRegionSpec spec() const { return {guestBase_, size_, userBase(), 0, fd_.get()}; }

  uint8_t* host(uint64_t guestAddress) { return base_ + (guestAddress - guestBase_); }
  uint64_t userOf(uint64_t guestAddress) const { return userBase() + (guestAddress - guestBase_); }

  // Bump allocator for buffers and rings (guest physical addresses), 16-byte aligned.
  uint64_t allocate(uint64_t bytes, uint64_t alignment = 16) {
    next_ = (next_ + alignment - 1) & ~(alignment - 1);
    if (next_ + bytes > size_) throw std::runtime_error("test guest memory exhausted");
    uint64_t address = guestBase_ + next_;
    next_ += bytes;
    return address;
  }
  uint64_t put(const std::vector<uint8_t>& bytes) {
    uint64_t address = allocate(bytes.size());
    std::memcpy(host(address), bytes.data(), bytes.size());
    return address;
  }
  std::vector<uint8_t> get(uint64_t address, size_t length) {
    return std::vector<uint8_t>(host(address), host(address) + length);
  }
  // A GuestMemoryMap with this memory as its only region (the back-end's view).
  GuestMemoryMap mapForBackend() const {
    GuestMemoryMap map;
    std::vector<UniqueFd> fds;
    fds.emplace_back(::dup(fd_.get()));
    MemoryRegion r = region();
    map.setTable(std::span<const MemoryRegion>(&r, 1), std::move(fds));
    return map;
  }

 private:
  UniqueFd fd_;
  uint64_t size_;
  uint64_t guestBase_;
  uint8_t* base_ = nullptr;
  uint64_t next_ = 0;
};

// A split ring laid out in TestGuestMemory, driven as a guest driver would.
class TestRing {
 public:
  TestRing(TestGuestMemory& memory, uint16_t size) : memory_(memory), size_(size) {
    desc_ = memory.allocate(descriptorTableBytes(size), 16);
    avail_ = memory.allocate(availRingBytes(size), 2);
    used_ = memory.allocate(usedRingBytes(size), 4);
  }

  uint16_t size() const { return size_; }
  uint64_t descGuest() const { return desc_; }
  VringAddress address(uint32_t index) const {
    return {index, 0, memory_.userOf(desc_), memory_.userOf(used_), memory_.userOf(avail_), 0};
  }
  VringAddresses addresses() const {
    return {memory_.userOf(desc_), memory_.userOf(avail_), memory_.userOf(used_), 0, 0};
  }

  void setDescriptor(uint16_t index, uint64_t address, uint32_t length, uint16_t flags,
                     uint16_t next = 0) {
    VringDescriptor d{address, length, flags, next};
    std::memcpy(memory_.host(desc_) + 16 * index, &d, sizeof(d));
  }
  // Writes an indirect table at guest address `table`.
  void setIndirect(uint64_t table, uint16_t index, uint64_t address, uint32_t length,
                   uint16_t flags, uint16_t next = 0) {
    VringDescriptor d{address, length, flags, next};
    std::memcpy(memory_.host(table) + 16 * index, &d, sizeof(d));
  }
  // Puts `head` on the avail ring and publishes it.
  void publish(uint16_t head) {
    uint16_t idx = availIndex();
    store16(avail_ + 4 + 2 * (idx % size_), head);
    std::atomic_thread_fence(std::memory_order_release);
    store16(avail_ + 2, static_cast<uint16_t>(idx + 1));
  }
  void setAvailIndex(uint16_t idx) { store16(avail_ + 2, idx); }
  uint16_t availIndex() { return load16(avail_ + 2); }
  void setAvailFlags(uint16_t flags) { store16(avail_, flags); }
  void setUsedEvent(uint16_t value) { store16(avail_ + 4 + 2 * size_, value); }
  uint16_t usedIndex() { return load16(used_ + 2); }
  uint16_t usedFlags() { return load16(used_); }
  uint16_t availEvent() { return load16(used_ + 4 + 8 * size_); }
  std::pair<uint32_t, uint32_t> usedElement(uint16_t slot) {
    uint32_t id, len;
    std::memcpy(&id, memory_.host(used_) + 4 + 8 * (slot % size_), 4);
    std::memcpy(&len, memory_.host(used_) + 8 + 8 * (slot % size_), 4);
    return {id, len};
  }

 private:
  uint16_t load16(uint64_t g) {
    uint16_t v;
    std::memcpy(&v, memory_.host(g), 2);
    return v;
  }
  void store16(uint64_t g, uint16_t v) { std::memcpy(memory_.host(g), &v, 2); }

  TestGuestMemory& memory_;
  uint16_t size_;
  uint64_t desc_ = 0, avail_ = 0, used_ = 0;
};

}  // namespace clonevm::ipc::vhost::testing
