#pragma once
// ACPI fixed hardware registers (ACPI 6.x, section 4.8): the PM1a event block, the PM1a
// control block and the PM timer, one BusDevice over the ports they occupy:
//   pio.insert(layout::kPm1aEventPort, AcpiPm::kPortCount, pm);
// with PM1_STS/PM1_EN at kPm1aEventPort, PM1_CNT at kPm1aControlPort and PM_TMR at
// kPmTimerPort (the bytes between control and timer are reserved: all-ones, writes ignored).
// Any access width works; each byte lands in its register.
//
// - PM1_STS: write 1 to clear. The device sets PWRBTN_STS (pressPowerButton()) and WAK_STS
//   (after a sleep request it cannot honour, so the guest resumes at once). TMR_STS is
//   never set: there are no timer-carry events.
// - PM1_EN: TMR_EN, GBL_EN, PWRBTN_EN, SLPBTN_EN and RTC_EN are stored.
// - PM1_CNT: SCI_EN (1 from reset: there is no SMI_CMD, the guest starts in ACPI mode),
//   BM_RLD and SLP_TYP are stored; writing SLP_EN with SLP_TYP == layout::kS5SleepType calls
//   `onPowerOff`. Other sleep types are refused (WAK_STS is set).
// - PM_TMR: 3.579545 MHz, 32 bits (the FADT must set TMR_VAL_EXT), from the monotonic
//   clock; writes are ignored.
// - SCI: the `sci` line is asserted while SCI_EN is set and any enabled status bit is set.
//   The FADT's SCI_INT must name that line (layout::kSciIrq), level-triggered.

#include <cstdint>
#include <functional>
#include <mutex>
#include <span>

#include <spdlog/logger.h>

#include "vmm-core/arch/layout.h"
#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/clock.h"
#include "vmm-core/devices/irq.h"

namespace clonevm::vmm {

class AcpiPm : public BusDevice {
 public:
  static constexpr uint64_t kEventOffset = 0;  // PM1_STS at +0, PM1_EN at +2
  static constexpr uint64_t kControlOffset = layout::kPm1aControlPort - layout::kPm1aEventPort;
  static constexpr uint64_t kTimerOffset = layout::kPmTimerPort - layout::kPm1aEventPort;
  static constexpr uint64_t kPortCount = kTimerOffset + 4;
  static constexpr uint64_t kTimerHz = 3'579'545;

  // PM1_STS / PM1_EN bits.
  static constexpr uint16_t kTimerStatus = 1 << 0;
  static constexpr uint16_t kGlobalStatus = 1 << 5;
  static constexpr uint16_t kPowerButtonStatus = 1 << 8;
  static constexpr uint16_t kSleepButtonStatus = 1 << 9;
  static constexpr uint16_t kRtcStatus = 1 << 10;
  static constexpr uint16_t kWakeStatus = 1 << 15;
  // PM1_CNT bits.
  static constexpr uint16_t kSciEnable = 1 << 0;
  static constexpr uint16_t kSleepEnable = 1 << 13;
  static constexpr int kSleepTypeShift = 10;

  // `onPowerOff` runs on the vCPU thread that wrote PM1_CNT, without the device lock.
  AcpiPm(IrqLine& sci, std::function<void()> onPowerOff, MonotonicClock clock,
         spdlog::logger& log);

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // The ACPI fixed-feature power button (the FADT must leave PWR_BUTTON clear): a guest
  // with acpid or systemd-logind shuts down cleanly. Thread-safe.
  void pressPowerButton();

  // For snapshots: the registers and the PM timer's count (restored as a count, so the
  // timer continues from where it stood).
  struct State {
    uint16_t status, enable, control;
    uint32_t timer;
  };
  State saveState();
  void restoreState(const State& state);

 private:
  uint32_t timerValue() const;
  void updateSci();

  IrqLine& sci_;
  std::function<void()> onPowerOff_;
  MonotonicClock clock_;
  spdlog::logger& log_;
  uint64_t timerBase_;

  std::mutex mutex_;
  uint16_t status_ = 0;
  uint16_t enable_ = 0;
  uint16_t control_ = kSciEnable;
  bool sciLevel_ = false;
};

}  // namespace clonevm::vmm
