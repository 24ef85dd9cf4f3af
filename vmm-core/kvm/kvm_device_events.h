#pragma once
// IoEventRegistrar and MsiInterruptController on a KVM VM: KVM_IOEVENTFD for doorbells,
// KVM_SET_GSI_ROUTING (through one GsiRouting per VM) and KVM_IRQFD for MSIs.
//
// One per VM, made after createIrqchipAndPit() and shared by every device; it must
// outlive them. Wiring:
//   KvmDeviceEvents events(vm);
//   auto dev = std::make_shared<VirtioPciDevice>(backend, memory, events, events, log, bar);

#include "vmm-core/kvm/device_events.h"
#include "vmm-core/kvm/gsi_routing.h"
#include "vmm-core/kvm/kvm.h"

namespace clonevm::vmm {

class KvmDeviceEvents final : public IoEventRegistrar, public MsiInterruptController {
 public:
  // Asks KVM how many routes it allows; throws unless it supports GSI routing.
  explicit KvmDeviceEvents(KvmVm& vm);

  void addIoeventfd(uint64_t address, uint32_t length, int eventfd) override;
  void removeIoeventfd(uint64_t address, uint32_t length, int eventfd) override;
  bool anyLengthIoeventfds() const override { return anyLength_; }

  uint32_t addMsiRoute(const MsiMessage& message) override;
  void updateMsiRoute(uint32_t gsi, const MsiMessage& message) override;
  void removeMsiRoute(uint32_t gsi) override;
  void addIrqfd(int eventfd, uint32_t gsi) override;
  void removeIrqfd(int eventfd, uint32_t gsi) override;

  const GsiRouting& routing() const { return routing_; }

 private:
  KvmVm& vm_;
  bool anyLength_;
  GsiRouting routing_;
};

}  // namespace clonevm::vmm
