#include "vmm-core/devices/acpi_pm.h"

namespace clonevm::vmm {
namespace {

constexpr uint16_t kStatusMask = AcpiPm::kTimerStatus | (1 << 4) /* BM_STS */ |
                                 AcpiPm::kGlobalStatus | AcpiPm::kPowerButtonStatus |
                                 AcpiPm::kSleepButtonStatus | AcpiPm::kRtcStatus |
                                 AcpiPm::kWakeStatus;
constexpr uint16_t kEnableMask = AcpiPm::kTimerStatus | AcpiPm::kGlobalStatus |
                                 AcpiPm::kPowerButtonStatus | AcpiPm::kSleepButtonStatus |
                                 AcpiPm::kRtcStatus;
// SCI_EN, BM_RLD and SLP_TYP keep their value; GBL_RLS and SLP_EN are write-only.
constexpr uint16_t kControlMask = AcpiPm::kSciEnable | (1 << 1) | (7 << AcpiPm::kSleepTypeShift);

static_assert(AcpiPm::kControlOffset == 4 && AcpiPm::kTimerOffset == 8,
              "PM1a event, control and timer blocks are expected back to back");

}  // namespace

AcpiPm::AcpiPm(IrqLine& sci, std::function<void()> onPowerOff, MonotonicClock clock,
               spdlog::logger& log)
    : sci_(sci),
      onPowerOff_(std::move(onPowerOff)),
      clock_(std::move(clock)),
      log_(log),
      timerBase_(clock_()) {}

void AcpiPm::read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  uint32_t timer = timerValue();
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t at = offset + i;
    uint8_t value = 0xff;
    if (at < kControlOffset) {
      uint16_t reg = at < 2 ? status_ : enable_;
      value = static_cast<uint8_t>(reg >> (8 * (at % 2)));
    } else if (at < kControlOffset + 2) {
      value = static_cast<uint8_t>(control_ >> (8 * (at - kControlOffset)));
    } else if (at >= kTimerOffset && at < kPortCount) {
      value = static_cast<uint8_t>(timer >> (8 * (at - kTimerOffset)));
    } else {
      log_.debug("acpi pm: read of reserved offset {:#x}", at);
    }
    data[i] = value;
  }
}

void AcpiPm::write(uint64_t offset, std::span<const uint8_t> data) {
  bool powerOff = false;
  {
    std::lock_guard lock(mutex_);
    bool controlWritten = false;
    uint16_t control = control_;
    for (size_t i = 0; i < data.size(); ++i) {
      uint64_t at = offset + i;
      uint16_t shifted = static_cast<uint16_t>(data[i] << (8 * (at % 2)));
      if (at < 2) {
        status_ &= ~(shifted & kStatusMask);  // write 1 to clear
      } else if (at < kControlOffset) {
        uint16_t byteMask = static_cast<uint16_t>(0xff << (8 * (at % 2)));
        enable_ = (enable_ & ~byteMask) | (shifted & kEnableMask);
      } else if (at < kControlOffset + 2) {
        uint16_t byteMask = static_cast<uint16_t>(0xff << (8 * (at % 2)));
        control = (control & ~byteMask) | shifted;
        controlWritten = true;
      } else {
        log_.debug("acpi pm: write {:#04x} to read-only or reserved offset {:#x}", data[i], at);
      }
    }
    if (controlWritten) {
      control_ = control & kControlMask;
      if (control & kSleepEnable) {
        unsigned sleepType = (control >> kSleepTypeShift) & 7;
        if (sleepType == layout::kS5SleepType) {
          powerOff = true;
        } else {
          log_.info("acpi pm: guest asked for sleep type {}, which is not supported; waking it",
                    sleepType);
          status_ |= kWakeStatus;
        }
      }
    }
    updateSci();
  }
  if (powerOff) {
    log_.info("acpi pm: guest entered S5 (soft off)");
    if (onPowerOff_) onPowerOff_();
  }
}

void AcpiPm::pressPowerButton() {
  std::lock_guard lock(mutex_);
  status_ |= kPowerButtonStatus;
  updateSci();
}

AcpiPm::State AcpiPm::saveState() {
  std::lock_guard lock(mutex_);
  return State{status_, enable_, control_, timerValue()};
}

void AcpiPm::restoreState(const State& state) {
  std::lock_guard lock(mutex_);
  status_ = state.status;
  enable_ = state.enable;
  control_ = state.control;
  uint64_t elapsed = static_cast<uint64_t>(
      static_cast<unsigned __int128>(state.timer) * 1'000'000'000u / kTimerHz);
  timerBase_ = clock_() - elapsed;
  updateSci();
}

uint32_t AcpiPm::timerValue() const {
  uint64_t elapsed = clock_() - timerBase_;
  unsigned __int128 ticks = static_cast<unsigned __int128>(elapsed) * kTimerHz / 1'000'000'000u;
  return static_cast<uint32_t>(ticks);
}

void AcpiPm::updateSci() {
  bool level = (control_ & kSciEnable) && (status_ & enable_ & kEnableMask);
  if (level == sciLevel_) return;
  sciLevel_ = level;
  sci_.set(level);
}

}  // namespace clonevm::vmm
