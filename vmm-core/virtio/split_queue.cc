#include "vmm-core/virtio/split_queue.h"

#include <atomic>

#include "common/error.h"

namespace clonevm::vmm {
namespace {

// Split ring offsets (spec 2.7.6, 2.7.8).
constexpr uint64_t kRingFlags = 0;
constexpr uint64_t kRingIndex = 2;
constexpr uint64_t kRingEntries = 4;
constexpr uint64_t kDescSize = 16;
constexpr uint64_t kUsedElemSize = 8;

struct RawDescriptor {
  uint64_t address;
  uint32_t length;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(RawDescriptor) == kDescSize);

// The ring indexes are the synchronisation points with the guest's driver.
uint16_t loadAcquire(const GuestMemory& memory, uint64_t address) {
  auto* p = reinterpret_cast<uint16_t*>(memory.slice(address, 2).data());
  return std::atomic_ref<uint16_t>(*p).load(std::memory_order_acquire);
}

void storeRelease(const GuestMemory& memory, uint64_t address, uint16_t value) {
  auto* p = reinterpret_cast<uint16_t*>(memory.slice(address, 2).data());
  std::atomic_ref<uint16_t>(*p).store(value, std::memory_order_release);
}

}  // namespace

SplitQueue::SplitQueue(const GuestMemory& memory, const VirtioQueueInfo& queue)
    : memory_(memory), queue_(queue) {
  // Both indexes start at 0 after a reset (spec 2.7.6); the driver's rings are fresh.
  require(queue.size > 0 && (queue.size & (queue.size - 1)) == 0,
          "split queue {}: size {} is not a power of two", queue.index, queue.size);
}

uint16_t SplitQueue::availIndex() const {
  return loadAcquire(memory_, queue_.availRing + kRingIndex);
}

std::optional<VirtqChain> SplitQueue::pop() {
  uint16_t avail = availIndex();
  if (avail == nextAvail_) return std::nullopt;
  require(static_cast<uint16_t>(avail - nextAvail_) <= queue_.size,
          "split queue {}: avail index {} is more than {} ahead of {}", queue_.index, avail,
          queue_.size, nextAvail_);
  uint64_t slot = kRingEntries + 2ull * (nextAvail_ % queue_.size);
  uint16_t head = memory_.readObject<uint16_t>(queue_.availRing + slot);
  require(head < queue_.size, "split queue {}: head {} out of range", queue_.index, head);
  ++nextAvail_;

  VirtqChain chain{.head = head, .descriptors = {}};
  uint16_t index = head;
  for (;;) {
    // A chain longer than the table must revisit a descriptor: the driver made a loop.
    require(chain.descriptors.size() < queue_.size, "split queue {}: descriptor chain loops",
            queue_.index);
    auto raw = memory_.readObject<RawDescriptor>(queue_.descTable + kDescSize * index);
    require(!(raw.flags & kDescIndirect), "split queue {}: indirect descriptors not offered",
            queue_.index);
    chain.descriptors.push_back({raw.address, raw.length, (raw.flags & kDescWrite) != 0});
    if (!(raw.flags & kDescNext)) break;
    require(raw.next < queue_.size, "split queue {}: next {} out of range", queue_.index,
            raw.next);
    index = raw.next;
  }
  return chain;
}

void SplitQueue::push(uint16_t head, uint32_t written) {
  uint64_t slot = kRingEntries + kUsedElemSize * (nextUsed_ % queue_.size);
  const uint32_t elem[2] = {head, written};
  memory_.writeObject(queue_.usedRing + slot, elem);
  ++nextUsed_;
  storeRelease(memory_, queue_.usedRing + kRingIndex, nextUsed_);
}

bool SplitQueue::wantsInterrupt() const {
  // The used index store above must be visible before the driver's flags are read (the
  // driver orders the other way round when it re-enables interrupts).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return !(loadAcquire(memory_, queue_.availRing + kRingFlags) & kAvailNoInterrupt);
}

size_t SplitQueue::writeToChain(const VirtqChain& chain, std::span<const uint8_t> bytes) const {
  size_t written = 0;
  for (const auto& descriptor : chain.descriptors) {
    if (!descriptor.writable || written == bytes.size()) continue;
    size_t n = std::min<size_t>(descriptor.length, bytes.size() - written);
    memory_.write(descriptor.address, bytes.subspan(written, n));  // throws outside RAM
    written += n;
  }
  return written;
}

}  // namespace clonevm::vmm
