#pragma once
// What a virtio device is, independent of the transport that carries it to the guest: its
// type, queues, features and config space, and what it does once the driver is ready.
// VirtioPciDevice (virtio_pci_device.h) carries any backend over virtio-pci; a vhost-user
// frontend implements this interface to put a device process behind it.
//
// The transport calls a backend from one thread at a time (it holds its own lock), from
// vCPU threads. A backend must not call back into the transport from inside these calls
// except through VirtioActivationInfo::configChanged, which is safe from any thread.

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "vmm-core/memory/guest_memory.h"

namespace clonevm::vmm {

// One queue the driver enabled, as the driver programmed it. Addresses are guest physical
// and already validated: inside guest memory for the negotiated ring layout and aligned.
struct VirtioQueueInfo {
  uint16_t index = 0;
  uint16_t size = 0;          // entries
  uint64_t descTable = 0;     // descriptor area
  uint64_t availRing = 0;     // driver area (split: available ring)
  uint64_t usedRing = 0;      // device area (split: used ring)
  // Signalled (eventfd counter) when the guest notifies this queue; KVM writes it from the
  // doorbell without a VM exit. Owned by the transport, valid for the transport's lifetime.
  int kickFd = -1;
  // Written by the backend (eventfd write of 1) to interrupt the guest for this queue; the
  // transport routes it to the queue's MSI-X vector with a KVM irqfd. Owned by the transport.
  int callFd = -1;
};

struct VirtioActivationInfo {
  const GuestMemory* memory = nullptr;  // never null
  uint64_t features = 0;                // negotiated: offered and accepted by the driver
  std::vector<VirtioQueueInfo> queues;  // enabled queues, by ascending index
  // Raises a configuration change interrupt (and bumps config_generation). Call it after
  // the device config changed; thread-safe, valid until reset().
  std::function<void()> configChanged;
};

class VirtioDeviceBackend {
 public:
  virtual ~VirtioDeviceBackend() = default;

  // Virtio device type (virtio::kTypeNet, ...): the PCI device id is 0x1040 + type.
  virtual uint32_t deviceType() const = 0;
  // Number of virtqueues (>= 1) and their maximum size (a power of two, <= 32768).
  virtual uint16_t numQueues() const = 0;
  virtual uint16_t maxQueueSize() const = 0;
  // Feature bits offered to the driver. The transport adds VIRTIO_F_VERSION_1 and removes
  // the transport features it does not implement (NOTIFICATION_DATA, NOTIF_CONFIG_DATA,
  // RING_RESET, SR_IOV).
  virtual uint64_t deviceFeatures() const = 0;
  // Whether the driver's feature choice (already a subset of the offer, with VERSION_1)
  // is acceptable; false leaves FEATURES_OK clear. For dependencies between features.
  virtual bool acceptFeatures(uint64_t features) {
    (void)features;
    return true;
  }

  // Device-specific config space: its size (<= 4096; 0 for none) and accesses, which the
  // transport only forwards when they lie wholly inside it.
  virtual uint32_t configSize() const = 0;
  virtual void readConfig(uint32_t offset, std::span<uint8_t> data) = 0;
  virtual void writeConfig(uint32_t offset, std::span<const uint8_t> data) = 0;

  // The driver set DRIVER_OK: start serving the queues. Throwing (clonevm::Error) refuses
  // activation; the transport then sets DEVICE_NEEDS_RESET.
  virtual void activate(const VirtioActivationInfo& info) = 0;
  // The driver reset the device (wrote 0 to device_status): stop using the queues and
  // guest memory and forget the negotiated state. Called on every reset, activated or not,
  // and when the transport is destroyed while active (its eventfds close then).
  virtual void reset() = 0;
  // After every device_status change the transport accepted (not on reset), with the
  // status before and after (vhost-user's SET_STATUS, logging).
  virtual void statusChanged(uint8_t oldStatus, uint8_t newStatus) {
    (void)oldStatus;
    (void)newStatus;
  }
};

}  // namespace clonevm::vmm
