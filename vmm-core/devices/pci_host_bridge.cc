#include "vmm-core/devices/pci_host_bridge.h"

namespace clonevm::vmm {

PciHostBridge::PciHostBridge()
    : config_(PciIds{.vendor = kVendorId, .device = kDeviceId, .classCode = kClassCode}) {
  // A host bridge decodes memory and I/O by definition; say so.
  config_.set16(pci::kCommand, pci::kCommandIo | pci::kCommandMemory);
}

void PciHostBridge::readConfig(uint16_t offset, std::span<uint8_t> data) {
  config_.read(offset, data);
}

void PciHostBridge::writeConfig(uint16_t offset, std::span<const uint8_t> data) {
  config_.write(offset, data);
}

}  // namespace clonevm::vmm
