#pragma once
// What a device model needs from the hypervisor to keep its data path in the kernel:
// doorbells (a guest write signals an eventfd without a VM exit) and MSI interrupts (an
// eventfd write injects an MSI without waking the core). Interfaces, so that transports
// can be tested without /dev/kvm; KvmDeviceEvents (kvm_device_events.h) implements both.
//
// Implementations are thread-safe: several devices and vCPU threads call them at once.
// Every method throws clonevm::Error (SystemError for a failed ioctl) on failure.

#include <cstdint>

namespace clonevm::vmm {

// An MSI as a device writes it: `data` to `address` (x86: 0xfeeXXXXX, the destination
// APIC in the address, vector and delivery mode in the data).
struct MsiMessage {
  uint64_t address = 0;
  uint32_t data = 0;
  friend bool operator==(const MsiMessage&, const MsiMessage&) = default;
};

class IoEventRegistrar {
 public:
  virtual ~IoEventRegistrar() = default;
  // A guest write of exactly `length` bytes to MMIO `address` signals `eventfd` (any value).
  // Length 0 matches a write of any width, where anyLengthIoeventfds() says so.
  virtual void addIoeventfd(uint64_t address, uint32_t length, int eventfd) = 0;
  // Undoes addIoeventfd with the same arguments.
  virtual void removeIoeventfd(uint64_t address, uint32_t length, int eventfd) = 0;
  // Whether length 0 (any width) is allowed: KVM_CAP_IOEVENTFD_ANY_LENGTH. KVM puts such
  // MMIO doorbells on its fast MMIO bus, which on Intel skips instruction decoding.
  virtual bool anyLengthIoeventfds() const { return false; }
};

class MsiInterruptController {
 public:
  virtual ~MsiInterruptController() = default;
  // Allocates a GSI that delivers `message` when injected, and returns it.
  virtual uint32_t addMsiRoute(const MsiMessage& message) = 0;
  // Points an allocated GSI at another message; irqfds on it follow.
  virtual void updateMsiRoute(uint32_t gsi, const MsiMessage& message) = 0;
  // Frees a GSI from addMsiRoute. Remove its irqfds first.
  virtual void removeMsiRoute(uint32_t gsi) = 0;
  // Signalling `eventfd` injects `gsi` in the kernel. One GSI per eventfd.
  virtual void addIrqfd(int eventfd, uint32_t gsi) = 0;
  virtual void removeIrqfd(int eventfd, uint32_t gsi) = 0;
};

}  // namespace clonevm::vmm
