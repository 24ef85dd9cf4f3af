#pragma once
// The virtio-pci modern transport (virtio 1.2 section 4.1) for any VirtioDeviceBackend.
//
// PCI identity: vendor 0x1af4, device 0x1040 + type, revision 1 (non-transitional),
// subsystem 0x1af4:0x0040, a class per device type, no INTx (interrupt pin 0): MSI-X only.
//
// BAR 0 is one 64-bit memory BAR holding, at 4 KiB-aligned offsets:
//   common config | ISR | device config | notify doorbells | MSI-X table | MSI-X PBA
// and the capability list points at each with a vendor capability (0x09), plus the
// VIRTIO_PCI_CAP_PCI_CFG window (an alternative access to BAR 0 through config space) and
// the MSI-X capability (0x11). Vector table size is numQueues + 1.
//
// The data path never exits to the core:
// - Each queue has a kick eventfd, registered as an ioeventfd on its doorbell (a 2-byte
//   write at BAR 0 + notify + 4 * queue; any width where KVM allows, for its fast MMIO
//   path) wherever the guest decodes BAR 0, moved when the BAR moves (barMoved). A doorbell write that still reaches the core (other width, the
//   PCI_CFG window) signals the same eventfd.
// - Each queue has a call eventfd, and the device one config eventfd. For every MSI-X
//   vector that a queue or the config uses, the transport allocates a GSI with an MSI route
//   carrying the guest's table entry and registers the eventfds as irqfds on it. A masked
//   vector (entry or function mask) has its irqfds removed; what the backend signals
//   meanwhile stays in the eventfd and shows in the PBA, and is delivered once on unmask.
//
// Threading: PciRoot calls the PciDevice methods with its lock held; vCPU threads call
// read/write (BAR 0 MMIO) concurrently. One internal mutex serializes all of them (lock
// order: root, then device). signalConfigChange() takes no lock.

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/pci_config.h"
#include "vmm-core/devices/pci_device.h"
#include "vmm-core/kvm/device_events.h"
#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/virtio/virtio_backend.h"

namespace clonevm::vmm {

namespace virtio_pci {
inline constexpr uint16_t kVendorId = 0x1af4;
inline constexpr uint16_t kDeviceIdBase = 0x1040;
inline constexpr uint8_t kRevision = 1;
inline constexpr uint16_t kSubsystemId = 0x0040;  // non-transitional: >= 0x40

// cfg_type of struct virtio_pci_cap.
inline constexpr uint8_t kCapCommon = 1;
inline constexpr uint8_t kCapNotify = 2;
inline constexpr uint8_t kCapIsr = 3;
inline constexpr uint8_t kCapDevice = 4;
inline constexpr uint8_t kCapPciCfg = 5;
// struct virtio_pci_cap field offsets (the notify cap adds notify_off_multiplier, the
// PCI_CFG cap pci_cfg_data, both at 16).
inline constexpr uint16_t kCapCfgType = 3;
inline constexpr uint16_t kCapBar = 4;
inline constexpr uint16_t kCapOffset = 8;
inline constexpr uint16_t kCapLength = 12;
inline constexpr uint16_t kCapNotifyMultiplier = 16;
inline constexpr uint16_t kCapPciCfgData = 16;

// struct virtio_pci_common_cfg.
inline constexpr uint16_t kDeviceFeatureSelect = 0x00;
inline constexpr uint16_t kDeviceFeature = 0x04;
inline constexpr uint16_t kDriverFeatureSelect = 0x08;
inline constexpr uint16_t kDriverFeature = 0x0c;
inline constexpr uint16_t kMsixConfig = 0x10;
inline constexpr uint16_t kNumQueues = 0x12;
inline constexpr uint16_t kDeviceStatus = 0x14;
inline constexpr uint16_t kConfigGeneration = 0x15;
inline constexpr uint16_t kQueueSelect = 0x16;
inline constexpr uint16_t kQueueSize = 0x18;
inline constexpr uint16_t kQueueMsixVector = 0x1a;
inline constexpr uint16_t kQueueEnable = 0x1c;
inline constexpr uint16_t kQueueNotifyOff = 0x1e;
inline constexpr uint16_t kQueueDesc = 0x20;
inline constexpr uint16_t kQueueDriver = 0x28;
inline constexpr uint16_t kQueueDevice = 0x30;
inline constexpr uint16_t kCommonConfigSize = 0x38;

inline constexpr uint8_t kIsrQueue = 0x1;
inline constexpr uint8_t kIsrConfig = 0x2;
inline constexpr uint16_t kNoVector = 0xffff;
inline constexpr uint32_t kNotifyOffMultiplier = 4;
inline constexpr uint32_t kNotifyAccessSize = 2;  // Linux's iowrite16(queue index)

// MSI-X capability (PCI 3.0 6.8.2) and table entries.
inline constexpr uint8_t kCapIdMsix = 0x11;
inline constexpr uint8_t kCapIdVendor = 0x09;
inline constexpr uint16_t kMsixControl = 2;
inline constexpr uint16_t kMsixTable = 4;
inline constexpr uint16_t kMsixPba = 8;
inline constexpr uint16_t kMsixControlEnable = 0x8000;
inline constexpr uint16_t kMsixControlFunctionMask = 0x4000;
inline constexpr uint32_t kMsixEntrySize = 16;
inline constexpr uint32_t kMsixEntryMasked = 0x1;

// The queue limit keeps numQueues + 1 vectors within MSI-X's 2048.
inline constexpr uint16_t kMaxQueues = 1024;

// PCI class code (class << 16 | subclass << 8 | prog-if) for a virtio device type.
uint32_t classCodeFor(uint32_t deviceType);
}  // namespace virtio_pci

// Where each structure lives in BAR 0.
struct VirtioPciBarLayout {
  uint64_t common = 0;
  uint64_t isr = 0;
  uint64_t device = 0;
  uint64_t notify = 0;
  uint64_t notifyLength = 0;  // numQueues * multiplier
  uint64_t msixTable = 0;
  uint64_t msixPba = 0;
  uint64_t size = 0;  // the BAR's size, a power of two

  static VirtioPciBarLayout forQueues(uint16_t numQueues);
};

// What a snapshot holds of one transport: the registers the driver programmed (config
// space's writable fields, common config, queues, MSI-X table) and the interrupts that were
// signalled but not yet delivered. The device's identity (ids, capabilities, BAR layout)
// is not saved: a restore builds the same device first and loads this into it.
struct VirtioPciState {
  // Fixed layout without padding: the snapshot stores these structs as they are.
  struct Registers {
    uint64_t driverFeatures = 0;
    uint64_t negotiatedFeatures = 0;
    uint32_t deviceFeatureSelect = 0;
    uint32_t driverFeatureSelect = 0;
    uint32_t pciCfgOffset = 0;
    uint32_t pciCfgLength = 0;
    uint16_t command = 0;
    uint16_t msixControl = 0;
    uint16_t configVector = 0;
    uint16_t queueSelect = 0;
    uint8_t interruptLine = 0;
    uint8_t pciCfgBar = 0;
    uint8_t status = 0;
    uint8_t generation = 0;
    uint8_t isr = 0;
    uint8_t activated = 0;
    uint8_t configInterruptPending = 0;
    uint8_t reserved = 0;
  };
  struct Queue {
    uint16_t size = 0;
    uint16_t vector = 0;
    uint8_t enabled = 0;
    uint8_t interruptPending = 0;
    uint8_t reserved[2] = {};
    uint64_t desc = 0;
    uint64_t driver = 0;
    uint64_t device = 0;
  };
  struct MsixEntry {
    uint32_t addressLow = 0;
    uint32_t addressHigh = 0;
    uint32_t data = 0;
    uint32_t control = 0;
  };
  Registers registers;
  std::vector<Queue> queues;
  std::vector<MsixEntry> msixTable;
};
static_assert(sizeof(VirtioPciState::Registers) == 48 && sizeof(VirtioPciState::Queue) == 32 &&
              sizeof(VirtioPciState::MsixEntry) == 16);

class VirtioPciDevice final : public PciDevice, public BusDevice {
 public:
  // `barAddress`: where BAR 0 is placed before boot (size-aligned, in the 64-bit window), or
  // 0 to leave it to the guest; barSizeFor() gives its size. `memory`, `ioEvents` and
  // `interrupts` must outlive the device. Throws clonevm::Error for a backend this
  // transport cannot carry (no queues, too many, bad max size, config > 4 KiB) or when an
  // eventfd cannot be made.
  VirtioPciDevice(std::shared_ptr<VirtioDeviceBackend> backend, const GuestMemory& memory,
                  IoEventRegistrar& ioEvents, MsiInterruptController& interrupts,
                  spdlog::logger& log, uint64_t barAddress = 0);
  ~VirtioPciDevice() override;

  static uint64_t barSizeFor(const VirtioDeviceBackend& backend);
  const VirtioPciBarLayout& layout() const { return layout_; }

  // PciDevice.
  void readConfig(uint16_t offset, std::span<uint8_t> data) override;
  void writeConfig(uint16_t offset, std::span<const uint8_t> data) override;
  std::array<PciBar, kPciBarCount> bars() const override;
  void barMoved(int index, std::optional<uint64_t> oldAddress,
                std::optional<uint64_t> newAddress) override;

  // BusDevice: BAR 0, `offset` relative to the BAR. Insert it on the MMIO bus where BAR 0
  // is decoded.
  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Bumps config_generation and, once the driver is ready, raises the config change
  // interrupt (ISR bit 1 and the config vector). For the backend's owner, e.g. a vhost-user
  // frontend that got VHOST_USER_BACKEND_CONFIG_CHANGE_MSG. Thread-safe, lock-free.
  void signalConfigChange();

  // Snapshot: the backend must be stopped first (it may not write the rings meanwhile).
  VirtioPciState saveState() const;
  // Into a freshly built device of the same type and queue count, before the vCPUs run:
  // loads the registers, installs the MSI routes and irqfds, re-activates the backend if
  // the driver had (which revalidates every ring address) and raises the interrupts that
  // were pending. The root must then re-evaluate BAR decoding (PciRoot::refreshDecoding),
  // which registers the doorbells. Throws clonevm::Error for a state of another shape.
  void restoreState(const VirtioPciState& state);

  // For tests and diagnostics.
  uint8_t deviceStatus() const { return status_.load(); }
  int kickFd(uint16_t queue) const { return queues_.at(queue).kick.get(); }
  int callFd(uint16_t queue) const { return queues_.at(queue).call.get(); }
  int configFd() const { return configFd_.get(); }
  // Doorbell writes that reached the core instead of a KVM ioeventfd. Stays 0 while the
  // ioeventfds work; the lab's boot check asserts that.
  uint64_t doorbellExits() const { return doorbellExits_.load(); }

 private:
  struct Queue {
    uint16_t size = 0;
    uint16_t vector = virtio_pci::kNoVector;
    bool enabled = false;
    uint64_t desc = 0;
    uint64_t driver = 0;
    uint64_t device = 0;
    UniqueFd kick;
    UniqueFd call;
  };
  struct MsixEntry : VirtioPciState::MsixEntry {
    MsixEntry() { control = virtio_pci::kMsixEntryMasked; }  // masked at reset (PCI 3.0)
    MsiMessage message() const {
      return {uint64_t{addressHigh} << 32 | addressLow, data};
    }
  };
  struct Route {
    uint32_t gsi;
    MsiMessage message;
  };

  void buildConfigSpace();
  void barReadLocked(uint64_t offset, std::span<uint8_t> data);
  void barWriteLocked(uint64_t offset, std::span<const uint8_t> data);
  uint64_t commonReadLocked(uint16_t offset, size_t size);
  void commonWriteLocked(uint16_t offset, size_t size, uint64_t value);
  void statusWriteLocked(uint8_t value);
  void notifyWriteLocked(uint64_t offset, size_t size);
  uint64_t msixReadLocked(uint64_t offset, size_t size);
  void msixWriteLocked(uint64_t offset, size_t size, uint64_t value);
  void pciCfgAccessLocked(bool write);

  Queue* selectedQueue();
  bool negotiated(unsigned bit) const;
  bool featuresAcceptableLocked(uint64_t features);
  bool validQueueSize(uint16_t size) const;
  uint16_t acceptedVector(uint16_t vector) const;
  bool activateLocked();
  void resetLocked();
  void needsResetLocked(const std::string& why);

  uint16_t msixControl() const;
  bool vectorMasked(uint16_t vector) const;
  void syncInterruptsLocked();
  void registerDoorbellsLocked(uint64_t barBase);
  void unregisterDoorbellsLocked();

  std::shared_ptr<VirtioDeviceBackend> backend_;
  const GuestMemory& memory_;
  IoEventRegistrar& ioEvents_;
  MsiInterruptController& interrupts_;
  spdlog::logger& log_;
  const uint16_t numQueues_;
  const uint16_t maxQueueSize_;
  const uint32_t configSize_;
  const uint64_t offeredFeatures_;
  const VirtioPciBarLayout layout_;
  const uint64_t initialBarAddress_;
  const uint32_t doorbellLength_;  // of the ioeventfds: 0 (any) or kNotifyAccessSize

  mutable std::mutex mutex_;
  PciConfigSpace config_;
  uint16_t msixCap_ = 0;
  uint16_t pciCfgCap_ = 0;

  // virtio common config.
  uint32_t deviceFeatureSelect_ = 0;
  uint32_t driverFeatureSelect_ = 0;
  uint64_t driverFeatures_ = 0;
  uint64_t negotiatedFeatures_ = 0;  // valid once FEATURES_OK is set
  uint16_t configVector_ = virtio_pci::kNoVector;
  uint16_t queueSelect_ = 0;
  std::atomic<uint8_t> status_{0};
  std::atomic<uint8_t> generation_{0};
  std::atomic<uint8_t> isr_{0};
  std::atomic<uint64_t> doorbellExits_{0};
  bool activated_ = false;
  std::vector<Queue> queues_;
  UniqueFd configFd_;

  // MSI-X and what is installed in the kernel for it.
  std::vector<MsixEntry> msixTable_;
  std::map<uint16_t, Route> routes_;            // by vector
  std::set<std::pair<int, uint32_t>> irqfds_;   // (eventfd, gsi)
  std::vector<std::pair<uint64_t, int>> doorbells_;  // registered ioeventfds (address, fd)
};

}  // namespace clonevm::vmm
