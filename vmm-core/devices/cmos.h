#pragma once
// The MC146818-style CMOS RTC and NVRAM at ports 0x70 (index) and 0x71 (data):
//   pio.insert(layout::kCmosPort, Cmos::kPortCount, cmos);
//
// - Index port: bit 7 (NMI disable) is masked off; 128 registers. Reading it gives 0xff.
// - Time and date (0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week, 0x07 day,
//   0x08 month, 0x09 year, 0x32 century) come from the injected wall clock (UTC) plus an
//   offset the guest changes by writing them. Each read encodes in BCD or binary per
//   register B's DM bit and in 12 or 24 hour form per its 24/12 bit (PM = hour bit 7).
//   While register B's SET bit is 1 the time is frozen and writes edit the frozen copy;
//   clearing SET starts the clock from it. The day of week follows from the date.
// - Register A: rate and divider bits are stored; UIP (bit 7) reads 1 during the last
//   244 us before each second boundary when the divider runs (DV = 010) and SET is 0, as
//   the datasheet guarantees to readers.
// - Register B: stored (setting SET clears UIE). Register C: UF is set at every second
//   boundary (update cycle), AF at a boundary where seconds, minutes and hours equal the
//   alarm registers 0x01, 0x03, 0x05 (a value with both top bits set matches anything);
//   IRQF when a flag and its enable in B are both set; reading C clears them all. PF is
//   never set (no periodic interrupt). Register D: VRT (valid RAM and time) always set.
// - Interrupt (Options::irq, IRQ 8): asserted while IRQF is set, dropped by reading C.
//   With UIE or AIE enabled a timer thread wakes at each second boundary to raise it on
//   time (Linux's RTC_UIE_ON, used by hwclock, rides on the alarm interrupt). Without
//   the thread the flags are brought up to date on every access and by poll().
// - Memory sizes from the constructor, as firmware leaves them: 0x15/0x16 base memory
//   (640 KiB), 0x17/0x18 and 0x30/0x31 KiB above 1 MiB (max 0xffff), 0x34/0x35 64 KiB
//   units above 16 MiB below 4 GiB, 0x5b-0x5d 64 KiB units above 4 GiB. The rest is NVRAM.

#include <array>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <thread>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/clock.h"
#include "vmm-core/devices/irq.h"

namespace clonevm::vmm {

class Cmos : public BusDevice {
 public:
  static constexpr uint64_t kPortCount = 2;

  struct Options {
    IrqLine* irq = nullptr;   // the RTC line (layout::kRtcIrq); null: no interrupts
    bool timerThread = true;  // with an irq: raise it on time (false: only poll() does)
  };

  // `ramBelow4G` and `ramAbove4G` are the guest RAM sizes in bytes on each side of 4 GiB.
  Cmos(uint64_t ramBelow4G, uint64_t ramAbove4G, WallClock clock, spdlog::logger& log);
  Cmos(uint64_t ramBelow4G, uint64_t ramAbove4G, WallClock clock, spdlog::logger& log,
       Options options);
  ~Cmos() override;
  Cmos(const Cmos&) = delete;
  Cmos& operator=(const Cmos&) = delete;

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Processes the update cycles (second boundaries) up to now: sets UF/AF and drives the
  // interrupt. The timer thread calls it; so can a caller without one.
  void poll();

  // For snapshots: the registers and NVRAM, and the guest clock as an offset from the host's
  // wall clock (so a restored VM's RTC keeps following real time).
  struct State {
    uint8_t index;
    std::array<uint8_t, 128> nvram;
    uint8_t regA, regB, flags;
    int64_t offsetNanos;
  };
  State saveState();
  void restoreState(const State& state);

 private:
  struct DateTime {
    int64_t year;  // full year, e.g. 2026
    int month;     // 1..12
    int day;       // 1..31
    int hour;      // 0..23
    int minute;
    int second;
    int weekday;   // 1..7, Sunday = 1
  };

  int64_t guestNanos() const;
  DateTime now() const;
  void setTime(const DateTime& time);
  void advanceLocked();
  bool alarmMatches(int64_t secondOfDay) const;
  void updateIrqLocked();
  void timerLoop();
  uint8_t readRegister(uint8_t index);
  void writeRegister(uint8_t index, uint8_t value);
  uint8_t encode(int value) const;
  int decode(uint8_t value) const;
  uint8_t encodeHour(int hour) const;
  int decodeHour(uint8_t value) const;

  static DateTime fromEpochSeconds(int64_t seconds);
  static int64_t toEpochSeconds(const DateTime& time);

  WallClock clock_;
  spdlog::logger& log_;
  IrqLine* irq_;

  std::mutex mutex_;
  uint8_t index_ = 0;
  uint8_t nvram_[128] = {};
  uint8_t regA_ = 0x26;  // 32.768 kHz time base, 1024 Hz rate
  uint8_t regB_ = 0x02;  // 24-hour, BCD
  int64_t offsetNanos_ = 0;
  std::optional<DateTime> frozen_;  // while SET is 1
  int64_t lastUpdate_ = 0;          // the guest second of the last processed update cycle
  uint8_t flags_ = 0;               // register C's UF/AF
  bool irqLevel_ = false;
  bool stopping_ = false;
  std::condition_variable timerWakeup_;
  std::thread timer_;  // last: started once everything else is set up
};

}  // namespace clonevm::vmm
