#include "ipc/vhost-user/virtqueue.h"

#include <poll.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "common/error.h"

namespace clonevm::ipc::vhost {
namespace {

// Offsets inside the avail and used rings (VIRTIO 1.2 2.7.6, 2.7.8).
constexpr size_t kRingFlagsOffset = 0;
constexpr size_t kRingIndexOffset = 2;
constexpr size_t kRingEntriesOffset = 4;
constexpr size_t kUsedElementBytes = 8;

uint16_t atomicLoad16(const uint8_t* where, std::memory_order order) {
  return std::atomic_ref<uint16_t>(*const_cast<uint16_t*>(reinterpret_cast<const uint16_t*>(where)))
      .load(order);
}

void atomicStore16(uint8_t* where, uint16_t value, std::memory_order order) {
  std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(where)).store(value, order);
}

// VIRTIO 1.2 2.7.10.2: whether the other side asked to be notified when the index moved
// from `oldIndex` to `newIndex`, given its event index.
bool needEvent(uint16_t event, uint16_t newIndex, uint16_t oldIndex) {
  return static_cast<uint16_t>(newIndex - event - 1) < static_cast<uint16_t>(newIndex - oldIndex);
}

bool aligned(const uint8_t* pointer, size_t alignment) {
  return reinterpret_cast<uintptr_t>(pointer) % alignment == 0;
}

}  // namespace

size_t VirtqueueRequest::read(uint64_t offset, std::span<uint8_t> out) const {
  size_t copied = 0;
  uint64_t skip = offset;
  for (const auto& span : readable_) {
    if (copied == out.size()) break;
    if (skip >= span.size()) {
      skip -= span.size();
      continue;
    }
    size_t chunk = std::min<size_t>(span.size() - skip, out.size() - copied);
    std::memcpy(out.data() + copied, span.data() + skip, chunk);
    copied += chunk;
    skip = 0;
  }
  return copied;
}

size_t VirtqueueRequest::write(uint64_t offset, std::span<const uint8_t> in) const {
  size_t copied = 0;
  uint64_t skip = offset;
  for (const auto& span : writable_) {
    if (copied == in.size()) break;
    if (skip >= span.size()) {
      skip -= span.size();
      continue;
    }
    size_t chunk = std::min<size_t>(span.size() - skip, in.size() - copied);
    std::memcpy(span.data() + skip, in.data() + copied, chunk);
    copied += chunk;
    skip = 0;
  }
  return copied;
}

Virtqueue::Virtqueue(uint16_t index, spdlog::logger& log) : index_(index), log_(&log) {}

void Virtqueue::setSize(uint32_t size) {
  require(size >= 1 && size <= kMaxQueueSize && (size & (size - 1)) == 0,
          "vhost-user queue {}: size {} is not a power of two between 1 and {}", index_, size,
          kMaxQueueSize);
  require(!started_, "vhost-user queue {}: cannot resize a started queue", index_);
  size_ = static_cast<uint16_t>(size);
}

void Virtqueue::setAddresses(const VringAddress& address) {
  address_ = address;
  hasAddresses_ = true;
  needsResolve_ = true;  // resolve again before the next use
}

void Virtqueue::setBase(uint32_t base) {
  require(base <= 0xffff, "vhost-user queue {}: base {:#x} does not fit 16 bits", index_, base);
  require(!started_, "vhost-user queue {}: cannot set the base of a started queue", index_);
  lastAvail_ = static_cast<uint16_t>(base);
}

void Virtqueue::setFeatures(uint64_t features) {
  features_ = features;
  eventIdx_ = hasBit(features, feature::kRingEventIdx);
  indirect_ = hasBit(features, feature::kRingIndirectDesc);
  notifyOnEmpty_ = hasBit(features, feature::kNotifyOnEmpty);
}

void Virtqueue::setInflightRegion(std::span<uint8_t> region) {
  if (!region.empty()) {
    require(aligned(region.data(), 8), "vhost-user queue {}: inflight region is misaligned",
            index_);
    require(region.size() >= sizeof(InflightQueueHeader),
            "vhost-user queue {}: inflight region of {} bytes is too small", index_,
            region.size());
  }
  inflight_ = region;
}

void Virtqueue::checkRings(const GuestMemoryMap& memory) const {
  require(size_ != 0, "vhost-user queue {}: size not set", index_);
  require(hasAddresses_, "vhost-user queue {}: ring addresses not set", index_);
  auto desc = memory.translateContiguous(AddressSpace::kFrontendUser, address_.descriptor,
                                         descriptorTableBytes(size_));
  auto avail = memory.translateContiguous(AddressSpace::kFrontendUser, address_.available,
                                          availRingBytes(size_));
  auto used = memory.translateContiguous(AddressSpace::kFrontendUser, address_.used,
                                         usedRingBytes(size_));
  require(aligned(desc.data(), 16) && aligned(avail.data(), 2) && aligned(used.data(), 4),
          "vhost-user queue {}: ring addresses desc {:#x} avail {:#x} used {:#x} are misaligned",
          index_, address_.descriptor, address_.available, address_.used);
}

void Virtqueue::resolve(const GuestMemoryMap& memory) {
  checkRings(memory);
  desc_ = memory.translateContiguous(AddressSpace::kFrontendUser, address_.descriptor,
                                     descriptorTableBytes(size_));
  avail_ = memory.translateContiguous(AddressSpace::kFrontendUser, address_.available,
                                      availRingBytes(size_));
  used_ = memory.translateContiguous(AddressSpace::kFrontendUser, address_.used,
                                     usedRingBytes(size_));
  memory_ = &memory;
  memoryGeneration_ = memory.generation();
  needsResolve_ = false;
}

bool Virtqueue::refresh() {
  if (memory_ != nullptr && !needsResolve_ && memoryGeneration_ == memory_->generation()) {
    return true;
  }
  if (memory_ == nullptr) {
    markBroken("ring memory is gone");
    return false;
  }
  try {
    resolve(*memory_);
    return true;
  } catch (const Error& e) {
    markBroken(fmt::format("rings unusable after a memory table change: {}", e.what()));
    return false;
  }
}

void Virtqueue::start(const GuestMemoryMap& memory) {
  resolve(memory);
  broken_ = false;
  brokenReason_.clear();
  usedIndex_ = loadUsedIndex();
  signalledUsedValid_ = false;
  usedSinceSignal_ = false;
  notificationsSuppressed_ = false;
  resubmit_.clear();
  if (!inflight_.empty()) recoverInflight();
  started_ = true;
}

uint16_t Virtqueue::stop() {
  started_ = false;
  kickFd_.reset();
  return lastAvail_;
}

void Virtqueue::reset() {
  started_ = false;
  enabled_ = false;
  broken_ = false;
  brokenReason_.clear();
  size_ = 0;
  address_ = {};
  hasAddresses_ = false;
  kickFd_.reset();
  callFd_.reset();
  errFd_.reset();
  memory_ = nullptr;
  needsResolve_ = true;
  desc_ = avail_ = used_ = {};
  lastAvail_ = usedIndex_ = signalledUsed_ = 0;
  signalledUsedValid_ = usedSinceSignal_ = notificationsSuppressed_ = false;
  inflight_ = {};
  inflightCounter_ = 0;
  resubmit_.clear();
}

// --- Ring accessors.

uint16_t Virtqueue::loadAvailIndex() const {
  return atomicLoad16(avail_.data() + kRingIndexOffset, std::memory_order_acquire);
}

uint16_t Virtqueue::loadAvailFlags() const {
  return atomicLoad16(avail_.data() + kRingFlagsOffset, std::memory_order_relaxed);
}

uint16_t Virtqueue::loadAvailRing(uint16_t slot) const {
  return atomicLoad16(avail_.data() + kRingEntriesOffset + 2 * size_t{slot},
                      std::memory_order_relaxed);
}

uint16_t Virtqueue::loadUsedEvent() const {
  return atomicLoad16(avail_.data() + kRingEntriesOffset + 2 * size_t{size_},
                      std::memory_order_relaxed);
}

uint16_t Virtqueue::loadUsedIndex() const {
  return atomicLoad16(used_.data() + kRingIndexOffset, std::memory_order_relaxed);
}

void Virtqueue::storeUsedFlags(uint16_t flags) {
  atomicStore16(used_.data() + kRingFlagsOffset, flags, std::memory_order_relaxed);
}

void Virtqueue::storeUsedElement(uint16_t slot, uint32_t id, uint32_t length) {
  uint8_t* element = used_.data() + kRingEntriesOffset + kUsedElementBytes * slot;
  std::memcpy(element, &id, sizeof(id));
  std::memcpy(element + sizeof(id), &length, sizeof(length));
}

void Virtqueue::storeUsedIndex(uint16_t index) {
  atomicStore16(used_.data() + kRingIndexOffset, index, std::memory_order_release);
}

void Virtqueue::storeAvailEvent(uint16_t value) {
  atomicStore16(used_.data() + kRingEntriesOffset + kUsedElementBytes * size_t{size_}, value,
                std::memory_order_relaxed);
}

VringDescriptor Virtqueue::loadDescriptor(uint16_t index) const {
  VringDescriptor descriptor;
  std::memcpy(&descriptor, desc_.data() + sizeof(VringDescriptor) * index, sizeof(descriptor));
  return descriptor;
}

// --- Chains.

VirtqueueRequest Virtqueue::walkChain(uint16_t head) const {
  require(head < size_, "head descriptor index {} is outside the {}-entry table", head, size_);
  VirtqueueRequest request;
  request.head_ = head;

  // The driver may rewrite its memory while we walk; each descriptor is copied once and the
  // copy is what gets checked and used. An indirect table is copied whole for the same reason.
  std::vector<VringDescriptor> indirectTable;
  bool inIndirect = false;
  uint32_t tableSize = size_;
  uint32_t walked = 0;
  uint16_t index = head;
  bool seenWritable = false;
  for (;;) {
    require(++walked <= tableSize,
            "descriptor chain from head {} loops or is longer than its {}-entry table", head,
            tableSize);
    VringDescriptor descriptor = inIndirect ? indirectTable[index] : loadDescriptor(index);

    if ((descriptor.flags & kDescFlagIndirect) != 0) {
      require(indirect_, "descriptor {} is indirect but RING_INDIRECT_DESC was not negotiated",
              index);
      require(!inIndirect, "descriptor {} of an indirect table is itself indirect", index);
      require((descriptor.flags & kDescFlagNext) == 0,
              "descriptor {} has both INDIRECT and NEXT set", index);
      require(descriptor.length != 0 && descriptor.length % sizeof(VringDescriptor) == 0,
              "indirect table of descriptor {} has length {}, not a non-zero multiple of 16",
              index, descriptor.length);
      uint32_t entries = descriptor.length / sizeof(VringDescriptor);
      uint32_t limit = std::max<uint32_t>(kMaxIndirectDescriptors, size_);
      require(entries <= limit, "indirect table of descriptor {} has {} entries, at most {}",
              index, entries, limit);
      std::vector<GuestSpan> spans;
      memory_->translate(AddressSpace::kGuestPhysical, descriptor.address, descriptor.length,
                         spans);
      indirectTable.resize(entries);
      auto* bytes = reinterpret_cast<uint8_t*>(indirectTable.data());
      size_t copied = 0;
      for (const auto& span : spans) {
        std::memcpy(bytes + copied, span.data(), span.size());
        copied += span.size();
      }
      inIndirect = true;
      tableSize = entries;
      walked = 0;
      index = 0;
      continue;
    }

    bool writable = (descriptor.flags & kDescFlagWrite) != 0;
    if (writable) {
      seenWritable = true;
      memory_->translate(AddressSpace::kGuestPhysical, descriptor.address, descriptor.length,
                         request.writable_);
      request.writableBytes_ += descriptor.length;
    } else {
      require(!seenWritable, "device-readable descriptor {} follows a device-writable one", index);
      memory_->translate(AddressSpace::kGuestPhysical, descriptor.address, descriptor.length,
                         request.readable_);
      request.readableBytes_ += descriptor.length;
    }

    if ((descriptor.flags & kDescFlagNext) == 0) break;
    require(descriptor.next < tableSize, "descriptor {} links to {}, outside the {}-entry table",
            index, descriptor.next, tableSize);
    index = descriptor.next;
  }
  return request;
}

// --- Processing.

void Virtqueue::suppressNotifications() {
  if (notificationsSuppressed_) return;
  notificationsSuppressed_ = true;
  // With EVENT_IDX a stale avail_event already suppresses kicks.
  if (!eventIdx_) storeUsedFlags(kUsedFlagNoNotify);
}

void Virtqueue::armNotifications() {
  notificationsSuppressed_ = false;
  if (eventIdx_) {
    storeAvailEvent(lastAvail_);
  } else {
    storeUsedFlags(0);
  }
  // The driver must see the re-armed state before we look at avail->idx again.
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

std::optional<VirtqueueRequest> Virtqueue::pop() {
  if (!started_ || broken_ || !refresh()) return std::nullopt;

  try {
    if (!resubmit_.empty()) {
      uint16_t head = resubmit_.front();
      resubmit_.pop_front();
      return walkChain(head);
    }

    uint16_t availIndex = loadAvailIndex();
    if (availIndex == lastAvail_) {
      armNotifications();
      availIndex = loadAvailIndex();
      if (availIndex == lastAvail_) return std::nullopt;
    }
    uint16_t pending = static_cast<uint16_t>(availIndex - lastAvail_);
    require(pending <= size_, "avail index {} is {} entries ahead of {}, more than the queue size {}",
            availIndex, pending, lastAvail_, size_);
    suppressNotifications();

    // The acquire load of avail->idx orders the ring entry read after it.
    uint16_t head = loadAvailRing(static_cast<uint16_t>(lastAvail_ & (size_ - 1)));
    VirtqueueRequest request = walkChain(head);
    ++lastAvail_;

    if (!inflight_.empty()) {
      size_t offset = sizeof(InflightQueueHeader) + sizeof(InflightDescriptorState) * head;
      InflightDescriptorState state{};
      std::memcpy(&state, inflight_.data() + offset, sizeof(state));
      state.counter = inflightCounter_++;
      state.inflight = 1;
      std::memcpy(inflight_.data() + offset, &state, sizeof(state));
    }
    return request;
  } catch (const Error& e) {
    markBroken(e.what());
    return std::nullopt;
  }
}

void Virtqueue::complete(const VirtqueueRequest& request, uint32_t writtenLength) {
  require(writtenLength <= request.writableBytes(),
          "vhost-user queue {}: completion claims {} bytes written, the request has {} writable",
          index_, writtenLength, request.writableBytes());
  if (!started_ || broken_ || !refresh()) return;  // the driver resets the queue anyway
  require(request.head() < size_, "vhost-user queue {}: head {} outside the queue", index_,
          request.head());

  InflightQueueHeader header{};
  size_t stateOffset = sizeof(InflightQueueHeader) + sizeof(InflightDescriptorState) * request.head();
  if (!inflight_.empty()) {
    // Record the batch (of one) before publishing, so a crash in between can be undone.
    std::memcpy(&header, inflight_.data(), sizeof(header));
    InflightDescriptorState state{};
    std::memcpy(&state, inflight_.data() + stateOffset, sizeof(state));
    state.next = header.lastBatchHead;
    std::memcpy(inflight_.data() + stateOffset, &state, sizeof(state));
    header.lastBatchHead = request.head();
    std::memcpy(inflight_.data(), &header, sizeof(header));
  }

  storeUsedElement(static_cast<uint16_t>(usedIndex_ & (size_ - 1)), request.head(), writtenLength);
  ++usedIndex_;
  storeUsedIndex(usedIndex_);  // release: the element is visible before the index
  usedSinceSignal_ = true;

  if (!inflight_.empty()) {
    InflightDescriptorState state{};
    std::memcpy(&state, inflight_.data() + stateOffset, sizeof(state));
    state.inflight = 0;
    std::memcpy(inflight_.data() + stateOffset, &state, sizeof(state));
    header.usedIndex = usedIndex_;
    std::memcpy(inflight_.data(), &header, sizeof(header));
  }
}

bool Virtqueue::notifyIfNeeded() {
  if (!usedSinceSignal_ || !started_ || !refresh()) return false;
  // The used index store must be visible before we read the driver's suppression state.
  std::atomic_thread_fence(std::memory_order_seq_cst);

  bool notify;
  if (notifyOnEmpty_ && loadAvailIndex() == lastAvail_ && resubmit_.empty()) {
    notify = true;
  } else if (eventIdx_) {
    uint16_t oldIndex = signalledUsed_;
    bool valid = signalledUsedValid_;
    notify = !valid || needEvent(loadUsedEvent(), usedIndex_, oldIndex);
  } else {
    notify = (loadAvailFlags() & kAvailFlagNoInterrupt) == 0;
  }
  if (eventIdx_) {
    signalledUsed_ = usedIndex_;
    signalledUsedValid_ = true;
  }
  usedSinceSignal_ = false;
  if (notify) signal(callFd_, "call");
  return notify;
}

void Virtqueue::markBroken(const std::string& reason) {
  if (broken_) return;
  broken_ = true;
  brokenReason_ = reason;
  log_->error("vhost-user queue {} is broken and stops until the front-end resets it: {}", index_,
              reason);
  signal(errFd_, "error");
}

void Virtqueue::signal(const UniqueFd& fd, const char* what) {
  if (!fd.valid()) return;
  // The fd came from the front-end and we cannot make it non-blocking without changing it
  // for them too; a full one (a saturated eventfd, a pipe) already has a signal pending.
  pollfd pfd{fd.get(), POLLOUT, 0};
  if (::poll(&pfd, 1, 0) != 1 || (pfd.revents & POLLOUT) == 0) return;
  uint64_t one = 1;
  for (;;) {
    ssize_t n = ::write(fd.get(), &one, sizeof(one));
    if (n < 0 && errno == EINTR) continue;
    // EAGAIN means the counter is saturated: the other side has a signal pending anyway.
    if (n < 0 && errno != EAGAIN) {
      log_->warn("vhost-user queue {}: cannot signal the {} eventfd: {}", index_, what,
                 std::strerror(errno));
    }
    return;
  }
}

// --- Inflight recovery (vhost-user spec, "When reconnecting").

void Virtqueue::recoverInflight() {
  uint64_t needed = sizeof(InflightQueueHeader) + sizeof(InflightDescriptorState) * uint64_t{size_};
  require(inflight_.size() >= needed,
          "vhost-user queue {}: inflight region of {} bytes is too small for {} descriptors",
          index_, inflight_.size(), size_);
  InflightQueueHeader header{};
  std::memcpy(&header, inflight_.data(), sizeof(header));
  auto loadState = [&](uint16_t i) {
    InflightDescriptorState state{};
    std::memcpy(&state, inflight_.data() + sizeof(header) + sizeof(state) * i, sizeof(state));
    return state;
  };
  auto storeState = [&](uint16_t i, const InflightDescriptorState& state) {
    std::memcpy(inflight_.data() + sizeof(header) + sizeof(state) * i, &state, sizeof(state));
  };

  if (header.version == 0) {
    // A fresh region: nothing was in flight.
    std::memset(inflight_.data(), 0, needed);
    header = {};
    header.version = kInflightVersion;
    header.descriptorCount = size_;
    header.usedIndex = usedIndex_;
    std::memcpy(inflight_.data(), &header, sizeof(header));
    inflightCounter_ = 0;
    return;
  }
  require(header.version == kInflightVersion, "vhost-user queue {}: inflight region version {}",
          index_, header.version);
  require(header.descriptorCount == size_,
          "vhost-user queue {}: inflight region tracks {} descriptors, the queue has {}", index_,
          header.descriptorCount, size_);

  // A batch published to the used ring but not yet retired here: retire it now.
  if (header.usedIndex != usedIndex_) {
    uint16_t batch = static_cast<uint16_t>(usedIndex_ - header.usedIndex);
    uint16_t head = header.lastBatchHead;
    for (uint16_t i = 0; i < batch && i < size_ && head < size_; ++i) {
      auto state = loadState(head);
      state.inflight = 0;
      storeState(head, state);
      head = state.next;
    }
    header.usedIndex = usedIndex_;
    std::memcpy(inflight_.data(), &header, sizeof(header));
  }

  std::vector<std::pair<uint64_t, uint16_t>> inFlight;  // (counter, head)
  uint64_t maxCounter = 0;
  for (uint16_t i = 0; i < size_; ++i) {
    auto state = loadState(i);
    if (state.inflight == 1) {
      inFlight.emplace_back(state.counter, i);
      maxCounter = std::max(maxCounter, state.counter);
    } else if (state.inflight != 0) {
      state.inflight = 0;  // garbage: not a request we took
      storeState(i, state);
    }
  }
  std::sort(inFlight.begin(), inFlight.end());
  for (const auto& entry : inFlight) resubmit_.push_back(entry.second);
  inflightCounter_ = inFlight.empty() ? 0 : maxCounter + 1;
  // Every request taken so far is either used or in flight (as libvhost-user assumes).
  lastAvail_ = static_cast<uint16_t>(usedIndex_ + inFlight.size());
  if (!inFlight.empty()) {
    log_->info("vhost-user queue {}: resubmitting {} requests that were in flight", index_,
               inFlight.size());
  }
}

}  // namespace clonevm::ipc::vhost
