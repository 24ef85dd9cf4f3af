#pragma once
// A split virtqueue as the device side sees it (VIRTIO 1.2 section 2.7), over guest memory
// that the front-end shared with us.
//
// The driver (the guest) is hostile by assumption. Everything it controls (avail index, ring
// entries, descriptors, indirect tables) is read once into local copies and validated before
// use: head and next indices against the table size, chains against loops (a chain cannot be
// longer than its table), indirect tables for non-zero length, a multiple of 16 bytes, a size
// limit, no nesting and no INDIRECT|NEXT, device-readable before device-writable buffers, and
// every buffer through GuestMemoryMap::translate(). A violation marks the queue broken (the
// VIRTIO "needs reset" state): it is logged, the error eventfd is signalled and the queue hands
// out nothing more until the front-end sets it up again. Nothing the driver writes can make
// pop() hang, crash or touch memory outside the memory table.
//
// Notifications: pop() suppresses kicks while it finds work and re-arms them before it reports
// the queue empty (VRING_USED_F_NO_NOTIFY, or avail_event with EVENT_IDX), rechecking after a
// full barrier so no kick is lost. notifyIfNeeded() signals the call eventfd only when the
// driver asked for it (VRING_AVAIL_F_NO_INTERRUPT, or used_event with EVENT_IDX).
//
// Inflight tracking (INFLIGHT_SHMFD): with a region attached, pop() and complete() keep the
// spec's per-descriptor records; start() recovers them after a reconnect and pop() hands the
// requests that were in flight out again first, in the order they were first taken.

#include <cstdint>
#include <deque>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "ipc/vhost-user/guest_memory_map.h"
#include "ipc/vhost-user/message.h"

namespace clonevm::ipc::vhost {

// Descriptor and ring flags (VIRTIO 1.2 2.7.5 - 2.7.8).
inline constexpr uint16_t kDescFlagNext = 1;
inline constexpr uint16_t kDescFlagWrite = 2;
inline constexpr uint16_t kDescFlagIndirect = 4;
inline constexpr uint16_t kAvailFlagNoInterrupt = 1;
inline constexpr uint16_t kUsedFlagNoNotify = 1;

struct VringDescriptor {
  uint64_t address;
  uint32_t length;
  uint16_t flags;
  uint16_t next;
};
static_assert(sizeof(VringDescriptor) == 16);

// An indirect table may hold this many descriptors, or the queue size if that is larger
// (Linux vhost and QEMU both cap a chain at 1024 buffers).
inline constexpr uint32_t kMaxIndirectDescriptors = 1024;

// Byte sizes of the three ring parts of a queue of `size` entries, event fields included.
constexpr uint64_t descriptorTableBytes(uint32_t size) { return 16ull * size; }
constexpr uint64_t availRingBytes(uint32_t size) { return 6ull + 2ull * size; }
constexpr uint64_t usedRingBytes(uint32_t size) { return 6ull + 8ull * size; }

// One descriptor chain taken from the avail ring: the buffers the device reads (driver to
// device) and the buffers it writes, already translated and bounds-checked. The spans stay
// valid until the memory table changes; a device that completes requests synchronously from
// processQueue() never sees that happen, an asynchronous one is drained first
// (VhostUserDevice::drain and onQueueStopped).
class VirtqueueRequest {
 public:
  uint16_t head() const { return head_; }
  std::span<const GuestSpan> readable() const { return readable_; }
  std::span<const GuestSpan> writable() const { return writable_; }
  uint64_t readableBytes() const { return readableBytes_; }
  uint64_t writableBytes() const { return writableBytes_; }

  // Copies readable bytes starting at `offset` into `out`; returns how many were copied
  // (fewer than out.size() at the end of the buffers).
  size_t read(uint64_t offset, std::span<uint8_t> out) const;
  // Copies `in` into the writable buffers starting at `offset`; returns how many bytes fit.
  size_t write(uint64_t offset, std::span<const uint8_t> in) const;

 private:
  friend class Virtqueue;
  uint16_t head_ = 0;
  std::vector<GuestSpan> readable_;
  std::vector<GuestSpan> writable_;
  uint64_t readableBytes_ = 0;
  uint64_t writableBytes_ = 0;
};

// The inflight region layout for one split queue (vhost-user spec, "Inflight I/O tracking").
struct InflightDescriptorState {
  uint8_t inflight;
  uint8_t padding[5];
  uint16_t next;
  uint64_t counter;
};
struct InflightQueueHeader {
  uint64_t features;
  uint16_t version;
  uint16_t descriptorCount;
  uint16_t lastBatchHead;
  uint16_t usedIndex;
};
static_assert(sizeof(InflightDescriptorState) == 16);
static_assert(sizeof(InflightQueueHeader) == 16);
inline constexpr uint16_t kInflightVersion = 1;
// Bytes one queue's region takes (each queue region starts 64-byte aligned, as libvhost-user).
constexpr uint64_t inflightQueueBytes(uint32_t queueSize) {
  return (sizeof(InflightQueueHeader) + sizeof(InflightDescriptorState) * queueSize + 63) &
         ~uint64_t{63};
}

class Virtqueue {
 public:
  Virtqueue(uint16_t index, spdlog::logger& log);
  Virtqueue(Virtqueue&&) noexcept = default;

  uint16_t index() const { return index_; }

  // --- Set-up by the vhost-user session (front-end messages). Each throws on bad input.
  void setSize(uint32_t size);                 // SET_VRING_NUM: a power of two, 1..32768
  uint16_t size() const { return size_; }
  void setAddresses(const VringAddress& address);  // SET_VRING_ADDR
  void setBase(uint32_t base);                 // SET_VRING_BASE
  uint16_t lastAvailIndex() const { return lastAvail_; }
  void setFeatures(uint64_t features);         // negotiated virtio features
  void setKickFd(UniqueFd fd) { kickFd_ = std::move(fd); }
  void setCallFd(UniqueFd fd) { callFd_ = std::move(fd); }
  void setErrFd(UniqueFd fd) { errFd_ = std::move(fd); }
  int kickFd() const { return kickFd_.get(); }
  int callFd() const { return callFd_.get(); }
  // `region` is this queue's part of the inflight area; empty detaches it.
  void setInflightRegion(std::span<uint8_t> region);

  // Checks the ring addresses against `memory` (inside, aligned, contiguous). Throws.
  void checkRings(const GuestMemoryMap& memory) const;
  bool hasAddresses() const { return hasAddresses_; }

  // Starts processing (the kick fd is set): resolves the rings, reads the used index and
  // recovers inflight records. Throws when the rings are unusable.
  void start(const GuestMemoryMap& memory);
  // GET_VRING_BASE: stops processing; the set-up stays. Returns the next avail index.
  uint16_t stop();
  // RESET_DEVICE / disconnect: back to the initial stopped, disabled, unconfigured state.
  void reset();

  bool started() const { return started_; }
  bool enabled() const { return enabled_; }
  void setEnabled(bool enabled) { enabled_ = enabled; }
  bool broken() const { return broken_; }
  const std::string& brokenReason() const { return brokenReason_; }

  // --- The device's API.
  // The next request, or nullopt when the queue is empty, stopped or broken. When it returns
  // nullopt for an empty queue, notifications are armed again.
  std::optional<VirtqueueRequest> pop();
  // Puts a request on the used ring with the number of bytes the device wrote into its
  // writable buffers (at most request.writableBytes()).
  void complete(const VirtqueueRequest& request, uint32_t writtenLength);
  // Signals the call eventfd if requests were completed since the last signal and the
  // driver wants an interrupt. Returns whether it signalled.
  bool notifyIfNeeded();
  // Marks the queue broken (see above); for devices that find a request malformed beyond
  // answering with an error status.
  void markBroken(const std::string& reason);

  // Requests recovered from the inflight region that pop() has yet to hand out again.
  size_t pendingResubmissions() const { return resubmit_.size(); }

 private:
  // Ring accessors: the only code that touches ring memory. Offsets are bounded by size_.
  uint16_t loadAvailIndex() const;
  uint16_t loadAvailFlags() const;
  uint16_t loadAvailRing(uint16_t slot) const;
  uint16_t loadUsedEvent() const;
  uint16_t loadUsedIndex() const;
  void storeUsedFlags(uint16_t flags);
  void storeUsedElement(uint16_t slot, uint32_t id, uint32_t length);
  void storeUsedIndex(uint16_t index);
  void storeAvailEvent(uint16_t value);
  VringDescriptor loadDescriptor(uint16_t index) const;

  void resolve(const GuestMemoryMap& memory);
  bool refresh();  // re-resolves after a memory table change; false (and broken) on failure
  // Walks the chain at `head` into a request. Throws clonevm::Error on anything invalid.
  VirtqueueRequest walkChain(uint16_t head) const;
  void armNotifications();
  void suppressNotifications();
  void recoverInflight();
  void signal(const UniqueFd& fd, const char* what);

  uint16_t index_;
  spdlog::logger* log_;

  uint16_t size_ = 0;
  VringAddress address_{};
  bool hasAddresses_ = false;
  bool needsResolve_ = true;  // addresses changed since the rings were resolved
  uint64_t features_ = 0;
  bool eventIdx_ = false;
  bool indirect_ = false;
  bool notifyOnEmpty_ = false;

  UniqueFd kickFd_;
  UniqueFd callFd_;
  UniqueFd errFd_;

  const GuestMemoryMap* memory_ = nullptr;
  uint64_t memoryGeneration_ = 0;
  GuestSpan desc_;
  GuestSpan avail_;
  GuestSpan used_;

  bool started_ = false;
  bool enabled_ = false;
  bool broken_ = false;
  std::string brokenReason_;
  bool notificationsSuppressed_ = false;

  uint16_t lastAvail_ = 0;
  uint16_t usedIndex_ = 0;       // our shadow of used->idx
  uint16_t signalledUsed_ = 0;   // used index at the last interrupt (EVENT_IDX)
  bool signalledUsedValid_ = false;
  bool usedSinceSignal_ = false;

  std::span<uint8_t> inflight_;
  uint64_t inflightCounter_ = 0;
  std::deque<uint16_t> resubmit_;
};

}  // namespace clonevm::ipc::vhost
