#pragma once
// The device side of a split virtqueue (virtio 1.2 section 2.7) over GuestMemory, for
// queues the core serves itself (the vsock event queue) and in-process test devices. Every descriptor the guest supplies is validated: chains are
// bounded by the queue size (no loops), indexes stay inside the ring, and buffers are
// reached only through GuestMemory::slice. No indirect descriptors, no EVENT_IDX.
//
// Not thread-safe: one device thread owns a queue. The guest's vCPUs write the rings
// concurrently; the ring indexes are read and written atomically with acquire/release.

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/virtio/virtio_backend.h"

namespace clonevm::vmm {

struct VirtqDescriptor {
  uint64_t address = 0;
  uint32_t length = 0;
  bool writable = false;  // device-writable (VIRTQ_DESC_F_WRITE)
};

struct VirtqChain {
  uint16_t head = 0;
  std::vector<VirtqDescriptor> descriptors;
};

class SplitQueue {
 public:
  static constexpr uint16_t kDescNext = 1;
  static constexpr uint16_t kDescWrite = 2;
  static constexpr uint16_t kDescIndirect = 4;
  static constexpr uint16_t kAvailNoInterrupt = 1;

  // `queue` comes from VirtioActivationInfo: its addresses are already checked against
  // guest memory for its size and alignment.
  SplitQueue(const GuestMemory& memory, const VirtioQueueInfo& queue);

  // The next chain the driver made available, or nullopt. Throws clonevm::Error when the
  // driver broke the ring (avail index too far ahead, bad head or next, a loop, an
  // indirect descriptor); the queue is then unusable until reset.
  std::optional<VirtqChain> pop();
  // Returns a chain to the driver with `written` bytes written into its buffers.
  void push(uint16_t head, uint32_t written);
  // Whether the driver wants an interrupt for what was pushed (VIRTQ_AVAIL_F_NO_INTERRUPT).
  bool wantsInterrupt() const;

  // Writes `bytes` into the chain's device-writable buffers in order; returns how many fit.
  size_t writeToChain(const VirtqChain& chain, std::span<const uint8_t> bytes) const;

  // The device's ring positions (next available entry to read, next used entry to write),
  // for snapshots; restoreIndexes() puts them back on a queue rebuilt after a restore.
  uint16_t nextAvail() const { return nextAvail_; }
  uint16_t nextUsed() const { return nextUsed_; }
  void restoreIndexes(uint16_t nextAvail, uint16_t nextUsed) {
    nextAvail_ = nextAvail;
    nextUsed_ = nextUsed;
  }

 private:
  uint16_t availIndex() const;

  const GuestMemory& memory_;
  VirtioQueueInfo queue_;
  uint16_t nextAvail_ = 0;
  uint16_t nextUsed_ = 0;
};

}  // namespace clonevm::vmm
