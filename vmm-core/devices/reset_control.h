#pragma once
// The reset control register of Intel chipsets (RST_CNT, port 0xCF9 = layout::kResetPort),
// which the FADT names as RESET_REG (with RESET_VALUE layout::kResetValue) and which
// Linux's reboot=pci also uses. Writing a byte with RST_CPU (bit 2) set calls `onReset`;
// SYS_RST (bit 1) and FULL_RST (bit 3) are stored and read back.
//
// Port 0xCF9 lies inside the 32-bit CONFIG_ADDRESS register at 0xCF8, so it cannot be a
// Bus range of its own: PciConfigIo forwards 1-byte accesses at 0xCF9 to this device
// (offset 0). Anything but a 1-byte access is ignored (reads: all-ones).

#include <cstdint>
#include <functional>
#include <mutex>
#include <span>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"

namespace clonevm::vmm {

class ResetControl : public BusDevice {
 public:
  // `onReset` runs on the writing vCPU thread, without the device lock.
  ResetControl(std::function<void()> onReset, spdlog::logger& log);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

 private:
  std::function<void()> onReset_;
  spdlog::logger& log_;
  std::mutex mutex_;
  uint8_t value_ = 0;
};

}  // namespace clonevm::vmm
