#include "vmm-core/devices/pci_config.h"

#include <algorithm>

#include "common/error.h"

namespace clonevm::vmm {

PciConfigSpace::PciConfigSpace(const PciIds& ids) {
  set16(pci::kVendorId, ids.vendor);
  set16(pci::kDeviceId, ids.device);
  set8(pci::kRevisionId, ids.revision);
  set8(pci::kClassCode, static_cast<uint8_t>(ids.classCode));
  set16(pci::kClassCode + 1, static_cast<uint16_t>(ids.classCode >> 8));
  set8(pci::kHeaderType, 0);
  set16(pci::kSubsystemVendorId, ids.subsystemVendor);
  set16(pci::kSubsystemId, ids.subsystem);

  // Command: I/O, memory, bus master, parity error response, SERR#, INTx disable.
  const uint8_t command[2] = {0x47, 0x05};
  setWritable(pci::kCommand, command);
  // Status: master data parity error, signaled/received target abort, received master
  // abort, signaled system error, detected parity error.
  const uint8_t status[2] = {0x00, 0xf9};
  setWriteOneToClear(pci::kStatus, status);
  const uint8_t all[1] = {0xff};
  setWritable(pci::kCacheLineSize, all);
  setWritable(pci::kInterruptLine, all);
}

void PciConfigSpace::read(uint16_t offset, std::span<uint8_t> data) const {
  for (size_t i = 0; i < data.size(); ++i) {
    size_t at = size_t{offset} + i;
    data[i] = at < bytes_.size() ? bytes_[at] : 0xff;
  }
}

void PciConfigSpace::write(uint16_t offset, std::span<const uint8_t> data) {
  for (size_t i = 0; i < data.size(); ++i) {
    size_t at = size_t{offset} + i;
    if (at >= bytes_.size()) return;
    uint8_t value = data[i];
    uint8_t keep = static_cast<uint8_t>(~writable_[at]);
    bytes_[at] = static_cast<uint8_t>((bytes_[at] & keep) | (value & writable_[at]));
    bytes_[at] &= static_cast<uint8_t>(~(value & writeOneToClear_[at]));
  }
}

void PciConfigSpace::checkRange(uint16_t offset, size_t length) const {
  require(size_t{offset} + length <= bytes_.size(), "PCI config offset {:#x}+{} out of range",
          offset, length);
}

uint8_t PciConfigSpace::get8(uint16_t offset) const {
  checkRange(offset, 1);
  return bytes_[offset];
}

uint16_t PciConfigSpace::get16(uint16_t offset) const {
  checkRange(offset, 2);
  return static_cast<uint16_t>(bytes_[offset] | bytes_[offset + 1] << 8);
}

uint32_t PciConfigSpace::get32(uint16_t offset) const {
  checkRange(offset, 4);
  return get16(offset) | static_cast<uint32_t>(get16(offset + 2)) << 16;
}

void PciConfigSpace::set8(uint16_t offset, uint8_t value) {
  checkRange(offset, 1);
  bytes_[offset] = value;
}

void PciConfigSpace::set16(uint16_t offset, uint16_t value) {
  checkRange(offset, 2);
  bytes_[offset] = static_cast<uint8_t>(value);
  bytes_[offset + 1] = static_cast<uint8_t>(value >> 8);
}

void PciConfigSpace::set32(uint16_t offset, uint32_t value) {
  set16(offset, static_cast<uint16_t>(value));
  set16(offset + 2, static_cast<uint16_t>(value >> 16));
}

void PciConfigSpace::setWritable(uint16_t offset, std::span<const uint8_t> mask) {
  checkRange(offset, mask.size());
  std::copy(mask.begin(), mask.end(), writable_.begin() + offset);
}

void PciConfigSpace::setWriteOneToClear(uint16_t offset, std::span<const uint8_t> mask) {
  checkRange(offset, mask.size());
  std::copy(mask.begin(), mask.end(), writeOneToClear_.begin() + offset);
}

uint16_t PciConfigSpace::addCapability(uint8_t id, uint16_t length) {
  require(length >= 2, "PCI capability {:#x}: length {} too small", id, length);
  uint16_t offset = nextCapability_;
  require(offset + length <= 0x100, "PCI capability {:#x} ({} bytes) does not fit", id, length);
  set8(offset, id);
  set8(offset + 1, 0);
  if (lastCapability_ == 0) {
    set8(pci::kCapabilitiesPointer, static_cast<uint8_t>(offset));
  } else {
    set8(lastCapability_ + 1, static_cast<uint8_t>(offset));
  }
  set16(pci::kStatus, get16(pci::kStatus) | pci::kStatusCapabilities);
  lastCapability_ = offset;
  nextCapability_ = static_cast<uint16_t>((offset + length + 3) & ~3u);
  return offset;
}

}  // namespace clonevm::vmm
