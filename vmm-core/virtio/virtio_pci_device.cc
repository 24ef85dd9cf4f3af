#include "vmm-core/virtio/virtio_pci_device.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <bit>

#include "common/error.h"
#include "vmm-core/virtio/virtio.h"

namespace clonevm::vmm {

using namespace virtio_pci;

namespace {

constexpr uint64_t kPage = 0x1000;
constexpr uint32_t kMaxConfigSize = 0x1000;

// Transport features this transport does not implement: the doorbell carries no data,
// there is no per-queue reset and no SR-IOV.
constexpr uint64_t kUnsupportedTransportFeatures =
    virtio::feature(virtio::kFeatureNotificationData) |
    virtio::feature(virtio::kFeatureNotifConfigData) | virtio::feature(virtio::kFeatureRingReset) |
    virtio::feature(virtio::kFeatureSrIov);

uint64_t roundUp(uint64_t value, uint64_t to) { return (value + to - 1) / to * to; }

uint64_t loadLe(std::span<const uint8_t> bytes) {
  uint64_t value = 0;
  for (size_t i = 0; i < bytes.size(); ++i) value |= uint64_t{bytes[i]} << (8 * i);
  return value;
}

void storeLe(std::span<uint8_t> bytes, uint64_t value) {
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
}

UniqueFd makeEventFd(const char* what) {
  return UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), what));
}

// Reads and so clears the eventfd's counter; returns it (0: nothing was signalled).
uint64_t drainEventFd(int fd) {
  uint64_t count = 0;
  for (;;) {
    ssize_t n = ::read(fd, &count, sizeof(count));
    if (n == sizeof(count)) return count;
    if (n < 0 && errno == EINTR) continue;
    return 0;  // EAGAIN: not signalled
  }
}

void signalEventFd(int fd) {
  uint64_t one = 1;
  for (;;) {
    ssize_t n = ::write(fd, &one, sizeof(one));
    if (n < 0 && errno == EINTR) continue;
    return;  // EAGAIN only at a counter of 2^64-2: the reader is already due
  }
}

bool eventFdReadable(int fd) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN);
}

// Size of the common config field at `offset` (0: no field starts there). The upper
// halves of the 64-bit queue addresses count as 32-bit fields of their own.
size_t commonFieldSize(uint16_t offset) {
  switch (offset) {
    case kDeviceFeatureSelect:
    case kDeviceFeature:
    case kDriverFeatureSelect:
    case kDriverFeature:
    case kQueueDesc + 4:
    case kQueueDriver + 4:
    case kQueueDevice + 4:
      return 4;
    case kMsixConfig:
    case kNumQueues:
    case kQueueSelect:
    case kQueueSize:
    case kQueueMsixVector:
    case kQueueEnable:
    case kQueueNotifyOff:
      return 2;
    case kDeviceStatus:
    case kConfigGeneration:
      return 1;
    case kQueueDesc:
    case kQueueDriver:
    case kQueueDevice:
      return 8;
    default:
      return 0;
  }
}

// Spec 4.1.3.1: the driver accesses each field with its natural width; 64-bit fields may
// also be accessed as two 32-bit halves.
bool validCommonAccess(uint16_t offset, size_t size) {
  size_t field = commonFieldSize(offset);
  return field != 0 && (size == field || (field == 8 && size == 4));
}

void setAddressPart(uint64_t& address, uint16_t offsetInField, size_t size, uint64_t value) {
  if (size == 8) {
    address = value;
  } else if (offsetInField == 0) {
    address = (address & ~0xffffffffull) | (value & 0xffffffffull);
  } else {
    address = (address & 0xffffffffull) | (value << 32);
  }
}

uint64_t addressPart(uint64_t address, uint16_t offsetInField, size_t size) {
  if (size == 8) return address;
  return offsetInField == 0 ? address & 0xffffffffull : address >> 32;
}

const VirtioDeviceBackend& checkedBackend(const std::shared_ptr<VirtioDeviceBackend>& backend) {
  require(backend != nullptr, "virtio-pci: no backend");
  uint16_t queues = backend->numQueues();
  require(queues >= 1 && queues <= kMaxQueues, "virtio-pci: {} queues (1..{} supported)", queues,
          kMaxQueues);
  uint16_t max = backend->maxQueueSize();
  require(max >= 1 && max <= virtio::kMaxQueueSize && std::has_single_bit(max),
          "virtio-pci: max queue size {} is not a power of two in 1..32768", max);
  require(backend->configSize() <= kMaxConfigSize, "virtio-pci: config space of {} bytes (max {})",
          backend->configSize(), kMaxConfigSize);
  return *backend;
}

}  // namespace

uint32_t virtio_pci::classCodeFor(uint32_t deviceType) {
  switch (deviceType) {
    case virtio::kTypeNet:
      return 0x020000;  // network, ethernet
    case virtio::kTypeBlock:
    case virtio::kTypeFs:
      return 0x018000;  // mass storage, other
    case virtio::kTypeScsi:
      return 0x010000;  // mass storage, SCSI
    case virtio::kTypeConsole:
    case virtio::kTypeVsock:
      return 0x078000;  // communication, other
    case virtio::kType9p:
      return 0x028000;  // network, other
    case virtio::kTypeBalloon:
    case virtio::kTypePmem:
      return 0x058000;  // memory controller, other
    case virtio::kTypeGpu:
      return 0x038000;  // display, other
    case virtio::kTypeInput:
      return 0x098000;  // input, other
    case virtio::kTypeIommu:
      return 0x080600;  // system peripheral, IOMMU
    default:
      return 0xff0000;  // unassigned class (QEMU's choice for virtio-rng)
  }
}

VirtioPciBarLayout VirtioPciBarLayout::forQueues(uint16_t numQueues) {
  VirtioPciBarLayout layout;
  layout.common = 0;
  layout.isr = kPage;
  layout.device = 2 * kPage;
  layout.notify = 3 * kPage;
  layout.notifyLength = uint64_t{numQueues} * kNotifyOffMultiplier;
  uint64_t vectors = uint64_t{numQueues} + 1;
  layout.msixTable = layout.notify + roundUp(layout.notifyLength, kPage);
  layout.msixPba = layout.msixTable + roundUp(vectors * kMsixEntrySize, kPage);
  uint64_t end = layout.msixPba + roundUp((vectors + 63) / 64 * 8, kPage);
  layout.size = std::bit_ceil(end);
  return layout;
}

uint64_t VirtioPciDevice::barSizeFor(const VirtioDeviceBackend& backend) {
  return VirtioPciBarLayout::forQueues(backend.numQueues()).size;
}

VirtioPciDevice::VirtioPciDevice(std::shared_ptr<VirtioDeviceBackend> backend,
                                 const GuestMemory& memory, IoEventRegistrar& ioEvents,
                                 MsiInterruptController& interrupts, spdlog::logger& log,
                                 uint64_t barAddress)
    : backend_(std::move(backend)),
      memory_(memory),
      ioEvents_(ioEvents),
      interrupts_(interrupts),
      log_(log),
      numQueues_(checkedBackend(backend_).numQueues()),
      maxQueueSize_(backend_->maxQueueSize()),
      configSize_(backend_->configSize()),
      offeredFeatures_((backend_->deviceFeatures() | virtio::feature(virtio::kFeatureVersion1)) &
                       ~kUnsupportedTransportFeatures),
      layout_(VirtioPciBarLayout::forQueues(numQueues_)),
      initialBarAddress_(barAddress),
      doorbellLength_(ioEvents.anyLengthIoeventfds() ? 0 : kNotifyAccessSize),
      config_(PciIds{.vendor = kVendorId,
                     .device = static_cast<uint16_t>(kDeviceIdBase + backend_->deviceType()),
                     .classCode = classCodeFor(backend_->deviceType()),
                     .revision = kRevision,
                     .subsystemVendor = kVendorId,
                     .subsystem = kSubsystemId}) {
  require(backend_->deviceType() > 0 && backend_->deviceType() < 0x40,
          "virtio-pci: device type {} has no PCI device id", backend_->deviceType());
  require(barAddress % layout_.size == 0, "virtio-pci: BAR address {:#x} not aligned to {:#x}",
          barAddress, layout_.size);
  queues_.resize(numQueues_);
  for (auto& queue : queues_) {
    queue.size = maxQueueSize_;
    queue.kick = makeEventFd("eventfd for a virtio queue kick");
    queue.call = makeEventFd("eventfd for a virtio queue interrupt");
  }
  configFd_ = makeEventFd("eventfd for a virtio config interrupt");
  msixTable_.resize(size_t{numQueues_} + 1);
  buildConfigSpace();
}

VirtioPciDevice::~VirtioPciDevice() {
  std::lock_guard lock(mutex_);
  // The backend may outlive us (shared_ptr) but must stop using our eventfds, which close
  // now and whose numbers the process may reuse.
  if (activated_) {
    try {
      backend_->reset();
    } catch (const std::exception& e) {
      log_.warn("virtio-pci: backend reset: {}", e.what());
    }
  }
  unregisterDoorbellsLocked();
  for (const auto& [fd, gsi] : irqfds_) {
    try {
      interrupts_.removeIrqfd(fd, gsi);
    } catch (const std::exception& e) {
      log_.warn("virtio-pci: {}", e.what());
    }
  }
  for (const auto& [vector, route] : routes_) {
    try {
      interrupts_.removeMsiRoute(route.gsi);
    } catch (const std::exception& e) {
      log_.warn("virtio-pci: {}", e.what());
    }
  }
}

void VirtioPciDevice::buildConfigSpace() {
  auto addVirtioCap = [this](uint8_t type, uint8_t length, uint64_t offset, uint64_t size) {
    uint16_t cap = config_.addCapability(kCapIdVendor, length);
    config_.set8(cap + 2, length);  // cap_len
    config_.set8(cap + kCapCfgType, type);
    config_.set8(cap + kCapBar, 0);
    config_.set32(cap + kCapOffset, static_cast<uint32_t>(offset));
    config_.set32(cap + kCapLength, static_cast<uint32_t>(size));
    return cap;
  };
  addVirtioCap(kCapCommon, 16, layout_.common, kCommonConfigSize);
  uint16_t notify = addVirtioCap(kCapNotify, 20, layout_.notify, layout_.notifyLength);
  config_.set32(notify + kCapNotifyMultiplier, kNotifyOffMultiplier);
  addVirtioCap(kCapIsr, 16, layout_.isr, 1);
  // Only devices with a device config have this one (Linux treats it as optional).
  if (configSize_ > 0) addVirtioCap(kCapDevice, 16, layout_.device, configSize_);
  // The spec wants this window for drivers that cannot map BARs (firmware); the driver
  // picks BAR, offset and length, then reads or writes pci_cfg_data.
  pciCfgCap_ = addVirtioCap(kCapPciCfg, 20, 0, 0);
  const uint8_t byte[1] = {0xff};
  const uint8_t dword[4] = {0xff, 0xff, 0xff, 0xff};
  config_.setWritable(pciCfgCap_ + kCapBar, byte);
  config_.setWritable(pciCfgCap_ + kCapOffset, dword);
  config_.setWritable(pciCfgCap_ + kCapLength, dword);
  config_.setWritable(pciCfgCap_ + kCapPciCfgData, dword);

  msixCap_ = config_.addCapability(kCapIdMsix, 12);
  config_.set16(msixCap_ + kMsixControl, static_cast<uint16_t>(msixTable_.size() - 1));
  const uint8_t control[2] = {0x00, 0xc0};  // enable and function mask; table size read-only
  config_.setWritable(msixCap_ + kMsixControl, control);
  config_.set32(msixCap_ + kMsixTable, static_cast<uint32_t>(layout_.msixTable));  // BIR 0
  config_.set32(msixCap_ + kMsixPba, static_cast<uint32_t>(layout_.msixPba));
}

// ---------------------------------------------------------------------------------------
// PCI config space.

void VirtioPciDevice::readConfig(uint16_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  uint16_t window = pciCfgCap_ + kCapPciCfgData;
  if (offset < window + 4 && offset + data.size() > window) pciCfgAccessLocked(false);
  config_.read(offset, data);
}

void VirtioPciDevice::writeConfig(uint16_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  config_.write(offset, data);
  uint16_t window = pciCfgCap_ + kCapPciCfgData;
  if (offset < window + 4 && offset + data.size() > window) pciCfgAccessLocked(true);
  uint16_t control = msixCap_ + kMsixControl;
  if (offset < control + 2 && offset + data.size() > control) syncInterruptsLocked();
}

void VirtioPciDevice::pciCfgAccessLocked(bool write) {
  uint8_t bar = config_.get8(pciCfgCap_ + kCapBar);
  uint32_t offset = config_.get32(pciCfgCap_ + kCapOffset);
  uint32_t length = config_.get32(pciCfgCap_ + kCapLength);
  bool valid = bar == 0 && (length == 1 || length == 2 || length == 4) && offset % length == 0 &&
               uint64_t{offset} + length <= layout_.size;
  if (!valid) {
    log_.debug("virtio-pci: PCI_CFG window access to BAR {} at {:#x}+{} ignored", bar, offset,
               length);
    return;
  }
  uint8_t bytes[4] = {};
  if (write) {
    for (uint32_t i = 0; i < length; ++i) bytes[i] = config_.get8(pciCfgCap_ + kCapPciCfgData + i);
    barWriteLocked(offset, {bytes, length});
  } else {
    barReadLocked(offset, {bytes, length});
    for (uint32_t i = 0; i < 4; ++i) config_.set8(pciCfgCap_ + kCapPciCfgData + i, bytes[i]);
  }
}

std::array<PciBar, kPciBarCount> VirtioPciDevice::bars() const {
  std::array<PciBar, kPciBarCount> bars{};
  bars[0] = PciBar{.type = PciBarType::kMmio64,
                   .size = layout_.size,
                   .prefetchable = false,  // the MSI-X table is in it
                   .address = initialBarAddress_};
  return bars;
}

void VirtioPciDevice::barMoved(int index, std::optional<uint64_t> oldAddress,
                               std::optional<uint64_t> newAddress) {
  if (index != 0) return;
  std::lock_guard lock(mutex_);
  log_.debug("virtio-pci: BAR 0 moved from {:#x} to {:#x}", oldAddress.value_or(0),
             newAddress.value_or(0));
  unregisterDoorbellsLocked();
  if (newAddress) registerDoorbellsLocked(*newAddress);
}

void VirtioPciDevice::registerDoorbellsLocked(uint64_t barBase) {
  for (uint16_t i = 0; i < numQueues_; ++i) {
    uint64_t address = barBase + layout_.notify + uint64_t{i} * kNotifyOffMultiplier;
    try {
      ioEvents_.addIoeventfd(address, doorbellLength_, queues_[i].kick.get());
      doorbells_.emplace_back(address, queues_[i].kick.get());
    } catch (const std::exception& e) {
      // The doorbell still works, through an exit to the core (notifyWriteLocked).
      log_.error("virtio-pci: queue {} doorbell at {:#x} stays in userspace: {}", i, address,
                 e.what());
    }
  }
}

void VirtioPciDevice::unregisterDoorbellsLocked() {
  for (const auto& [address, fd] : doorbells_) {
    try {
      ioEvents_.removeIoeventfd(address, doorbellLength_, fd);
    } catch (const std::exception& e) {
      log_.error("virtio-pci: removing the doorbell at {:#x}: {}", address, e.what());
    }
  }
  doorbells_.clear();
}

// ---------------------------------------------------------------------------------------
// BAR 0.

void VirtioPciDevice::read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  barReadLocked(offset, data);
}

void VirtioPciDevice::write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  barWriteLocked(offset, data);
}

namespace {
bool inside(uint64_t offset, size_t size, uint64_t start, uint64_t length) {
  return offset >= start && offset - start < length && size <= length - (offset - start);
}
}  // namespace

void VirtioPciDevice::barReadLocked(uint64_t offset, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), 0);
  size_t size = data.size();
  if (size == 0 || size > 8) return;
  uint64_t vectors = msixTable_.size();
  if (inside(offset, size, layout_.common, kCommonConfigSize)) {
    auto field = static_cast<uint16_t>(offset - layout_.common);
    if (!validCommonAccess(field, size)) {
      log_.debug("virtio-pci: {}-byte common config read at {:#x} ignored", size, field);
      return;
    }
    storeLe(data, commonReadLocked(field, size));
  } else if (offset == layout_.isr) {
    data[0] = isr_.exchange(0);  // reading ISR clears it (spec 4.1.4.5)
  } else if (configSize_ > 0 && inside(offset, size, layout_.device, configSize_)) {
    try {
      backend_->readConfig(static_cast<uint32_t>(offset - layout_.device), data);
    } catch (const std::exception& e) {
      log_.warn("virtio-pci: device config read at {:#x}: {}", offset - layout_.device, e.what());
      std::fill(data.begin(), data.end(), 0);
    }
  } else if (inside(offset, size, layout_.msixTable, vectors * kMsixEntrySize) ||
             inside(offset, size, layout_.msixPba, (vectors + 63) / 64 * 8)) {
    storeLe(data, msixReadLocked(offset, size));
  }
  // The notify area and the gaps between structures read as 0.
}

void VirtioPciDevice::barWriteLocked(uint64_t offset, std::span<const uint8_t> data) {
  size_t size = data.size();
  if (size == 0 || size > 8) return;
  uint64_t vectors = msixTable_.size();
  if (inside(offset, size, layout_.common, kCommonConfigSize)) {
    auto field = static_cast<uint16_t>(offset - layout_.common);
    if (!validCommonAccess(field, size)) {
      log_.debug("virtio-pci: {}-byte common config write at {:#x} ignored", size, field);
      return;
    }
    commonWriteLocked(field, size, loadLe(data));
  } else if (configSize_ > 0 && inside(offset, size, layout_.device, configSize_)) {
    try {
      backend_->writeConfig(static_cast<uint32_t>(offset - layout_.device), data);
    } catch (const std::exception& e) {
      log_.warn("virtio-pci: device config write at {:#x}: {}", offset - layout_.device,
                e.what());
    }
  } else if (inside(offset, size, layout_.notify, layout_.notifyLength)) {
    notifyWriteLocked(offset - layout_.notify, size);
  } else if (inside(offset, size, layout_.msixTable, vectors * kMsixEntrySize)) {
    msixWriteLocked(offset, size, loadLe(data));
  }
  // ISR, the PBA and the gaps are read-only.
}

void VirtioPciDevice::notifyWriteLocked(uint64_t offset, size_t size) {
  // Normally KVM's ioeventfd takes the doorbell; this path serves the rest (before the BAR
  // is decoded, other access widths, the PCI_CFG window). The written value is not used.
  if (offset % kNotifyOffMultiplier != 0) {
    log_.debug("virtio-pci: {}-byte doorbell write at notify+{:#x} ignored", size, offset);
    return;
  }
  ++doorbellExits_;
  signalEventFd(queues_[offset / kNotifyOffMultiplier].kick.get());
}

// ---------------------------------------------------------------------------------------
// Common config.

VirtioPciDevice::Queue* VirtioPciDevice::selectedQueue() {
  return queueSelect_ < numQueues_ ? &queues_[queueSelect_] : nullptr;
}

bool VirtioPciDevice::negotiated(unsigned bit) const {
  return (negotiatedFeatures_ & virtio::feature(bit)) != 0;
}

uint64_t VirtioPciDevice::commonReadLocked(uint16_t offset, size_t size) {
  const Queue* queue = selectedQueue();
  switch (offset) {
    case kDeviceFeatureSelect:
      return deviceFeatureSelect_;
    case kDeviceFeature:
      return deviceFeatureSelect_ < 2 ? (offeredFeatures_ >> (32 * deviceFeatureSelect_)) &
                                            0xffffffffull
                                      : 0;
    case kDriverFeatureSelect:
      return driverFeatureSelect_;
    case kDriverFeature:
      return driverFeatureSelect_ < 2 ? (driverFeatures_ >> (32 * driverFeatureSelect_)) &
                                            0xffffffffull
                                      : 0;
    case kMsixConfig:
      return configVector_;
    case kNumQueues:
      return numQueues_;
    case kDeviceStatus:
      return status_.load();
    case kConfigGeneration:
      return generation_.load();
    case kQueueSelect:
      return queueSelect_;
    default:
      break;
  }
  // Queue fields: a queue_select past num_queues reads as an absent queue, all zeros.
  if (queue == nullptr) return 0;
  switch (offset) {
    case kQueueSize:
      return queue->size;
    case kQueueMsixVector:
      return queue->vector;
    case kQueueEnable:
      return queue->enabled ? 1 : 0;
    case kQueueNotifyOff:
      return queueSelect_;  // doorbell at notify + queueSelect * multiplier
    case kQueueDesc:
    case kQueueDesc + 4:
      return addressPart(queue->desc, offset - kQueueDesc, size);
    case kQueueDriver:
    case kQueueDriver + 4:
      return addressPart(queue->driver, offset - kQueueDriver, size);
    case kQueueDevice:
    case kQueueDevice + 4:
      return addressPart(queue->device, offset - kQueueDevice, size);
    default:
      return 0;
  }
}

uint16_t VirtioPciDevice::acceptedVector(uint16_t vector) const {
  // Reading back NO_VECTOR tells the driver the vector was refused (spec 4.1.5.1.2.1).
  return vector < msixTable_.size() ? vector : kNoVector;
}

bool VirtioPciDevice::validQueueSize(uint16_t size) const {
  if (size == 0 || size > maxQueueSize_) return false;
  // Split rings need a power of two; packed rings take any size (spec 2.7).
  return negotiated(virtio::kFeatureRingPacked) || std::has_single_bit(size);
}

void VirtioPciDevice::commonWriteLocked(uint16_t offset, size_t size, uint64_t value) {
  uint8_t status = status_.load();
  switch (offset) {
    case kDeviceFeatureSelect:
      deviceFeatureSelect_ = static_cast<uint32_t>(value);
      return;
    case kDriverFeatureSelect:
      driverFeatureSelect_ = static_cast<uint32_t>(value);
      return;
    case kDriverFeature: {
      // Features are fixed once the device accepted them (spec 3.1.1).
      if ((status & virtio::kStatusFeaturesOk) || driverFeatureSelect_ >= 2) {
        log_.debug("virtio-pci: driver_feature write ignored (select {}, status {:#x})",
                   driverFeatureSelect_, status);
        return;
      }
      unsigned shift = 32 * driverFeatureSelect_;
      driverFeatures_ = (driverFeatures_ & ~(0xffffffffull << shift)) | (value << shift);
      return;
    }
    case kMsixConfig:
      configVector_ = acceptedVector(static_cast<uint16_t>(value));
      syncInterruptsLocked();
      return;
    case kDeviceStatus:
      statusWriteLocked(static_cast<uint8_t>(value));
      return;
    case kQueueSelect:
      queueSelect_ = static_cast<uint16_t>(value);
      return;
    case kDeviceFeature:
    case kNumQueues:
    case kConfigGeneration:
    case kQueueNotifyOff:
      return;  // read-only
    default:
      break;
  }

  Queue* queue = selectedQueue();
  if (queue == nullptr) {
    log_.debug("virtio-pci: write to queue field {:#x} of absent queue {} ignored", offset,
               queueSelect_);
    return;
  }
  if (offset == kQueueMsixVector) {
    // Allowed at any time: Linux also rewrites it (to NO_VECTOR) when tearing down.
    queue->vector = acceptedVector(static_cast<uint16_t>(value));
    syncInterruptsLocked();
    return;
  }
  // The rest of a queue's setup is fixed once it is enabled or the device is live.
  if (queue->enabled || (status & virtio::kStatusDriverOk)) {
    log_.debug("virtio-pci: write to field {:#x} of live queue {} ignored", offset, queueSelect_);
    return;
  }
  switch (offset) {
    case kQueueSize:
      if (validQueueSize(static_cast<uint16_t>(value))) {
        queue->size = static_cast<uint16_t>(value);
      } else {
        log_.debug("virtio-pci: queue {} size {} refused (max {})", queueSelect_, value,
                   maxQueueSize_);
      }
      return;
    case kQueueEnable:
      // Writing 0 is not allowed (spec 4.1.4.3.2); a queue is disabled by reset only.
      if (value == 1) {
        queue->enabled = true;
        syncInterruptsLocked();
      }
      return;
    case kQueueDesc:
    case kQueueDesc + 4:
      setAddressPart(queue->desc, offset - kQueueDesc, size, value);
      return;
    case kQueueDriver:
    case kQueueDriver + 4:
      setAddressPart(queue->driver, offset - kQueueDriver, size, value);
      return;
    case kQueueDevice:
    case kQueueDevice + 4:
      setAddressPart(queue->device, offset - kQueueDevice, size, value);
      return;
    default:
      return;
  }
}

bool VirtioPciDevice::featuresAcceptableLocked(uint64_t features) {
  if ((features & ~offeredFeatures_) != 0) {
    log_.info("virtio-pci: driver accepted features {:#x} that were not offered ({:#x})",
              features & ~offeredFeatures_, offeredFeatures_);
    return false;
  }
  if (!(features & virtio::feature(virtio::kFeatureVersion1))) {
    log_.info("virtio-pci: driver did not accept VIRTIO_F_VERSION_1 (a legacy driver?)");
    return false;
  }
  try {
    return backend_->acceptFeatures(features);
  } catch (const std::exception& e) {
    log_.warn("virtio-pci: backend refused features {:#x}: {}", features, e.what());
    return false;
  }
}

void VirtioPciDevice::statusWriteLocked(uint8_t value) {
  using namespace virtio;
  uint8_t old = status_.load();
  if (value == 0) {
    resetLocked();
    return;
  }
  // DEVICE_NEEDS_RESET belongs to the device; the driver writes back what it read.
  uint8_t oldDriverBits = old & ~kStatusNeedsReset;
  uint8_t requested = value & ~kStatusNeedsReset;
  if ((requested & oldDriverBits) != oldDriverBits) {
    log_.debug("virtio-pci: status {:#x} -> {:#x} clears bits; ignored", old, value);
    return;
  }
  uint8_t added = requested & ~oldDriverBits;
  if (added & kStatusFeaturesOk) {
    bool ok = (requested & kStatusAcknowledge) && (requested & kStatusDriver) &&
              featuresAcceptableLocked(driverFeatures_);
    if (ok) {
      negotiatedFeatures_ = driverFeatures_;
    } else {
      // The driver re-reads the status, sees FEATURES_OK clear and gives up (spec 3.1.1).
      requested &= ~kStatusFeaturesOk;
      added &= ~kStatusFeaturesOk;
    }
  }
  if ((added & kStatusDriverOk) && !(requested & kStatusFeaturesOk)) {
    log_.info("virtio-pci: DRIVER_OK without FEATURES_OK ignored");
    requested &= ~kStatusDriverOk;
    added &= ~kStatusDriverOk;
  }
  status_ = static_cast<uint8_t>(requested | (old & kStatusNeedsReset));
  if ((added & kStatusDriverOk) && !(old & kStatusNeedsReset)) activateLocked();
  uint8_t now = status_.load();
  if (now == old) return;
  try {
    backend_->statusChanged(old, now);
  } catch (const std::exception& e) {
    log_.warn("virtio-pci: backend status change {:#x} -> {:#x}: {}", old, now, e.what());
  }
}

bool VirtioPciDevice::activateLocked() {
  bool packed = negotiated(virtio::kFeatureRingPacked);
  VirtioActivationInfo info;
  info.memory = &memory_;
  info.features = negotiatedFeatures_;
  info.configChanged = [this] { signalConfigChange(); };
  for (uint16_t i = 0; i < numQueues_; ++i) {
    const Queue& queue = queues_[i];
    if (!queue.enabled) continue;
    if (!validQueueSize(queue.size)) {
      needsResetLocked(fmt::format("queue {} has size {}", i, queue.size));
      return false;
    }
    struct Part {
      const char* name;
      uint64_t address;
      uint64_t length;
      uint64_t align;
    };
    const Part parts[3] = {
        {"descriptor area", queue.desc,
         packed ? virtio::packedDescRingSize(queue.size) : virtio::splitDescTableSize(queue.size),
         packed ? virtio::kPackedDescAlign : virtio::kSplitDescAlign},
        {"driver area", queue.driver,
         packed ? virtio::kPackedEventSuppressionSize : virtio::splitAvailRingSize(queue.size),
         packed ? virtio::kPackedEventAlign : virtio::kSplitAvailAlign},
        {"device area", queue.device,
         packed ? virtio::kPackedEventSuppressionSize : virtio::splitUsedRingSize(queue.size),
         packed ? virtio::kPackedEventAlign : virtio::kSplitUsedAlign},
    };
    for (const Part& part : parts) {
      if (part.address % part.align != 0 || !memory_.contains(part.address, part.length)) {
        needsResetLocked(fmt::format("queue {} {} {:#x}+{:#x} is misaligned or outside guest memory",
                                     i, part.name, part.address, part.length));
        return false;
      }
    }
    info.queues.push_back(VirtioQueueInfo{.index = i,
                                          .size = queue.size,
                                          .descTable = queue.desc,
                                          .availRing = queue.driver,
                                          .usedRing = queue.device,
                                          .kickFd = queue.kick.get(),
                                          .callFd = queue.call.get()});
  }
  try {
    backend_->activate(info);
  } catch (const std::exception& e) {
    needsResetLocked(fmt::format("backend activation failed: {}", e.what()));
    return false;
  }
  activated_ = true;
  log_.debug("virtio-pci: device type {} activated with features {:#x}, {} queues",
             backend_->deviceType(), negotiatedFeatures_, info.queues.size());
  return true;
}

void VirtioPciDevice::needsResetLocked(const std::string& why) {
  log_.warn("virtio-pci: device type {} needs reset: {}", backend_->deviceType(), why);
  status_ |= virtio::kStatusNeedsReset;
  // Spec 2.1.2: a device that sets DEVICE_NEEDS_RESET after DRIVER_OK notifies the driver.
  signalConfigChange();
}

void VirtioPciDevice::signalConfigChange() {
  generation_.fetch_add(1);
  if (!(status_.load() & virtio::kStatusDriverOk)) return;
  isr_ |= kIsrConfig;
  signalEventFd(configFd_.get());
}

void VirtioPciDevice::resetLocked() {
  try {
    backend_->reset();
  } catch (const std::exception& e) {
    log_.warn("virtio-pci: backend reset: {}", e.what());
  }
  activated_ = false;
  status_ = 0;
  isr_ = 0;
  deviceFeatureSelect_ = 0;
  driverFeatureSelect_ = 0;
  driverFeatures_ = 0;
  negotiatedFeatures_ = 0;
  configVector_ = kNoVector;
  queueSelect_ = 0;
  for (auto& queue : queues_) {
    queue.size = maxQueueSize_;
    queue.vector = kNoVector;
    queue.enabled = false;
    queue.desc = queue.driver = queue.device = 0;
  }
  syncInterruptsLocked();  // no queue and no config vector left: all irqfds and routes go
  // Stale kicks and interrupts from before the reset must not reach the next driver.
  for (auto& queue : queues_) {
    drainEventFd(queue.kick.get());
    drainEventFd(queue.call.get());
  }
  drainEventFd(configFd_.get());
}

// ---------------------------------------------------------------------------------------
// MSI-X.

uint16_t VirtioPciDevice::msixControl() const { return config_.get16(msixCap_ + kMsixControl); }

bool VirtioPciDevice::vectorMasked(uint16_t vector) const {
  return (msixControl() & kMsixControlFunctionMask) ||
         (msixTable_[vector].control & kMsixEntryMasked);
}

uint64_t VirtioPciDevice::msixReadLocked(uint64_t offset, size_t size) {
  // The table and PBA are accessed as aligned dwords or qwords (PCI 3.0 6.8.2).
  if ((size != 4 && size != 8) || offset % size != 0) {
    log_.debug("virtio-pci: {}-byte MSI-X read at {:#x} ignored", size, offset);
    return 0;
  }
  auto dword = [this](uint64_t at) -> uint32_t {
    if (at >= layout_.msixPba) {
      // Pending: a masked vector whose eventfds were signalled while no irqfd listened.
      uint64_t first = (at - layout_.msixPba) * 8;
      bool enabled = msixControl() & kMsixControlEnable;
      uint32_t bits = 0;
      for (uint64_t v = first; v < first + 32 && v < msixTable_.size(); ++v) {
        auto vector = static_cast<uint16_t>(v);
        if (!enabled || !vectorMasked(vector)) continue;
        bool pending = configVector_ == vector && eventFdReadable(configFd_.get());
        for (const auto& queue : queues_) {
          if (queue.enabled && queue.vector == vector && eventFdReadable(queue.call.get())) {
            pending = true;
          }
        }
        if (pending) bits |= 1u << (v - first);
      }
      return bits;
    }
    const MsixEntry& entry = msixTable_[(at - layout_.msixTable) / kMsixEntrySize];
    switch ((at - layout_.msixTable) % kMsixEntrySize) {
      case 0:
        return entry.addressLow;
      case 4:
        return entry.addressHigh;
      case 8:
        return entry.data;
      default:
        return entry.control;
    }
  };
  uint64_t value = dword(offset);
  if (size == 8) value |= uint64_t{dword(offset + 4)} << 32;
  return value;
}

void VirtioPciDevice::msixWriteLocked(uint64_t offset, size_t size, uint64_t value) {
  if ((size != 4 && size != 8) || offset % size != 0) {
    log_.debug("virtio-pci: {}-byte MSI-X write at {:#x} ignored", size, offset);
    return;
  }
  for (size_t part = 0; part < size / 4; ++part) {
    uint64_t at = offset - layout_.msixTable + part * 4;
    auto dword = static_cast<uint32_t>(value >> (32 * part));
    MsixEntry& entry = msixTable_[at / kMsixEntrySize];
    switch (at % kMsixEntrySize) {
      case 0:
        entry.addressLow = dword & ~0x3u;  // dword aligned
        break;
      case 4:
        entry.addressHigh = dword;
        break;
      case 8:
        entry.data = dword;
        break;
      default:
        entry.control = dword & kMsixEntryMasked;
        break;
    }
  }
  syncInterruptsLocked();
}

void VirtioPciDevice::syncInterruptsLocked() {
  // Brings the kernel (routes and irqfds) in line with the guest's MSI-X state, changing
  // only what differs:
  // - a vector that a queue or the config uses has an MSI route while MSI-X is enabled;
  //   the route carries the table entry as of the last time the vector was unmasked;
  // - an event source is an irqfd on its vector's route while the vector is unmasked.
  bool enabled = msixControl() & kMsixControlEnable;
  auto tableSize = msixTable_.size();
  std::map<int, uint16_t> sources;  // eventfd -> vector
  if (configVector_ < tableSize) sources[configFd_.get()] = configVector_;
  for (const auto& queue : queues_) {
    if (queue.enabled && queue.vector < tableSize) sources[queue.call.get()] = queue.vector;
  }
  auto deliverable = [&](uint16_t vector) { return enabled && !vectorMasked(vector); };
  auto wantedGsi = [&](int fd) -> std::optional<uint32_t> {
    auto source = sources.find(fd);
    if (source == sources.end() || !deliverable(source->second)) return std::nullopt;
    auto route = routes_.find(source->second);
    if (route == routes_.end()) return std::nullopt;
    return route->second.gsi;
  };

  try {
    for (auto it = irqfds_.begin(); it != irqfds_.end();) {
      if (wantedGsi(it->first) == it->second) {
        ++it;
        continue;
      }
      interrupts_.removeIrqfd(it->first, it->second);
      it = irqfds_.erase(it);
    }
    for (auto it = routes_.begin(); it != routes_.end();) {
      bool used = enabled && std::any_of(sources.begin(), sources.end(), [&](const auto& source) {
                    return source.second == it->first;
                  });
      if (used) {
        ++it;
        continue;
      }
      interrupts_.removeMsiRoute(it->second.gsi);
      it = routes_.erase(it);
    }
    for (const auto& [fd, vector] : sources) {
      if (!deliverable(vector)) continue;
      MsiMessage message = msixTable_[vector].message();
      auto route = routes_.find(vector);
      if (route == routes_.end()) {
        uint32_t gsi = interrupts_.addMsiRoute(message);
        route = routes_.emplace(vector, Route{gsi, message}).first;
      } else if (route->second.message != message) {
        interrupts_.updateMsiRoute(route->second.gsi, message);
        route->second.message = message;
      }
      std::pair<int, uint32_t> irqfd{fd, route->second.gsi};
      if (irqfds_.contains(irqfd)) continue;
      // What was signalled while nobody listened (masked: the PBA showed it) is delivered
      // once now, through the irqfd, so KVM sees exactly one edge.
      bool pending = drainEventFd(fd) != 0;
      try {
        interrupts_.addIrqfd(fd, route->second.gsi);
      } catch (...) {
        if (pending) signalEventFd(fd);  // keep it pending (PBA) rather than lose it
        throw;
      }
      irqfds_.insert(irqfd);
      if (pending) signalEventFd(fd);
    }
  } catch (const std::exception& e) {
    // The bookkeeping holds what the kernel has; the device cannot interrupt as asked.
    needsResetLocked(fmt::format("MSI-X routing failed: {}", e.what()));
  }
}

// ---------------------------------------------------------------------------------------
// Snapshot.

VirtioPciState VirtioPciDevice::saveState() const {
  std::lock_guard lock(mutex_);
  VirtioPciState state;
  auto& r = state.registers;
  r.command = config_.get16(pci::kCommand);
  r.interruptLine = config_.get8(pci::kInterruptLine);
  r.msixControl = msixControl();
  r.pciCfgBar = config_.get8(pciCfgCap_ + kCapBar);
  r.pciCfgOffset = config_.get32(pciCfgCap_ + kCapOffset);
  r.pciCfgLength = config_.get32(pciCfgCap_ + kCapLength);
  r.deviceFeatureSelect = deviceFeatureSelect_;
  r.driverFeatureSelect = driverFeatureSelect_;
  r.driverFeatures = driverFeatures_;
  r.negotiatedFeatures = negotiatedFeatures_;
  r.configVector = configVector_;
  r.queueSelect = queueSelect_;
  r.status = status_.load();
  r.generation = generation_.load();
  r.isr = isr_.load();
  r.activated = activated_;
  // Signalled but not delivered (masked vector, or raced with the pause): the eventfd holds it.
  r.configInterruptPending = eventFdReadable(configFd_.get());
  for (const Queue& queue : queues_) {
    state.queues.push_back({.size = queue.size,
                            .vector = queue.vector,
                            .enabled = queue.enabled,
                            .interruptPending = eventFdReadable(queue.call.get()),
                            .desc = queue.desc,
                            .driver = queue.driver,
                            .device = queue.device});
  }
  for (const MsixEntry& entry : msixTable_) state.msixTable.push_back(entry);
  return state;
}

void VirtioPciDevice::restoreState(const VirtioPciState& state) {
  std::lock_guard lock(mutex_);
  const auto& r = state.registers;
  require(!activated_ && status_.load() == 0, "virtio-pci: restore into a device already in use");
  require(state.queues.size() == numQueues_ && state.msixTable.size() == msixTable_.size(),
          "virtio-pci: saved state has {} queues and {} MSI-X vectors, this device type {} has {} and {}",
          state.queues.size(), state.msixTable.size(), backend_->deviceType(), numQueues_,
          msixTable_.size());
  require((r.negotiatedFeatures & ~offeredFeatures_) == 0 &&
              (r.driverFeatures & ~offeredFeatures_) == 0,
          "virtio-pci: saved features {:#x} are not all offered by this device ({:#x})",
          r.negotiatedFeatures, offeredFeatures_);
  // Only the fields a driver can write, through the same masks a guest write goes through.
  auto writeConfig16 = [this](uint16_t offset, uint16_t value) {
    const uint8_t bytes[2] = {static_cast<uint8_t>(value), static_cast<uint8_t>(value >> 8)};
    config_.write(offset, bytes);
  };
  auto writeConfig32 = [this](uint16_t offset, uint32_t value) {
    uint8_t bytes[4];
    storeLe(bytes, value);
    config_.write(offset, bytes);
  };
  writeConfig16(pci::kCommand, r.command);
  const uint8_t line[1] = {r.interruptLine};
  config_.write(pci::kInterruptLine, line);
  writeConfig16(msixCap_ + kMsixControl, r.msixControl);
  const uint8_t bar[1] = {r.pciCfgBar};
  config_.write(pciCfgCap_ + kCapBar, bar);
  writeConfig32(pciCfgCap_ + kCapOffset, r.pciCfgOffset);
  writeConfig32(pciCfgCap_ + kCapLength, r.pciCfgLength);

  deviceFeatureSelect_ = r.deviceFeatureSelect;
  driverFeatureSelect_ = r.driverFeatureSelect;
  driverFeatures_ = r.driverFeatures;
  negotiatedFeatures_ = r.negotiatedFeatures;
  configVector_ = acceptedVector(r.configVector);
  queueSelect_ = r.queueSelect;
  generation_ = r.generation;
  isr_ = r.isr;
  for (size_t i = 0; i < queues_.size(); ++i) {
    const auto& saved = state.queues[i];
    require(validQueueSize(saved.size), "virtio-pci: saved queue {} has size {}", i, saved.size);
    queues_[i].size = saved.size;
    queues_[i].vector = acceptedVector(saved.vector);
    queues_[i].enabled = saved.enabled != 0;
    queues_[i].desc = saved.desc;
    queues_[i].driver = saved.driver;
    queues_[i].device = saved.device;
  }
  for (size_t i = 0; i < msixTable_.size(); ++i) {
    static_cast<VirtioPciState::MsixEntry&>(msixTable_[i]) = state.msixTable[i];
  }
  status_ = r.status;
  syncInterruptsLocked();
  // activateLocked() checks every ring address against guest memory again, as a driver's
  // DRIVER_OK would; a failure leaves the device needing a reset, which the driver sees.
  if (r.activated && !(r.status & virtio::kStatusNeedsReset)) activateLocked();
  if (r.configInterruptPending) signalEventFd(configFd_.get());
  for (size_t i = 0; i < queues_.size(); ++i) {
    if (state.queues[i].interruptPending) signalEventFd(queues_[i].call.get());
  }
}

}  // namespace clonevm::vmm
