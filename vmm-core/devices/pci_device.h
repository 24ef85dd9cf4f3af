#pragma once
// What a PCI function on Clone's root bus implements (virtio-pci transports, the VFIO proxy,
// the host bridge). PciRoot owns the parts of config space that are the same for everyone:
// the six BAR registers (0x10..0x27 of a type 0 header) with the sizing protocol, and the
// decision whether a BAR is decoded; a device only declares its BARs and is told where the
// guest put them.

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

namespace clonevm::vmm {

// Bus/device/function. Clone has one root bus (0).
struct Bdf {
  uint8_t bus = 0;
  uint8_t device = 0;    // 0..31
  uint8_t function = 0;  // 0..7

  uint16_t value() const {
    return static_cast<uint16_t>(bus << 8 | device << 3 | function);
  }
  std::string toString() const;  // "00:1f.0"
  friend bool operator==(const Bdf&, const Bdf&) = default;
};

enum class PciBarType : uint8_t {
  kNone,    // unused BAR (reads 0, ignores writes)
  kMmio32,  // 32-bit memory BAR
  kMmio64,  // 64-bit memory BAR: takes this index and the next
  kIo,      // I/O port BAR
};

struct PciBar {
  PciBarType type = PciBarType::kNone;
  uint64_t size = 0;          // power of two: >= 16 for memory (<= 2 GiB if 32-bit), 4..256 for I/O
  bool prefetchable = false;  // memory BARs only
  uint64_t address = 0;       // address assigned by the VMM before boot, 0 for none; size-aligned
};

inline constexpr int kPciBarCount = 6;
inline constexpr uint16_t kPciConfigSpaceSize = 4096;  // PCIe extended config space

class PciDevice {
 public:
  virtual ~PciDevice() = default;

  // Config space except the BAR registers, which PciRoot answers itself. `offset` <
  // kPciConfigSpaceSize; the access is 1, 2 or 4 bytes and never crosses a dword boundary.
  // Calls are serialized by the root (which holds its lock while calling).
  virtual void readConfig(uint16_t offset, std::span<uint8_t> data) = 0;
  virtual void writeConfig(uint16_t offset, std::span<const uint8_t> data) = 0;

  // The BARs, read once when the device is added. A kMmio64 BAR at index i also occupies
  // i + 1, which must be kNone.
  virtual std::array<PciBar, kPciBarCount> bars() const { return {}; }

  // BAR `index` started or stopped being decoded at an address, or moved: `oldAddress` is
  // where it was decoded before (nullopt: nowhere), `newAddress` where it is decoded now.
  // A BAR is decoded when its type's enable bit in the command register (I/O space or
  // memory space) is set and its address is non-zero and fits (below 4 GiB for 32-bit
  // BARs, below 64 KiB for I/O). So the values a guest writes while sizing a BAR or while
  // rewriting a 64-bit BAR one half at a time with decoding off are not reported.
  // Called with the root's lock held: it must not access config space.
  virtual void barMoved(int index, std::optional<uint64_t> oldAddress,
                        std::optional<uint64_t> newAddress) {
    (void)index;
    (void)oldAddress;
    (void)newAddress;
  }
};

}  // namespace clonevm::vmm
