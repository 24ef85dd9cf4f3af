#pragma once
// A test-only guest driver for VirtioPciDevice: it plugs the device into a PciRoot and
// reaches it the way a guest does, config space through ECAM and BAR 0 through an MMIO bus,
// with the steps of Linux's virtio_pci_modern driver (capability walk, feature negotiation,
// MSI-X setup, setup_vq, DRIVER_OK). Unexpected answers throw clonevm::Error.

#include <cstdint>
#include <memory>
#include <optional>

#include <spdlog/logger.h>

#include "common/error.h"
#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/pci_config.h"
#include "vmm-core/devices/pci_root.h"
#include "vmm-core/kvm/device_events.h"
#include "vmm-core/virtio/virtio.h"
#include "vmm-core/virtio/virtio_pci_device.h"

namespace clonevm::vmm::virtio_testing {

// The x86 MSI message Linux programs for `vector` on APIC `apic`.
inline MsiMessage msiFor(uint8_t vector, uint8_t apic = 0) {
  return {0xfee00000u | uint32_t{apic} << 12, 0x4000u | vector};
}

class VirtioPciTestDriver {
 public:
  // Config space offsets of the capabilities, found by walking the list.
  struct Caps {
    uint16_t common = 0, notify = 0, isr = 0, device = 0, pciCfg = 0, msix = 0;
  };
  struct QueueSetup {
    uint16_t size;
    uint64_t desc, driver, device;
    uint16_t vector;
  };

  // Puts `device` on a fresh root bus and finds its capabilities.
  void attach(std::shared_ptr<VirtioPciDevice> device, spdlog::logger& log) {
    device_ = std::move(device);
    root_ = std::make_shared<PciRoot>(log);
    bdf_ = root_->addDevice(device_);
    ecam_ = std::make_unique<PciEcam>(root_);
    bus_.reset();
    bar_ = 0;
    caps_ = findCaps();
  }
  // Drops the references to the device (the root holds one).
  void detach() {
    bus_.reset();
    ecam_.reset();
    root_.reset();
    device_.reset();
  }

  uint32_t cfgRead(uint16_t reg, size_t size = 4) {
    uint8_t bytes[4] = {};
    ecam_->read(ecamOffset(reg), {bytes, size});
    uint32_t value = 0;
    for (size_t i = 0; i < size; ++i) value |= uint32_t{bytes[i]} << (8 * i);
    return value;
  }
  void cfgWrite(uint16_t reg, uint32_t value, size_t size = 4) {
    uint8_t bytes[4] = {};
    for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
    ecam_->write(ecamOffset(reg), {bytes, size});
  }
  uint32_t capOffset(uint16_t cap) { return cfgRead(cap + virtio_pci::kCapOffset); }

  // BAR programming as firmware or Linux does it: decoding off, both halves, decoding on.
  void programBar(uint64_t address) {
    uint16_t command = static_cast<uint16_t>(cfgRead(pci::kCommand, 2));
    cfgWrite(pci::kCommand, command & ~pci::kCommandMemory, 2);
    cfgWrite(pci::kBar0, static_cast<uint32_t>(address));
    cfgWrite(pci::kBar0 + 4, static_cast<uint32_t>(address >> 32));
    cfgWrite(pci::kCommand, command | pci::kCommandMemory | pci::kCommandBusMaster, 2);
    bar_ = address;
  }

  // MMIO at BAR 0 + `offset`, through a bus as a vCPU exit would reach it.
  uint64_t mmioRead(uint64_t offset, size_t size) {
    uint8_t bytes[8] = {};
    require(bus().read(bar_ + offset, {bytes, size}), "no device at {:#x}", bar_ + offset);
    uint64_t value = 0;
    for (size_t i = 0; i < size; ++i) value |= uint64_t{bytes[i]} << (8 * i);
    return value;
  }
  void mmioWrite(uint64_t offset, uint64_t value, size_t size) {
    uint8_t bytes[8] = {};
    for (size_t i = 0; i < size; ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
    require(bus().write(bar_ + offset, {bytes, size}), "no device at {:#x}", bar_ + offset);
  }

  // Common config at its natural widths.
  uint64_t common(uint16_t field, size_t size) {
    return mmioRead(capOffset(caps_.common) + field, size);
  }
  void setCommon(uint16_t field, uint64_t value, size_t size) {
    mmioWrite(capOffset(caps_.common) + field, value, size);
  }
  uint8_t status() { return static_cast<uint8_t>(common(virtio_pci::kDeviceStatus, 1)); }
  void addStatus(uint8_t bits) { setCommon(virtio_pci::kDeviceStatus, status() | bits, 1); }

  uint64_t deviceFeatures() {
    setCommon(virtio_pci::kDeviceFeatureSelect, 0, 4);
    uint64_t features = common(virtio_pci::kDeviceFeature, 4);
    setCommon(virtio_pci::kDeviceFeatureSelect, 1, 4);
    return features | common(virtio_pci::kDeviceFeature, 4) << 32;
  }
  void setDriverFeatures(uint64_t features) {
    setCommon(virtio_pci::kDriverFeatureSelect, 0, 4);
    setCommon(virtio_pci::kDriverFeature, static_cast<uint32_t>(features), 4);
    setCommon(virtio_pci::kDriverFeatureSelect, 1, 4);
    setCommon(virtio_pci::kDriverFeature, features >> 32, 4);
  }

  // virtio_dev_probe up to FEATURES_OK (all offered features unless told otherwise);
  // returns whether the device kept FEATURES_OK.
  bool negotiate(std::optional<uint64_t> features = std::nullopt) {
    setCommon(virtio_pci::kDeviceStatus, 0, 1);
    require(status() == 0, "device_status {:#x} after reset", status());
    addStatus(virtio::kStatusAcknowledge);
    addStatus(virtio::kStatusDriver);
    setDriverFeatures(features.value_or(deviceFeatures()));
    addStatus(virtio::kStatusFeaturesOk);
    return status() & virtio::kStatusFeaturesOk;
  }

  // pci_msix_enable: enable with the function masked, program `vectors` entries (vector
  // 0x30 + v on APIC v), unmask the function; request_irq then unmasks each vector.
  void enableMsix(int vectors) {
    uint16_t control = caps_.msix + virtio_pci::kMsixControl;
    cfgWrite(control,
             cfgRead(control, 2) | virtio_pci::kMsixControlEnable |
                 virtio_pci::kMsixControlFunctionMask,
             2);
    for (int v = 0; v < vectors; ++v) {
      writeMsixEntry(v, msiFor(static_cast<uint8_t>(0x30 + v), static_cast<uint8_t>(v)));
    }
    cfgWrite(control, cfgRead(control, 2) & ~virtio_pci::kMsixControlFunctionMask, 2);
    for (int v = 0; v < vectors; ++v) setVectorMasked(v, false);
  }
  uint64_t msixTable() { return cfgRead(caps_.msix + virtio_pci::kMsixTable) & ~7u; }
  uint64_t msixPba() { return cfgRead(caps_.msix + virtio_pci::kMsixPba) & ~7u; }
  void writeMsixEntry(int vector, const MsiMessage& message) {
    uint64_t entry = msixTable() + uint64_t(vector) * virtio_pci::kMsixEntrySize;
    mmioWrite(entry + 0, static_cast<uint32_t>(message.address), 4);
    mmioWrite(entry + 4, message.address >> 32, 4);
    mmioWrite(entry + 8, message.data, 4);
  }
  void setVectorMasked(int vector, bool masked) {
    mmioWrite(msixTable() + uint64_t(vector) * virtio_pci::kMsixEntrySize + 12, masked ? 1 : 0,
              4);
  }

  // vp_modern's setup_vq, then (unless told not to) vp_modern_find_vqs' queue_enable.
  void setupQueue(uint16_t index, const QueueSetup& q, bool enable = true) {
    using namespace virtio_pci;
    setCommon(kQueueSelect, index, 2);
    require(common(kQueueSize, 2) != 0, "queue {} does not exist", index);
    require(common(kQueueEnable, 2) == 0, "queue {} is already enabled", index);
    setCommon(kQueueSize, q.size, 2);
    setCommon(kQueueDesc, static_cast<uint32_t>(q.desc), 4);
    setCommon(kQueueDesc + 4, q.desc >> 32, 4);
    setCommon(kQueueDriver, static_cast<uint32_t>(q.driver), 4);
    setCommon(kQueueDriver + 4, q.driver >> 32, 4);
    setCommon(kQueueDevice, static_cast<uint32_t>(q.device), 4);
    setCommon(kQueueDevice + 4, q.device >> 32, 4);
    setCommon(kQueueMsixVector, q.vector, 2);
    require(common(kQueueMsixVector, 2) == q.vector, "queue {}: vector {} refused", index,
            q.vector);
    if (enable) setCommon(kQueueEnable, 1, 2);
  }

  // Guest physical address of queue `queue`'s doorbell.
  uint64_t doorbell(uint16_t queue) {
    uint32_t multiplier = cfgRead(caps_.notify + virtio_pci::kCapNotifyMultiplier);
    setCommon(virtio_pci::kQueueSelect, queue, 2);
    return bar_ + capOffset(caps_.notify) + common(virtio_pci::kQueueNotifyOff, 2) * multiplier;
  }
  // vp_notify: iowrite16(queue index) to the doorbell. With KVM, the ioeventfd takes it;
  // here it goes through the transport's exit path, which signals the same eventfd.
  void kick(uint16_t queue) { mmioWrite(doorbell(queue) - bar_, queue, 2); }

 protected:
  uint64_t ecamOffset(uint16_t reg) const { return uint64_t{bdf_.device} << 15 | reg; }

  Bus& bus() {
    if (!bus_ || busBase_ != bar_) {
      bus_ = std::make_unique<Bus>("test mmio");
      bus_->insert(bar_, device_->layout().size, device_);
      busBase_ = bar_;
    }
    return *bus_;
  }

  Caps findCaps() {
    Caps caps;
    require(cfgRead(pci::kStatus, 2) & pci::kStatusCapabilities, "no capability list");
    int guard = 0;
    for (uint16_t pos = cfgRead(pci::kCapabilitiesPointer, 1) & ~3u; pos != 0;
         pos = cfgRead(pos + 1, 1) & ~3u) {
      require(++guard < 48, "capability list loops");
      auto id = static_cast<uint8_t>(cfgRead(pos, 1));
      if (id == virtio_pci::kCapIdMsix) {
        caps.msix = pos;
        continue;
      }
      require(id == virtio_pci::kCapIdVendor, "unexpected capability {:#x}", id);
      switch (cfgRead(pos + virtio_pci::kCapCfgType, 1)) {
        case virtio_pci::kCapCommon: caps.common = pos; break;
        case virtio_pci::kCapNotify: caps.notify = pos; break;
        case virtio_pci::kCapIsr: caps.isr = pos; break;
        case virtio_pci::kCapDevice: caps.device = pos; break;
        case virtio_pci::kCapPciCfg: caps.pciCfg = pos; break;
        default: throw Error("unknown virtio capability type");
      }
    }
    return caps;
  }

  std::shared_ptr<VirtioPciDevice> device_;
  std::shared_ptr<PciRoot> root_;
  Bdf bdf_;
  std::unique_ptr<PciEcam> ecam_;
  Caps caps_;
  uint64_t bar_ = 0;
  std::unique_ptr<Bus> bus_;
  uint64_t busBase_ = 0;
};

}  // namespace clonevm::vmm::virtio_testing
