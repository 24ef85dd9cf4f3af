#include "vmm-core/vm/legacy_devices.h"

#include <unistd.h>

#include <thread>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/devices/clock.h"
#include "vmm-core/devices/cmos.h"
#include "vmm-core/devices/i8042.h"
#include "vmm-core/devices/acpi_pm.h"
#include "vmm-core/devices/pci_root.h"
#include "vmm-core/devices/port_stubs.h"
#include "vmm-core/devices/reset_control.h"
#include "vmm-core/devices/serial.h"
#include "vmm-core/snapshot/machine_state.h"

namespace clonevm::vmm {
namespace {

constexpr uint8_t kKeyboardIrq = 1;
constexpr uint8_t kMouseIrq = 12;

// Writes all of `bytes` to `fd`; output to a closed console is dropped, never fatal.
void writeConsole(int fd, std::span<const uint8_t> bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::write(fd, bytes.data(), bytes.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
}

}  // namespace

LegacyDevices::LegacyDevices(const Config& config, Bus& pio, Bus& mmio) : config_(config) {
  int outputFd = config.consoleOutputFd;
  serial_ = std::make_shared<Serial>(
      irqLine(layout::kCom1Irq),
      [outputFd](std::span<const uint8_t> bytes) { writeConsole(outputFd, bytes); }, config.log);
  pio.insert(layout::kCom1Port, Serial::kPortCount, serial_);

  ExitSignal& exitSignal = config.exitSignal;
  auto i8042 = i8042_ = std::make_shared<I8042>(
      irqLine(kKeyboardIrq), irqLine(kMouseIrq),
      [&exitSignal] { exitSignal.request(ExitReason::kReset, "i8042 reset"); }, config.log);
  pio.insert(layout::kI8042DataPort, 1, i8042);
  pio.insert(layout::kI8042CommandPort, 1, i8042, I8042::kCommandOffset);

  uint64_t below4G = 0;
  uint64_t above4G = 0;
  for (const auto& region : config.memory.regions()) {
    (region.guestAddress < layout::kHighRamStart ? below4G : above4G) += region.size;
  }
  cmos_ = std::make_shared<Cmos>(below4G, above4G, systemWallClock(), config.log,
                                 Cmos::Options{.irq = &irqLine(layout::kRtcIrq)});
  pio.insert(layout::kCmosPort, Cmos::kPortCount, cmos_);

  acpiPm_ = std::make_shared<AcpiPm>(
      irqLine(layout::kSciIrq), [&exitSignal] { exitSignal.request(ExitReason::kPowerOff); },
      systemMonotonicClock(), config.log);
  pio.insert(layout::kPm1aEventPort, AcpiPm::kPortCount, acpiPm_);
  pio.insert(layout::kPostCodePort, 1, std::make_shared<PostCodePort>(config.log));

  auto resetControl = std::make_shared<ResetControl>(
      [&exitSignal] { exitSignal.request(ExitReason::kReset, "reset register"); }, config.log);
  pciRoot_ = std::make_shared<PciRoot>(config.log);
  mmio.insert(layout::kEcamStart, layout::kEcamSize, std::make_shared<PciEcam>(pciRoot_));
  pio.insert(layout::kPciConfigAddressPort, PciConfigIo::kPortCount,
             std::make_shared<PciConfigIo>(pciRoot_, resetControl, config.log));
}

LegacyDevices::~LegacyDevices() = default;

KvmIrqLine& LegacyDevices::irqLine(uint32_t gsi) {
  irqLines_.push_back(std::make_unique<KvmIrqLine>(config_.vm, gsi));
  return *irqLines_.back();
}

void LegacyDevices::consoleInput(std::span<const uint8_t> bytes) {
  // The UART's host queue is bounded: wait for the guest to drain it rather than drop keys.
  while (!bytes.empty() && !config_.exitSignal.requested()) {
    size_t accepted = serial_->enqueueInput(bytes);
    bytes = bytes.subspan(accepted);
    if (!bytes.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void LegacyDevices::flushConsole() { serial_->flush(); }

void LegacyDevices::saveState(snapshot::DeviceStates& states) const {
  states.serial = serial_->saveState();
  states.cmos = cmos_->saveState();
  states.acpiPm = acpiPm_->saveState();
  states.i8042 = i8042_->saveState();
}

void LegacyDevices::restoreState(const snapshot::DeviceStates& states) {
  serial_->restoreState(states.serial);
  cmos_->restoreState(states.cmos);
  acpiPm_->restoreState(states.acpiPm);
  i8042_->restoreState(states.i8042);
}

void LegacyDevices::pressPowerButton() { acpiPm_->pressPowerButton(); }

}  // namespace clonevm::vmm
