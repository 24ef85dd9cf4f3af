#include "vmm-core/virtio/vhost_vsock_backend.h"

#include <fcntl.h>
// virtio_ring.h's legacy helpers are C only; VIRTIO_RING_NO_LEGACY leaves them out.
#define VIRTIO_RING_NO_LEGACY
#include <linux/vhost.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>

#include "common/error.h"
#include "vmm-core/virtio/virtio.h"

namespace clonevm::vmm {
namespace {

constexpr unsigned kFeatureVersion1 = 32;
constexpr unsigned kFeatureEventIdx = 29;
// What we offer of the kernel's set: the event queue is served by SplitQueue, which takes
// no indirect descriptors, and always interrupts (so EVENT_IDX costs it nothing).
constexpr uint64_t kOfferable = (1ull << kFeatureVersion1) | (1ull << kFeatureEventIdx) |
                                (1ull << vsock::kFeatureSeqpacket);
constexpr uint16_t kKernelQueues[] = {vsock::kRxQueue, vsock::kTxQueue};

class DeviceKernel final : public VhostVsockKernel {
 public:
  DeviceKernel(UniqueFd fd, std::string path) : fd_(std::move(fd)), path_(std::move(path)) {}

  void setOwner() override { CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_OWNER, nullptr), "VHOST_SET_OWNER on", path_); }
  uint64_t getFeatures() override {
    uint64_t features = 0;
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_GET_FEATURES, &features), "VHOST_GET_FEATURES on", path_);
    return features;
  }
  void setFeatures(uint64_t features) override {
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_FEATURES, &features), "VHOST_SET_FEATURES on", path_);
  }
  void setMemTable(const std::vector<MemoryRegion>& regions) override {
    std::vector<uint8_t> buffer(sizeof(vhost_memory) + regions.size() * sizeof(vhost_memory_region));
    auto* table = reinterpret_cast<vhost_memory*>(buffer.data());
    table->nregions = static_cast<uint32_t>(regions.size());
    for (size_t i = 0; i < regions.size(); ++i) {
      table->regions[i] = {.guest_phys_addr = regions[i].guestAddress,
                           .memory_size = regions[i].size,
                           .userspace_addr = reinterpret_cast<uint64_t>(regions[i].host),
                           .flags_padding = 0};
    }
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_MEM_TABLE, table), "VHOST_SET_MEM_TABLE on", path_);
  }
  void setVringNum(uint16_t queue, uint16_t size) override {
    vhost_vring_state state{.index = queue, .num = size};
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_VRING_NUM, &state), "VHOST_SET_VRING_NUM on", path_);
  }
  void setVringBase(uint16_t queue, uint16_t base) override {
    vhost_vring_state state{.index = queue, .num = base};
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_VRING_BASE, &state), "VHOST_SET_VRING_BASE on", path_);
  }
  uint16_t getVringBase(uint16_t queue) override {
    vhost_vring_state state{.index = queue, .num = 0};
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_GET_VRING_BASE, &state), "VHOST_GET_VRING_BASE on", path_);
    return static_cast<uint16_t>(state.num);
  }
  void setVringAddr(uint16_t queue, const VringAddresses& addresses) override {
    vhost_vring_addr addr{.index = queue,
                          .flags = 0,
                          .desc_user_addr = addresses.desc,
                          .used_user_addr = addresses.used,
                          .avail_user_addr = addresses.avail,
                          .log_guest_addr = 0};
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_VRING_ADDR, &addr), "VHOST_SET_VRING_ADDR on", path_);
  }
  void setVringKick(uint16_t queue, int fd) override {
    vhost_vring_file file{.index = queue, .fd = fd};
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_VRING_KICK, &file), "VHOST_SET_VRING_KICK on", path_);
  }
  void setVringCall(uint16_t queue, int fd) override {
    vhost_vring_file file{.index = queue, .fd = fd};
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_SET_VRING_CALL, &file), "VHOST_SET_VRING_CALL on", path_);
  }
  int setGuestCid(uint64_t cid) override {
    return ::ioctl(fd_.get(), VHOST_VSOCK_SET_GUEST_CID, &cid) == 0 ? 0 : errno;
  }
  void setRunning(bool running) override {
    int value = running ? 1 : 0;
    CLONE_SYSCALL(::ioctl(fd_.get(), VHOST_VSOCK_SET_RUNNING, &value), "VHOST_VSOCK_SET_RUNNING on", path_);
  }

 private:
  UniqueFd fd_;
  std::string path_;
};

uint64_t cidFrom(uint64_t seed) {
  return vsock::kMinGuestCid + seed % (vsock::kMaxGuestCid - vsock::kMinGuestCid + 1);
}

}  // namespace

std::unique_ptr<VhostVsockKernel> openVhostVsock(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    int error = errno;
    throw Error(fmt::format("open {}: {}{}", path, std::strerror(error),
                            error == ENOENT ? " (modprobe vhost_vsock, or run with --no-vsock)" : ""));
  }
  return std::make_unique<DeviceKernel>(UniqueFd(fd), path);
}

std::shared_ptr<VhostVsockBackend> VhostVsockBackend::create(const VsockConfig& config,
                                                             const GuestMemory& memory,
                                                             spdlog::logger& log) {
  // Automatic CIDs start somewhere different per process and per moment, so VMs started
  // together rarely walk the same sequence.
  uint64_t seed = static_cast<uint64_t>(::getpid()) * 0x9e3779b97f4a7c15ull ^
                  static_cast<uint64_t>(
                      std::chrono::steady_clock::now().time_since_epoch().count());
  return std::make_shared<VhostVsockBackend>(openVhostVsock(config.devicePath), config.guestCid,
                                             memory, log, seed);
}

VhostVsockBackend::VhostVsockBackend(std::unique_ptr<VhostVsockKernel> kernel, uint64_t guestCid,
                                     const GuestMemory& memory, spdlog::logger& log,
                                     uint64_t autoStart)
    : kernel_(std::move(kernel)), memory_(memory), log_(log) {
  kernel_->setOwner();
  offeredFeatures_ = kernel_->getFeatures() & kOfferable;
  kernel_->setMemTable(memory_.regions());
  std::lock_guard lock(mutex_);
  takeCidLocked(guestCid, guestCid == 0, autoStart);
}

VhostVsockBackend::~VhostVsockBackend() {
  std::lock_guard lock(mutex_);
  try {
    resetLocked();
  } catch (const std::exception& error) {
    log_.warn("vsock: stopping vhost-vsock: {}", error.what());
  }
}

void VhostVsockBackend::takeCidLocked(uint64_t cid, bool automatic, uint64_t autoStart) {
  if (!automatic) {
    require(cid >= vsock::kMinGuestCid && cid <= vsock::kMaxGuestCid,
            "--vsock-cid {}: out of range ({} to {})", cid, vsock::kMinGuestCid,
            vsock::kMaxGuestCid);
    int error = kernel_->setGuestCid(cid);
    require(error != EADDRINUSE, "--vsock-cid {}: CID already in use by another VM", cid);
    if (error != 0) throwSystemError(error, "VHOST_VSOCK_SET_GUEST_CID " + std::to_string(cid) + " on", "/dev/vhost-vsock");
    guestCid_ = cid;
    return;
  }
  constexpr int kAttempts = 64;
  for (int attempt = 0; attempt < kAttempts; ++attempt) {
    uint64_t candidate = cidFrom(autoStart + static_cast<uint64_t>(attempt));
    int error = kernel_->setGuestCid(candidate);
    if (error == 0) {
      guestCid_ = candidate;
      return;
    }
    if (error != EADDRINUSE) {
      throwSystemError(error, "VHOST_VSOCK_SET_GUEST_CID " + std::to_string(candidate) + " on",
                       "/dev/vhost-vsock");
    }
  }
  throw Error(fmt::format("vsock: no free CID after {} tries", kAttempts));
}

uint64_t VhostVsockBackend::guestCid() const {
  std::lock_guard lock(mutex_);
  return guestCid_;
}

bool VhostVsockBackend::active() const {
  std::lock_guard lock(mutex_);
  return active_;
}

void VhostVsockBackend::readConfig(uint32_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  uint8_t config[vsock::kConfigSize];
  for (uint32_t i = 0; i < vsock::kConfigSize; ++i) config[i] = static_cast<uint8_t>(guestCid_ >> (8 * i));
  // The transport forwards only accesses inside configSize().
  std::memcpy(data.data(), config + offset, data.size());
}

void VhostVsockBackend::writeConfig(uint32_t offset, std::span<const uint8_t> data) {
  // guest_cid is read-only for the driver.
  log_.debug("vsock: driver wrote {} bytes at config offset {}; ignored", data.size(), offset);
}

void VhostVsockBackend::activate(const VirtioActivationInfo& info) {
  std::lock_guard lock(mutex_);
  require(!active_, "vsock: activated twice without a reset");
  const VirtioQueueInfo* queues[3] = {nullptr, nullptr, nullptr};
  for (const auto& queue : info.queues) {
    if (queue.index < 3) queues[queue.index] = &queue;
  }
  require(queues[vsock::kRxQueue] && queues[vsock::kTxQueue],
          "vsock: the driver did not enable the rx and tx queues");
  bool eventIdx = (info.features >> kFeatureEventIdx) & 1;
  uint64_t extra = eventIdx ? 2 : 0;
  VhostVsockState bases = pendingRestore_.value_or(VhostVsockState{});
  pendingRestore_.reset();

  kernel_->setFeatures(info.features & kernel_->getFeatures());
  for (uint16_t index : kKernelQueues) {
    const VirtioQueueInfo& queue = *queues[index];
    uint64_t n = queue.size;
    // Ring addresses are guest physical and already validated by the transport; the kernel
    // wants our mapping of them.
    VhostVsockKernel::VringAddresses addresses{
        .desc = reinterpret_cast<uint64_t>(memory_.slice(queue.descTable, 16 * n).data()),
        .avail = reinterpret_cast<uint64_t>(memory_.slice(queue.availRing, 4 + 2 * n + extra).data()),
        .used = reinterpret_cast<uint64_t>(memory_.slice(queue.usedRing, 4 + 8 * n + extra).data())};
    kernel_->setVringNum(index, queue.size);
    kernel_->setVringBase(index, index == vsock::kRxQueue ? bases.rxBase : bases.txBase);
    kernel_->setVringAddr(index, addresses);
    kernel_->setVringKick(index, queue.kickFd);
    kernel_->setVringCall(index, queue.callFd);
  }
  kernel_->setRunning(true);
  running_ = true;
  active_ = true;
  configChanged_ = info.configChanged;
  if (queues[vsock::kEventQueue]) {
    eventQueue_.emplace(*info.memory, *queues[vsock::kEventQueue]);
    eventQueue_->restoreIndexes(bases.eventNextAvail, bases.eventNextUsed);
    eventCallFd_ = queues[vsock::kEventQueue]->callFd;
  }
  log_.info("vsock: guest CID {} running (features {:#x})", guestCid_, info.features);
}

void VhostVsockBackend::reset() {
  std::lock_guard lock(mutex_);
  resetLocked();
}

void VhostVsockBackend::resetLocked() {
  if (!active_) return;
  active_ = false;
  eventQueue_.reset();
  eventCallFd_ = -1;
  configChanged_ = nullptr;
  if (running_) kernel_->setRunning(false);
  running_ = false;
  // The transport's eventfds may close after this; detach them from the kernel.
  for (uint16_t index : kKernelQueues) {
    kernel_->setVringKick(index, -1);
    kernel_->setVringCall(index, -1);
  }
}

bool VhostVsockBackend::sendEventLocked(uint32_t id) {
  if (!active_ || !eventQueue_) {
    log_.warn("vsock: event {} not sent: the driver has not set up the event queue", id);
    return false;
  }
  std::optional<VirtqChain> chain;
  try {
    chain = eventQueue_->pop();
  } catch (const Error& error) {
    log_.warn("vsock: event queue: {}", error.what());
    return false;
  }
  if (!chain) {
    log_.warn("vsock: event {} not sent: no buffer posted on the event queue", id);
    return false;
  }
  const uint8_t event[4] = {static_cast<uint8_t>(id), static_cast<uint8_t>(id >> 8),
                            static_cast<uint8_t>(id >> 16), static_cast<uint8_t>(id >> 24)};
  size_t written = 0;
  try {
    written = eventQueue_->writeToChain(*chain, event);
  } catch (const Error& error) {
    log_.warn("vsock: event buffer: {}", error.what());
  }
  eventQueue_->push(chain->head, static_cast<uint32_t>(written));
  uint64_t one = 1;
  if (eventCallFd_ >= 0 && ::write(eventCallFd_, &one, sizeof one) != sizeof one) {
    log_.warn("vsock: event queue interrupt: {}", std::strerror(errno));
  }
  if (written < sizeof event) {
    log_.warn("vsock: event buffer too small ({} bytes)", written);
    return false;
  }
  return true;
}

bool VhostVsockBackend::sendTransportReset() {
  std::lock_guard lock(mutex_);
  return sendEventLocked(vsock::kEventTransportReset);
}

void VhostVsockBackend::setGuestCid(uint64_t cid) {
  std::lock_guard lock(mutex_);
  require(cid >= vsock::kMinGuestCid && cid <= vsock::kMaxGuestCid,
          "vsock CID {}: out of range ({} to {})", cid, vsock::kMinGuestCid, vsock::kMaxGuestCid);
  bool wasRunning = running_;
  if (wasRunning) kernel_->setRunning(false);
  running_ = false;
  int error = kernel_->setGuestCid(cid);
  if (error != 0) {
    if (wasRunning) {
      kernel_->setRunning(true);
      running_ = true;
    }
    require(error != EADDRINUSE, "vsock CID {}: already in use by another VM", cid);
    throwSystemError(error, "VHOST_VSOCK_SET_GUEST_CID " + std::to_string(cid) + " on", "/dev/vhost-vsock");
  }
  uint64_t old = guestCid_;
  guestCid_ = cid;
  if (configChanged_) configChanged_();
  if (wasRunning) {
    kernel_->setRunning(true);
    running_ = true;
  }
  log_.info("vsock: guest CID {} -> {}", old, cid);
  if (active_) sendEventLocked(vsock::kEventTransportReset);
}

void VhostVsockBackend::stop() {
  std::lock_guard lock(mutex_);
  if (running_) kernel_->setRunning(false);
  running_ = false;
}

void VhostVsockBackend::start() {
  std::lock_guard lock(mutex_);
  if (!active_ || running_) return;
  kernel_->setRunning(true);
  running_ = true;
}

VhostVsockState VhostVsockBackend::saveState() {
  std::lock_guard lock(mutex_);
  require(!running_, "vsock: saveState() needs a stopped device (stop() first)");
  VhostVsockState state;
  state.guestCid = guestCid_;
  if (active_) {
    state.rxBase = kernel_->getVringBase(vsock::kRxQueue);
    state.txBase = kernel_->getVringBase(vsock::kTxQueue);
    if (eventQueue_) {
      state.eventNextAvail = eventQueue_->nextAvail();
      state.eventNextUsed = eventQueue_->nextUsed();
    }
  }
  return state;
}

void VhostVsockBackend::restoreState(const VhostVsockState& state) {
  std::lock_guard lock(mutex_);
  if (!active_) {
    pendingRestore_ = state;
    return;
  }
  bool wasRunning = running_;
  if (wasRunning) kernel_->setRunning(false);
  running_ = false;
  kernel_->setVringBase(vsock::kRxQueue, state.rxBase);
  kernel_->setVringBase(vsock::kTxQueue, state.txBase);
  if (eventQueue_) eventQueue_->restoreIndexes(state.eventNextAvail, state.eventNextUsed);
  if (wasRunning) {
    kernel_->setRunning(true);
    running_ = true;
  }
}

}  // namespace clonevm::vmm
