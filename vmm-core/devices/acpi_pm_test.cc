#include "vmm-core/devices/acpi_pm.h"

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/devices/fake_irq_line.h"

namespace clonevm::vmm {
namespace {

class AcpiPmTest : public ::testing::Test {
 protected:
  AcpiPmTest()
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        pm_(sci_, [this] { ++powerOffs_; }, [this] { return now_; }, log_) {}

  uint16_t in16(uint64_t offset) {
    uint8_t bytes[2] = {};
    pm_.read(offset, bytes);
    return static_cast<uint16_t>(bytes[0] | bytes[1] << 8);
  }
  uint32_t in32(uint64_t offset) {
    uint8_t bytes[4] = {};
    pm_.read(offset, bytes);
    return bytes[0] | bytes[1] << 8 | bytes[2] << 16 | static_cast<uint32_t>(bytes[3]) << 24;
  }
  void out16(uint64_t offset, uint16_t value) {
    const uint8_t bytes[2] = {static_cast<uint8_t>(value), static_cast<uint8_t>(value >> 8)};
    pm_.write(offset, bytes);
  }
  void out8(uint64_t offset, uint8_t value) { pm_.write(offset, {&value, 1}); }

  static constexpr uint64_t kStatus = AcpiPm::kEventOffset;
  static constexpr uint64_t kEnable = AcpiPm::kEventOffset + 2;
  static constexpr uint64_t kControl = AcpiPm::kControlOffset;
  static constexpr uint64_t kTimer = AcpiPm::kTimerOffset;

  uint64_t now_ = 5'000'000'000;
  FakeIrqLine sci_;
  spdlog::logger log_;
  int powerOffs_ = 0;
  AcpiPm pm_;
};

uint16_t sleepControl(unsigned type, bool enable) {
  return static_cast<uint16_t>(AcpiPm::kSciEnable | type << AcpiPm::kSleepTypeShift |
                               (enable ? AcpiPm::kSleepEnable : 0));
}

TEST_F(AcpiPmTest, LayoutMatchesTheFadtPorts) {
  EXPECT_EQ(layout::kPm1aEventPort + AcpiPm::kControlOffset, layout::kPm1aControlPort);
  EXPECT_EQ(layout::kPm1aEventPort + AcpiPm::kTimerOffset, layout::kPmTimerPort);
  EXPECT_EQ(AcpiPm::kPortCount, 12u);
}

TEST_F(AcpiPmTest, StartsInAcpiMode) {
  EXPECT_EQ(in16(kControl), AcpiPm::kSciEnable);
  EXPECT_EQ(in16(kStatus), 0);
  EXPECT_EQ(in16(kEnable), 0);
}

TEST_F(AcpiPmTest, S5PowersOffOnlyWithSleepEnableAndTheS5Type) {
  out16(kControl, sleepControl(layout::kS5SleepType, false));  // ACPICA's first write
  EXPECT_EQ(powerOffs_, 0);
  EXPECT_EQ(in16(kControl), sleepControl(layout::kS5SleepType, false));  // SLP_TYP stored
  out16(kControl, sleepControl(3, true));  // S3: refused
  EXPECT_EQ(powerOffs_, 0);
  EXPECT_EQ(in16(kStatus) & AcpiPm::kWakeStatus, AcpiPm::kWakeStatus);
  EXPECT_EQ(in16(kControl) & AcpiPm::kSleepEnable, 0);  // SLP_EN reads as 0
  out16(kControl, sleepControl(layout::kS5SleepType, true));
  EXPECT_EQ(powerOffs_, 1);
}

TEST_F(AcpiPmTest, S5ThroughAByteWriteToTheHighHalf) {
  out8(kControl + 1, static_cast<uint8_t>(sleepControl(layout::kS5SleepType, true) >> 8));
  EXPECT_EQ(powerOffs_, 1);
  EXPECT_EQ(in16(kControl) & AcpiPm::kSciEnable, AcpiPm::kSciEnable);  // low byte kept
}

TEST_F(AcpiPmTest, PowerButtonRaisesSciUntilStatusIsCleared) {
  pm_.pressPowerButton();
  EXPECT_FALSE(sci_.level);  // not enabled
  EXPECT_EQ(in16(kStatus), AcpiPm::kPowerButtonStatus);
  out16(kEnable, AcpiPm::kPowerButtonStatus | 0x8000);  // bit 15 is not an enable
  EXPECT_EQ(in16(kEnable), AcpiPm::kPowerButtonStatus);
  EXPECT_TRUE(sci_.level);
  out16(kStatus, AcpiPm::kWakeStatus);  // write 1 to clear another bit: no effect on PWRBTN
  EXPECT_TRUE(sci_.level);
  out16(kStatus, AcpiPm::kPowerButtonStatus);
  EXPECT_EQ(in16(kStatus), 0);
  EXPECT_FALSE(sci_.level);
  pm_.pressPowerButton();
  EXPECT_TRUE(sci_.level);
  out16(kControl, 0);  // SCI_EN off masks the SCI
  EXPECT_FALSE(sci_.level);
  EXPECT_EQ(sci_.history, (std::vector<bool>{true, false, true, false}));
}

TEST_F(AcpiPmTest, TimerRunsAt3579545Hz) {
  uint32_t start = in32(kTimer);
  EXPECT_EQ(start, 0u);
  now_ += 1'000'000'000;
  EXPECT_EQ(in32(kTimer), 3'579'545u);
  now_ += 1'000;  // 1 us: 3.58 ticks
  EXPECT_EQ(in32(kTimer), 3'579'548u);
  now_ += 1'000'000'000ull * 1200;  // wraps at 2^32 (about 20 minutes)
  uint64_t ticks = (1'000'000'000ull * 1201 + 1'000) * 3'579'545 / 1'000'000'000;
  EXPECT_EQ(in32(kTimer), static_cast<uint32_t>(ticks));
  EXPECT_GT(ticks, 0xffffffffull);
  EXPECT_LT(in32(kTimer), 10'000'000u);  // it did wrap
  uint8_t low = 0;
  pm_.read(kTimer, {&low, 1});
  EXPECT_EQ(low, static_cast<uint8_t>(ticks));
  const uint8_t junk[4] = {};
  pm_.write(kTimer, junk);  // read-only
  EXPECT_EQ(in32(kTimer), static_cast<uint32_t>(ticks));
}

TEST_F(AcpiPmTest, ReservedBytesAndOutOfRangeAccesses) {
  EXPECT_EQ(in16(6), 0xffff);
  out16(6, 0x1234);
  EXPECT_EQ(in16(6), 0xffff);
  uint8_t beyond[2] = {};
  pm_.read(20, beyond);
  EXPECT_EQ(beyond[0], 0xff);
  // A 32-bit write to the event block sets the enables and clears status in one go.
  pm_.pressPowerButton();
  const uint8_t both[4] = {0x00, 0x01, 0x00, 0x01};
  pm_.write(kStatus, both);
  EXPECT_EQ(in32(kStatus), static_cast<uint32_t>(AcpiPm::kPowerButtonStatus) << 16);
}

}  // namespace
}  // namespace clonevm::vmm
