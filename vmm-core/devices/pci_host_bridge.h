#pragma once
// The host bridge at 00:00.0: Intel vendor id with device id 0x0d57 (the id Cloud
// Hypervisor uses for its virtual host bridge; no Linux quirk matches it), class 0x060000,
// header type 0, no BARs and no capabilities. Linux's type 1 probe (pci_sanity_check)
// looks for exactly such a host bridge class on bus 0.

#include "vmm-core/devices/pci_config.h"
#include "vmm-core/devices/pci_device.h"

namespace clonevm::vmm {

class PciHostBridge : public PciDevice {
 public:
  static constexpr uint16_t kVendorId = 0x8086;
  static constexpr uint16_t kDeviceId = 0x0d57;
  static constexpr uint32_t kClassCode = 0x060000;

  PciHostBridge();

  void readConfig(uint16_t offset, std::span<uint8_t> data) override;
  void writeConfig(uint16_t offset, std::span<const uint8_t> data) override;

 private:
  PciConfigSpace config_;
};

}  // namespace clonevm::vmm
