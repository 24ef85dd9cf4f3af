#pragma once
// The PCIe root complex: root bus 0 with a host bridge at 00:00.0, reachable through ECAM
// (MMIO, extended config space) and the legacy type 1 mechanism (ports 0xCF8/0xCFC, the
// first 256 bytes), which Linux on x86 uses for offsets below 256 even when MCFG exists.
//
// Wiring:
//   auto root = std::make_shared<PciRoot>(log);
//   Bdf bdf = root->addDevice(1, virtioBlk);
//   mmio.insert(layout::kEcamStart, layout::kEcamSize, std::make_shared<PciEcam>(root));
//   pio.insert(layout::kPciConfigAddressPort, PciConfigIo::kPortCount,
//              std::make_shared<PciConfigIo>(root, resetControl, log));
// ECAM must also be reserved in the e820 map (or in a PNP0C02 _CRS), or Linux ignores MCFG.
//
// Only bus 0 and function 0 of each slot exist; every other function reads all-ones.
// Guest accesses that are not 1, 2 or 4 bytes inside one dword read all-ones and are
// dropped when written (with a debug log).

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/pci_device.h"

namespace clonevm::vmm {

class PciRoot {
 public:
  static constexpr uint8_t kSlotCount = 32;

  // Creates the root bus with the host bridge in slot 0.
  explicit PciRoot(spdlog::logger& log);

  // Adds `device` as function 0 of `slot` on bus 0 and returns its address. Throws
  // clonevm::Error when the slot does not exist or is taken, or a BAR is malformed.
  Bdf addDevice(uint8_t slot, std::shared_ptr<PciDevice> device);
  // The same in the lowest free slot.
  Bdf addDevice(std::shared_ptr<PciDevice> device);

  // Config space accesses from the guest, by function; thread-safe.
  void readConfig(Bdf bdf, uint16_t offset, std::span<uint8_t> data);
  void writeConfig(Bdf bdf, uint16_t offset, std::span<const uint8_t> data);

  // Re-derives where every BAR is decoded from the functions' command registers, telling
  // devices whose decoding changed (barMoved). For a restore, which loads the registers
  // behind the root's back.
  void refreshDecoding();

  // Where BAR `index` of the function at `bdf` is decoded now (nullopt: nowhere).
  std::optional<uint64_t> barAddress(Bdf bdf, int index) const;

 private:
  struct BarState {
    PciBar bar;
    bool upperHalf = false;  // the high dword of the 64-bit BAR below it
    uint64_t address = 0;    // the address bits the guest programmed
    std::optional<uint64_t> decoded;
  };
  struct Function {
    std::shared_ptr<PciDevice> device;
    std::array<BarState, kPciBarCount> bars;
  };

  Function* find(Bdf bdf);
  const Function* find(Bdf bdf) const;
  bool validAccess(Bdf bdf, uint16_t offset, size_t size, const char* what) const;
  static uint32_t readBar(const Function& function, int index);
  static void writeBar(Function& function, int index, uint32_t value);
  static uint16_t command(Function& function);
  static void updateDecoding(Function& function, int index);

  spdlog::logger& log_;
  mutable std::mutex mutex_;
  std::array<std::optional<Function>, kSlotCount> slots_;
};

// ECAM: offset = bus << 20 | device << 15 | function << 12 | register.
class PciEcam : public BusDevice {
 public:
  explicit PciEcam(std::shared_ptr<PciRoot> root) : root_(std::move(root)) {}

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

 private:
  std::shared_ptr<PciRoot> root_;
};

// Ports 0xCF8..0xCFF: CONFIG_ADDRESS (a dword at 0xCF8: enable bit 31, register bits
// 11..8 in bits 27..24 as on AMD family 10h+ (Linux uses them for extended config space
// when it has no MMCONFIG), bus 23..16, device 15..11, function 10..8, register 7..2) and
// CONFIG_DATA (0xCFC..0xCFF, any width at any offset within the dword). A 1-byte access at 0xCF9 goes to `resetControl` (Intel's
// RST_CNT lives there; may be null); other non-dword accesses to 0xCF8..0xCFB are ignored.
class PciConfigIo : public BusDevice {
 public:
  static constexpr uint64_t kPortCount = 8;

  PciConfigIo(std::shared_ptr<PciRoot> root, std::shared_ptr<BusDevice> resetControl,
              spdlog::logger& log);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

 private:
  // The function and register CONFIG_DATA at `offset` reaches, if enabled.
  std::optional<std::pair<Bdf, uint16_t>> target(uint64_t offset) const;

  std::shared_ptr<PciRoot> root_;
  std::shared_ptr<BusDevice> resetControl_;
  spdlog::logger& log_;
  mutable std::mutex mutex_;
  uint32_t address_ = 0;
};

}  // namespace clonevm::vmm
