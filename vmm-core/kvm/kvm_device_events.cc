#include "vmm-core/kvm/kvm_device_events.h"

#include "common/error.h"

namespace clonevm::vmm {
namespace {

uint32_t maxRoutes(const KvmVm& vm) {
  int routes = vm.system().checkExtension(KVM_CAP_IRQ_ROUTING);
  require(routes > 0, "KVM does not support GSI routing (KVM_CAP_IRQ_ROUTING)");
  return static_cast<uint32_t>(routes);
}

}  // namespace

KvmDeviceEvents::KvmDeviceEvents(KvmVm& vm)
    : vm_(vm),
      anyLength_(vm.system().checkExtension(KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0),
      routing_([&vm](std::span<const kvm_irq_routing_entry> table) { vm.setGsiRouting(table); },
               maxRoutes(vm)) {}

void KvmDeviceEvents::addIoeventfd(uint64_t address, uint32_t length, int eventfd) {
  vm_.addIoeventfd(address, length, eventfd, /*pio=*/false);
}

void KvmDeviceEvents::removeIoeventfd(uint64_t address, uint32_t length, int eventfd) {
  vm_.removeIoeventfd(address, length, eventfd, /*pio=*/false);
}

uint32_t KvmDeviceEvents::addMsiRoute(const MsiMessage& message) {
  return routing_.addMsi(message);
}

void KvmDeviceEvents::updateMsiRoute(uint32_t gsi, const MsiMessage& message) {
  routing_.updateMsi(gsi, message);
}

void KvmDeviceEvents::removeMsiRoute(uint32_t gsi) { routing_.removeMsi(gsi); }

void KvmDeviceEvents::addIrqfd(int eventfd, uint32_t gsi) { vm_.addIrqfd(eventfd, gsi); }

void KvmDeviceEvents::removeIrqfd(int eventfd, uint32_t gsi) { vm_.removeIrqfd(eventfd, gsi); }

}  // namespace clonevm::vmm
