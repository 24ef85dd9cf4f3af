#pragma once
// The devices the core emulates itself, wired to the buses and the in-kernel irqchip:
// COM1 (16550A), i8042, CMOS RTC, ACPI PM registers and reset port, the PCIe root.

#include <memory>
#include <span>
#include <vector>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/irq.h"
#include "vmm-core/kvm/kvm.h"
#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/vm/exit_signal.h"

namespace clonevm::vmm {

class AcpiPm;
class Cmos;
class I8042;
class PciRoot;
class Serial;
namespace snapshot {
struct DeviceStates;
}

// An ISA interrupt line of the in-kernel PIC/IOAPIC pair.
class KvmIrqLine : public IrqLine {
 public:
  KvmIrqLine(KvmVm& vm, uint32_t gsi) : vm_(vm), gsi_(gsi) {}
  void set(bool asserted) override { vm_.setIrqLine(gsi_, asserted); }

 private:
  KvmVm& vm_;
  uint32_t gsi_;
};

class LegacyDevices {
 public:
  struct Config {
    const GuestMemory& memory;
    int consoleOutputFd;  // not owned
    KvmVm& vm;
    ExitSignal& exitSignal;
    spdlog::logger& log;
  };

  LegacyDevices(const Config& config, Bus& pio, Bus& mmio);
  ~LegacyDevices();

  // Host keyboard input for COM1.
  void consoleInput(std::span<const uint8_t> bytes);
  void flushConsole();
  void pressPowerButton();
  PciRoot& pciRoot() { return *pciRoot_; }
  // Snapshot state of COM1, the CMOS, ACPI PM and i8042 (the vCPUs must be parked).
  void saveState(snapshot::DeviceStates& states) const;
  void restoreState(const snapshot::DeviceStates& states);

 private:
  KvmIrqLine& irqLine(uint32_t gsi);

  Config config_;
  std::vector<std::unique_ptr<KvmIrqLine>> irqLines_;
  std::shared_ptr<Serial> serial_;
  std::shared_ptr<PciRoot> pciRoot_;
  std::shared_ptr<AcpiPm> acpiPm_;
  std::shared_ptr<Cmos> cmos_;
  std::shared_ptr<I8042> i8042_;
};

}  // namespace clonevm::vmm
