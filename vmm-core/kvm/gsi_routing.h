#pragma once
// A VM's GSI routing table. KVM_SET_GSI_ROUTING replaces the *whole* table, including the
// default routes KVM_CREATE_IRQCHIP installed (GSI 0..15 to the PIC and IOAPIC pins, 16..23
// to the IOAPIC only), so one owner per VM must keep all of it and resend it on every
// change: this class. MSI routes get GSIs from 24 (past the IOAPIC pins) upwards.
//
// Thread-safe. A failed commit leaves the table as it was and rethrows.

#include "vmm-core/kvm/kvm_uapi.h"

#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <span>
#include <vector>

#include "vmm-core/kvm/device_events.h"

namespace clonevm::vmm {

class GsiRouting {
 public:
  // Installs a table (KvmVm::setGsiRouting in production, a recorder in tests).
  using Commit = std::function<void(std::span<const kvm_irq_routing_entry>)>;

  // `maxRoutes`: what KVM_CHECK_EXTENSION(KVM_CAP_IRQ_ROUTING) answers (KVM_MAX_IRQ_ROUTES);
  // both GSIs and the number of entries stay below it.
  GsiRouting(Commit commit, uint32_t maxRoutes);

  // Allocates the lowest free GSI >= firstMsiGsi() for `message`, commits, returns it.
  // Throws clonevm::Error when no GSI is left.
  uint32_t addMsi(const MsiMessage& message);
  // Throws clonevm::Error unless `gsi` came from addMsi and is still allocated.
  void updateMsi(uint32_t gsi, const MsiMessage& message);
  void removeMsi(uint32_t gsi);

  // The table as it is committed: irqchip defaults, then MSI routes by GSI.
  std::vector<kvm_irq_routing_entry> table() const;
  static uint32_t firstMsiGsi();

 private:
  void commitLocked(const std::map<uint32_t, MsiMessage>& next);

  Commit commit_;
  uint32_t maxRoutes_;
  mutable std::mutex mutex_;
  std::map<uint32_t, MsiMessage> msi_;  // committed MSI routes by GSI
};

}  // namespace clonevm::vmm
