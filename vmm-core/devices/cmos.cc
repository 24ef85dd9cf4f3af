#include "vmm-core/devices/cmos.h"

#include <algorithm>
#include <chrono>

namespace clonevm::vmm {
namespace {

constexpr int64_t kNanosPerSecond = 1'000'000'000;
// UIP rises this long before the update (the datasheet's minimum lead time).
constexpr int64_t kUipLeadNanos = 244'000;

constexpr uint8_t kRegSeconds = 0x00;
constexpr uint8_t kRegMinutes = 0x02;
constexpr uint8_t kRegHours = 0x04;
constexpr uint8_t kRegWeekday = 0x06;
constexpr uint8_t kRegDay = 0x07;
constexpr uint8_t kRegMonth = 0x08;
constexpr uint8_t kRegYear = 0x09;
constexpr uint8_t kRegA = 0x0a;
constexpr uint8_t kRegB = 0x0b;
constexpr uint8_t kRegC = 0x0c;
constexpr uint8_t kRegD = 0x0d;
constexpr uint8_t kRegCentury = 0x32;

constexpr uint8_t kAUip = 0x80;
constexpr uint8_t kADividerMask = 0x70;
constexpr uint8_t kADividerRunning = 0x20;
constexpr uint8_t kB24Hour = 0x02;
constexpr uint8_t kBBinary = 0x04;
constexpr uint8_t kBUie = 0x10;
constexpr uint8_t kBAie = 0x20;
constexpr uint8_t kBPie = 0x40;
constexpr uint8_t kBSet = 0x80;
constexpr uint8_t kCUf = 0x10;   // same bit as UIE
constexpr uint8_t kCAf = 0x20;   // same bit as AIE
constexpr uint8_t kCIrqf = 0x80;
constexpr uint8_t kRegAlarmSeconds = 0x01;
constexpr uint8_t kRegAlarmMinutes = 0x03;
constexpr uint8_t kRegAlarmHours = 0x05;
constexpr uint8_t kAlarmDontCare = 0xc0;
constexpr uint8_t kDValid = 0x80;
constexpr uint8_t kHourPm = 0x80;

int64_t floorDiv(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

void putLe(uint8_t* nvram, uint8_t index, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) nvram[index + i] = static_cast<uint8_t>(value >> (8 * i));
}

}  // namespace

Cmos::Cmos(uint64_t ramBelow4G, uint64_t ramAbove4G, WallClock clock, spdlog::logger& log)
    : Cmos(ramBelow4G, ramAbove4G, std::move(clock), log, Options{}) {}

Cmos::Cmos(uint64_t ramBelow4G, uint64_t ramAbove4G, WallClock clock, spdlog::logger& log,
           Options options)
    : clock_(std::move(clock)), log_(log), irq_(options.irq) {
  constexpr uint64_t kKiB = 1024, kMiB = 1024 * kKiB;
  putLe(nvram_, 0x15, 640, 2);
  uint64_t extendedKiB = ramBelow4G > kMiB ? std::min<uint64_t>((ramBelow4G - kMiB) / kKiB, 0xffff) : 0;
  putLe(nvram_, 0x17, extendedKiB, 2);
  putLe(nvram_, 0x30, extendedKiB, 2);
  uint64_t above16M =
      ramBelow4G > 16 * kMiB ? std::min<uint64_t>((ramBelow4G - 16 * kMiB) / (64 * kKiB), 0xffff) : 0;
  putLe(nvram_, 0x34, above16M, 2);
  putLe(nvram_, 0x5b, std::min<uint64_t>(ramAbove4G / (64 * kKiB), 0xffffff), 3);
  lastUpdate_ = floorDiv(guestNanos(), kNanosPerSecond);
  if (irq_ != nullptr && options.timerThread) timer_ = std::thread([this] { timerLoop(); });
}

Cmos::~Cmos() {
  {
    std::lock_guard lock(mutex_);
    stopping_ = true;
  }
  timerWakeup_.notify_all();
  if (timer_.joinable()) timer_.join();
}

void Cmos::poll() {
  std::lock_guard lock(mutex_);
  advanceLocked();
}

void Cmos::timerLoop() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    if (!(regB_ & (kBUie | kBAie)) || (regB_ & kBSet)) {
      timerWakeup_.wait(lock);  // a write to register B or the destructor wakes us
      continue;
    }
    int64_t now = guestNanos();
    int64_t next = (floorDiv(now, kNanosPerSecond) + 1) * kNanosPerSecond;
    timerWakeup_.wait_for(lock, std::chrono::nanoseconds(next - now + 1000));
    advanceLocked();
  }
}

void Cmos::read(uint64_t offset, std::span<uint8_t> data) {
  if (data.size() != 1 || offset >= kPortCount) {
    log_.debug("cmos: {}-byte read at offset {:#x}", data.size(), offset);
    std::fill(data.begin(), data.end(), 0xff);
    return;
  }
  std::lock_guard lock(mutex_);
  advanceLocked();
  data[0] = offset == 0 ? 0xff : readRegister(index_);
  updateIrqLocked();
}

void Cmos::write(uint64_t offset, std::span<const uint8_t> data) {
  if (data.size() != 1 || offset >= kPortCount) {
    log_.debug("cmos: {}-byte write at offset {:#x}", data.size(), offset);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    advanceLocked();
    if (offset == 0) {
      index_ = data[0] & 0x7f;  // bit 7 is the NMI mask, not part of the index
    } else {
      writeRegister(index_, data[0]);
    }
    updateIrqLocked();
  }
  timerWakeup_.notify_all();  // register B may have enabled or disabled update interrupts
}

Cmos::State Cmos::saveState() {
  std::lock_guard lock(mutex_);
  State state{};
  state.index = index_;
  std::copy(std::begin(nvram_), std::end(nvram_), state.nvram.begin());
  state.regA = regA_;
  state.regB = regB_;
  state.flags = flags_;
  state.offsetNanos = offsetNanos_;
  return state;
}

void Cmos::restoreState(const State& state) {
  std::lock_guard lock(mutex_);
  index_ = state.index & 0x7f;
  std::copy(state.nvram.begin(), state.nvram.end(), std::begin(nvram_));
  regA_ = state.regA;
  regB_ = state.regB;
  flags_ = state.flags;
  offsetNanos_ = state.offsetNanos;
  frozen_.reset();
  lastUpdate_ = floorDiv(guestNanos(), kNanosPerSecond);
  updateIrqLocked();
}

int64_t Cmos::guestNanos() const { return clock_() + offsetNanos_; }

Cmos::DateTime Cmos::now() const {
  return fromEpochSeconds(floorDiv(guestNanos(), kNanosPerSecond));
}

void Cmos::setTime(const DateTime& time) {
  int64_t current = floorDiv(guestNanos(), kNanosPerSecond);
  // Keep the sub-second phase, so updates stay on the host's second boundaries.
  offsetNanos_ += (toEpochSeconds(time) - current) * kNanosPerSecond;
  lastUpdate_ = toEpochSeconds(time);  // setting the clock is not an update cycle
}

void Cmos::advanceLocked() {
  int64_t second = floorDiv(guestNanos(), kNanosPerSecond);
  if (second < lastUpdate_) {
    lastUpdate_ = second;  // the host clock stepped back: resynchronize, no events
    return;
  }
  if (second == lastUpdate_) return;
  bool running = (regA_ & kADividerMask) == kADividerRunning && !(regB_ & kBSet);
  if (running) {
    flags_ |= kCUf;
    // Alarm check for every boundary passed; a day covers every time of day.
    int64_t from = std::max(lastUpdate_ + 1, second - 86400);
    for (int64_t s = from; s <= second && !(flags_ & kCAf); ++s) {
      if (alarmMatches(s - floorDiv(s, 86400) * 86400)) flags_ |= kCAf;
    }
  }
  lastUpdate_ = second;
  updateIrqLocked();
}

bool Cmos::alarmMatches(int64_t secondOfDay) const {
  // Compare register images, so 12/24-hour and BCD/binary mode need no special case.
  auto matches = [&](uint8_t alarmIndex, uint8_t value) {
    uint8_t alarm = nvram_[alarmIndex];
    return (alarm & kAlarmDontCare) == kAlarmDontCare || alarm == value;
  };
  int hour = static_cast<int>(secondOfDay / 3600);
  int minute = static_cast<int>(secondOfDay / 60 % 60);
  int second = static_cast<int>(secondOfDay % 60);
  return matches(kRegAlarmSeconds, encode(second)) && matches(kRegAlarmMinutes, encode(minute)) &&
         matches(kRegAlarmHours, encodeHour(hour));
}

void Cmos::updateIrqLocked() {
  if (irq_ == nullptr) return;
  bool level = (flags_ & regB_ & (kBUie | kBAie | kBPie)) != 0;
  if (level == irqLevel_) return;
  irqLevel_ = level;
  irq_->set(level);
}

uint8_t Cmos::readRegister(uint8_t index) {
  switch (index) {
    case kRegSeconds:
    case kRegMinutes:
    case kRegHours:
    case kRegWeekday:
    case kRegDay:
    case kRegMonth:
    case kRegYear:
    case kRegCentury: {
      DateTime t = frozen_ ? *frozen_ : now();
      switch (index) {
        case kRegSeconds: return encode(t.second);
        case kRegMinutes: return encode(t.minute);
        case kRegHours: return encodeHour(t.hour);
        case kRegWeekday: return encode(t.weekday);
        case kRegDay: return encode(t.day);
        case kRegMonth: return encode(t.month);
        case kRegYear: return encode(static_cast<int>(((t.year % 100) + 100) % 100));
        default: return encode(static_cast<int>(floorDiv(t.year, 100)));
      }
    }
    case kRegA: {
      uint8_t value = regA_;
      if ((regA_ & kADividerMask) == kADividerRunning && !(regB_ & kBSet)) {
        int64_t intoSecond = guestNanos() - floorDiv(guestNanos(), kNanosPerSecond) * kNanosPerSecond;
        if (intoSecond >= kNanosPerSecond - kUipLeadNanos) value |= kAUip;
      }
      return value;
    }
    case kRegB:
      return regB_;
    case kRegC: {
      uint8_t value = flags_;
      if (flags_ & regB_ & (kBUie | kBAie | kBPie)) value |= kCIrqf;
      flags_ = 0;
      return value;
    }
    case kRegD:
      return kDValid;
    default:
      return nvram_[index];
  }
}

void Cmos::writeRegister(uint8_t index, uint8_t value) {
  switch (index) {
    case kRegSeconds:
    case kRegMinutes:
    case kRegHours:
    case kRegDay:
    case kRegMonth:
    case kRegYear:
    case kRegCentury: {
      DateTime t = frozen_ ? *frozen_ : now();
      switch (index) {
        case kRegSeconds: t.second = std::clamp(decode(value), 0, 59); break;
        case kRegMinutes: t.minute = std::clamp(decode(value), 0, 59); break;
        case kRegHours: t.hour = std::clamp(decodeHour(value), 0, 23); break;
        case kRegDay: t.day = std::clamp(decode(value), 1, 31); break;
        case kRegMonth: t.month = std::clamp(decode(value), 1, 12); break;
        case kRegYear: t.year = floorDiv(t.year, 100) * 100 + std::clamp(decode(value), 0, 99); break;
        default: t.year = std::clamp(decode(value), 0, 99) * 100 + ((t.year % 100) + 100) % 100; break;
      }
      if (frozen_) {
        frozen_ = t;
      } else {
        setTime(t);
      }
      return;
    }
    case kRegWeekday:
      return;  // derived from the date
    case kRegA:
      regA_ = value & ~kAUip;
      return;
    case kRegB: {
      uint8_t old = regB_;
      if (value & kBSet) value &= ~kBUie;
      regB_ = value;
      if (!(old & kBSet) && (value & kBSet)) frozen_ = now();
      if ((old & kBSet) && !(value & kBSet) && frozen_) {
        setTime(*frozen_);
        frozen_.reset();
      }
      return;
    }
    case kRegC:
    case kRegD:
      log_.debug("cmos: write {:#04x} to read-only register {:#04x}", value, index);
      return;
    default:
      nvram_[index] = value;
  }
}

uint8_t Cmos::encode(int value) const {
  if (regB_ & kBBinary) return static_cast<uint8_t>(value);
  return static_cast<uint8_t>(((value / 10) % 10) << 4 | (value % 10));
}

int Cmos::decode(uint8_t value) const {
  if (regB_ & kBBinary) return value;
  return (value >> 4) * 10 + (value & 0x0f);
}

uint8_t Cmos::encodeHour(int hour) const {
  if (regB_ & kB24Hour) return encode(hour);
  int twelve = hour % 12 == 0 ? 12 : hour % 12;
  return encode(twelve) | (hour >= 12 ? kHourPm : 0);
}

int Cmos::decodeHour(uint8_t value) const {
  if (regB_ & kB24Hour) return decode(value);
  int twelve = decode(value & ~kHourPm) % 12;  // 12 AM is hour 0
  return twelve + ((value & kHourPm) ? 12 : 0);
}

Cmos::DateTime Cmos::fromEpochSeconds(int64_t seconds) {
  using namespace std::chrono;
  int64_t days = floorDiv(seconds, 86400);
  int64_t rest = seconds - days * 86400;
  sys_days date{std::chrono::days{days}};
  year_month_day ymd{date};
  return DateTime{
      .year = static_cast<int>(ymd.year()),
      .month = static_cast<int>(static_cast<unsigned>(ymd.month())),
      .day = static_cast<int>(static_cast<unsigned>(ymd.day())),
      .hour = static_cast<int>(rest / 3600),
      .minute = static_cast<int>(rest / 60 % 60),
      .second = static_cast<int>(rest % 60),
      .weekday = static_cast<int>(weekday{date}.c_encoding()) + 1,
  };
}

int64_t Cmos::toEpochSeconds(const DateTime& time) {
  using namespace std::chrono;
  // An impossible day (February 31) rolls over into the next month, as sys_days defines.
  sys_days date{year{static_cast<int>(time.year)} / month{static_cast<unsigned>(time.month)} /
                day{static_cast<unsigned>(time.day)}};
  return static_cast<int64_t>(date.time_since_epoch().count()) * 86400 + time.hour * 3600 +
         time.minute * 60 + time.second;
}

}  // namespace clonevm::vmm
