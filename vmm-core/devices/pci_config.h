#pragma once
// A PCI function's 4 KiB config space as a register file: the bytes, which bits the guest
// may write, and which are write-1-to-clear. Devices keep one and answer
// PciDevice::readConfig/writeConfig with it; the device-side setters ignore the masks.
// Not thread-safe on its own: PciRoot serializes config accesses, and a device that also
// changes its config space from elsewhere must lock around both.
//
// A fresh space has a type 0 header with writable command bits (I/O, memory, bus master,
// parity/SERR response, INTx disable), write-1-to-clear status error bits, and writable
// cache line size and interrupt line. Everything else is read-only until made writable.

#include <array>
#include <cstdint>
#include <span>

#include "vmm-core/devices/pci_device.h"

namespace clonevm::vmm {

namespace pci {
// Standard header offsets.
inline constexpr uint16_t kVendorId = 0x00;
inline constexpr uint16_t kDeviceId = 0x02;
inline constexpr uint16_t kCommand = 0x04;
inline constexpr uint16_t kStatus = 0x06;
inline constexpr uint16_t kRevisionId = 0x08;
inline constexpr uint16_t kClassCode = 0x09;  // 3 bytes: prog-if, subclass, class
inline constexpr uint16_t kCacheLineSize = 0x0c;
inline constexpr uint16_t kHeaderType = 0x0e;
inline constexpr uint16_t kBar0 = 0x10;
inline constexpr uint16_t kSubsystemVendorId = 0x2c;
inline constexpr uint16_t kSubsystemId = 0x2e;
inline constexpr uint16_t kCapabilitiesPointer = 0x34;
inline constexpr uint16_t kInterruptLine = 0x3c;
inline constexpr uint16_t kInterruptPin = 0x3d;

inline constexpr uint16_t kCommandIo = 1 << 0;
inline constexpr uint16_t kCommandMemory = 1 << 1;
inline constexpr uint16_t kCommandBusMaster = 1 << 2;
inline constexpr uint16_t kCommandIntxDisable = 1 << 10;
inline constexpr uint16_t kStatusCapabilities = 1 << 4;
}  // namespace pci

struct PciIds {
  uint16_t vendor = 0;
  uint16_t device = 0;
  uint32_t classCode = 0;  // class << 16 | subclass << 8 | prog-if
  uint8_t revision = 0;
  uint16_t subsystemVendor = 0;
  uint16_t subsystem = 0;
};

class PciConfigSpace {
 public:
  explicit PciConfigSpace(const PciIds& ids);

  // Guest accesses: reads return the bytes (all-ones beyond the space), writes honour the
  // writable and write-1-to-clear masks.
  void read(uint16_t offset, std::span<uint8_t> data) const;
  void write(uint16_t offset, std::span<const uint8_t> data);

  // Device side, ignoring the masks. Offsets past the end are a programming error (throws).
  uint8_t get8(uint16_t offset) const;
  uint16_t get16(uint16_t offset) const;
  uint32_t get32(uint16_t offset) const;
  void set8(uint16_t offset, uint8_t value);
  void set16(uint16_t offset, uint16_t value);
  void set32(uint16_t offset, uint32_t value);

  // Which bits of [offset, offset + mask.size()) the guest may write (1 = writable), or
  // clears by writing 1.
  void setWritable(uint16_t offset, std::span<const uint8_t> mask);
  void setWriteOneToClear(uint16_t offset, std::span<const uint8_t> mask);

  // Appends a capability of `length` bytes (header included) to the standard capability
  // list (0x40..0xff), dword aligned; writes its id and links it; sets the status bit.
  // Returns its offset. Throws clonevm::Error when it does not fit.
  uint16_t addCapability(uint8_t id, uint16_t length);

 private:
  void checkRange(uint16_t offset, size_t length) const;

  std::array<uint8_t, kPciConfigSpaceSize> bytes_{};
  std::array<uint8_t, kPciConfigSpaceSize> writable_{};
  std::array<uint8_t, kPciConfigSpaceSize> writeOneToClear_{};
  uint16_t nextCapability_ = 0x40;
  uint16_t lastCapability_ = 0;  // 0: none yet
};

}  // namespace clonevm::vmm
