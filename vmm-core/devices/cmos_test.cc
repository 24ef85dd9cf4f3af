#include "vmm-core/devices/cmos.h"

#include <atomic>
#include <chrono>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/devices/fake_irq_line.h"

namespace clonevm::vmm {
namespace {

constexpr int64_t kSecond = 1'000'000'000;
constexpr int64_t kMonday20261123_015418 = 1795398858;  // UTC

class CmosTest : public ::testing::Test {
 protected:
  CmosTest()
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        cmos_(3ull << 30, 1ull << 30, [this] { return now_; }, log_,
              Cmos::Options{.irq = &irq_, .timerThread = false}) {}

  uint8_t get(uint8_t index) {
    cmos_.write(0, {&index, 1});
    uint8_t value = 0;
    cmos_.read(1, {&value, 1});
    return value;
  }
  void set(uint8_t index, uint8_t value) {
    cmos_.write(0, {&index, 1});
    cmos_.write(1, {&value, 1});
  }

  int64_t now_ = kMonday20261123_015418 * kSecond + kSecond / 2;
  FakeIrqLine irq_;
  spdlog::logger log_;
  Cmos cmos_;
};

TEST_F(CmosTest, TimeInBcdByDefault) {
  EXPECT_EQ(get(0x0b) & 0x06, 0x02);  // BCD, 24-hour
  EXPECT_EQ(get(0x00), 0x18);
  EXPECT_EQ(get(0x02), 0x54);
  EXPECT_EQ(get(0x04), 0x01);
  EXPECT_EQ(get(0x06), 0x02);  // Monday (Sunday = 1)
  EXPECT_EQ(get(0x07), 0x23);
  EXPECT_EQ(get(0x08), 0x11);
  EXPECT_EQ(get(0x09), 0x26);
  EXPECT_EQ(get(0x32), 0x20);
}

TEST_F(CmosTest, TimeInBinaryWithTheDmBit) {
  set(0x0b, 0x06);
  EXPECT_EQ(get(0x00), 18);
  EXPECT_EQ(get(0x02), 54);
  EXPECT_EQ(get(0x07), 23);
  EXPECT_EQ(get(0x08), 11);
  EXPECT_EQ(get(0x09), 26);
  EXPECT_EQ(get(0x32), 20);
}

TEST_F(CmosTest, TwelveHourMode) {
  set(0x0b, 0x00);  // BCD, 12-hour
  EXPECT_EQ(get(0x04), 0x01);  // 1 AM
  now_ += 12 * 3600 * kSecond;
  EXPECT_EQ(get(0x04), 0x81);  // 1 PM
  now_ -= 2 * 3600 * kSecond;
  EXPECT_EQ(get(0x04), 0x11);  // 11 AM
  now_ += 3600 * kSecond;
  EXPECT_EQ(get(0x04), 0x92);  // 12 PM
  set(0x0b, 0x04);  // binary, 12-hour
  EXPECT_EQ(get(0x04), 0x80 | 12);
  now_ = (kMonday20261123_015418 - 3600) * kSecond;  // 00:54
  EXPECT_EQ(get(0x04), 12);  // 12 AM
}

TEST_F(CmosTest, IndexIgnoresTheNmiBit) {
  uint8_t index = 0x80 | 0x02;
  cmos_.write(0, {&index, 1});
  uint8_t value = 0;
  cmos_.read(1, {&value, 1});
  EXPECT_EQ(value, 0x54);
  cmos_.read(0, {&value, 1});
  EXPECT_EQ(value, 0xff);
}

TEST_F(CmosTest, TimeFollowsTheClock) {
  now_ += 2 * kSecond;
  EXPECT_EQ(get(0x00), 0x20);
  now_ += 24 * 3600 * kSecond;
  EXPECT_EQ(get(0x07), 0x24);
  EXPECT_EQ(get(0x06), 0x03);  // Tuesday
}

TEST_F(CmosTest, UpdateInProgressJustBeforeTheSecondBoundary) {
  EXPECT_EQ(get(0x0a), 0x26);
  now_ = kMonday20261123_015418 * kSecond + kSecond - 100'000;  // 100 us before the update
  EXPECT_EQ(get(0x0a), 0xa6);
  EXPECT_EQ(get(0x00), 0x18);  // still the old second while UIP is up
  now_ += 100'000;
  EXPECT_EQ(get(0x0a), 0x26);
  EXPECT_EQ(get(0x00), 0x19);
  now_ -= 100'000;
  set(0x0b, 0x82);  // SET: updates stop, so no UIP
  EXPECT_EQ(get(0x0a), 0x26);
  set(0x0a, 0xa6);  // UIP is read-only
  set(0x0b, 0x02);
  now_ += 100'000 - kSecond / 2;
  EXPECT_EQ(get(0x0a), 0x26);
}

TEST_F(CmosTest, GuestSetsTheTimeWithTheSetBit) {
  set(0x0b, 0x82);
  set(0x32, 0x20);
  set(0x09, 0x30);
  set(0x08, 0x01);
  set(0x07, 0x02);
  set(0x04, 0x03);
  set(0x02, 0x04);
  set(0x00, 0x05);
  now_ += 10 * kSecond;  // frozen while SET is 1
  EXPECT_EQ(get(0x00), 0x05);
  EXPECT_EQ(get(0x09), 0x30);
  set(0x0b, 0x02);
  EXPECT_EQ(get(0x00), 0x05);
  now_ += 3 * kSecond;
  EXPECT_EQ(get(0x00), 0x08);
  EXPECT_EQ(get(0x02), 0x04);
  EXPECT_EQ(get(0x04), 0x03);
  EXPECT_EQ(get(0x06), 0x04);  // 2030-01-02 is a Wednesday
  EXPECT_EQ(get(0x07), 0x02);
  EXPECT_EQ(get(0x08), 0x01);
  EXPECT_EQ(get(0x09), 0x30);
  EXPECT_EQ(get(0x32), 0x20);
}

TEST_F(CmosTest, DirectWriteInBinaryTwelveHourMode) {
  set(0x0b, 0x04);     // binary, 12-hour
  set(0x04, 0x80 | 12);  // 12 PM
  set(0x02, 30);
  set(0x0b, 0x06);     // binary, 24-hour
  EXPECT_EQ(get(0x04), 12);
  EXPECT_EQ(get(0x02), 30);
  EXPECT_EQ(get(0x07), 23);  // the date did not move
}

TEST_F(CmosTest, RegisterCReportsUpdatesAndClearsOnRead) {
  EXPECT_EQ(get(0x0c), 0x00);
  now_ += kSecond;
  EXPECT_EQ(get(0x0c), 0x10);  // UF
  EXPECT_EQ(get(0x0c), 0x00);  // cleared by the read
  set(0x0b, 0x12);             // UIE
  now_ += kSecond;
  EXPECT_EQ(get(0x0c), 0x90);  // IRQF | UF
  EXPECT_EQ(get(0x0c), 0x00);
  set(0x0c, 0xff);  // read-only
  EXPECT_EQ(get(0x0c), 0x00);
  EXPECT_EQ(get(0x0d), 0x80);
  set(0x0b, 0x92);  // SET clears UIE
  EXPECT_EQ(get(0x0b), 0x82);
}

TEST_F(CmosTest, UpdateInterrupt) {
  set(0x0b, 0x12);  // UIE
  EXPECT_FALSE(irq_.level);
  now_ += kSecond;
  cmos_.poll();
  EXPECT_TRUE(irq_.level);
  EXPECT_EQ(get(0x0c), 0x90);
  EXPECT_FALSE(irq_.level);
  now_ += 3 * kSecond;  // several updates, one flag
  cmos_.poll();
  EXPECT_TRUE(irq_.level);
  set(0x0b, 0x02);  // disabling UIE drops the line, UF stays pending
  EXPECT_FALSE(irq_.level);
  EXPECT_EQ(get(0x0c), 0x10);
  EXPECT_EQ(irq_.history, (std::vector<bool>{true, false, true, false}));
}

TEST_F(CmosTest, AlarmInterrupt) {
  // 01:54:18 now; alarm at 01:54:20 in BCD.
  set(0x01, 0x20);
  set(0x03, 0x54);
  set(0x05, 0x01);
  get(0x0c);
  set(0x0b, 0x22);  // AIE
  now_ += kSecond;
  cmos_.poll();
  EXPECT_FALSE(irq_.level);
  EXPECT_EQ(get(0x0c), 0x10);  // UF only
  now_ += kSecond;
  cmos_.poll();
  EXPECT_TRUE(irq_.level);
  EXPECT_EQ(get(0x0c), 0xb0);  // IRQF | AF | UF
  EXPECT_FALSE(irq_.level);
  // Don't-care hours and minutes: any hh:mm:30. Passing it between two polls still counts.
  set(0x01, 0x30);
  set(0x03, 0xc0);
  set(0x05, 0xff);
  now_ += 15 * kSecond;  // 01:54:35
  EXPECT_EQ(get(0x0c), 0xb0);
  now_ += 30 * kSecond;  // 01:55:05
  EXPECT_EQ(get(0x0c), 0x10);
}

TEST_F(CmosTest, AlarmInTwelveHourBinaryMode) {
  set(0x0b, 0x24);  // AIE, binary, 12-hour
  set(0x01, 0);
  set(0x03, 0);
  set(0x05, 0x80 | 2);  // 2 PM
  now_ = (kMonday20261123_015418 + 12 * 3600 + 5 * 60 + 41) * kSecond;  // 13:59:59
  get(0x0c);
  now_ += kSecond;
  EXPECT_EQ(get(0x0c), 0xb0);
}

TEST(CmosTimerTest, TimerThreadRaisesTheUpdateInterruptOnTime) {
  class AtomicIrq : public IrqLine {
   public:
    void set(bool asserted) override { level = asserted; }
    std::atomic<bool> level{false};
  } irq;
  spdlog::logger log("test", std::make_shared<spdlog::sinks::null_sink_mt>());
  Cmos cmos(64 << 20, 0, systemWallClock(), log, Cmos::Options{.irq = &irq});
  auto access = [&](uint8_t index, std::optional<uint8_t> value) {
    cmos.write(0, {&index, 1});
    uint8_t byte = value.value_or(0);
    if (value) {
      cmos.write(1, {&byte, 1});
    } else {
      cmos.read(1, {&byte, 1});
    }
    return byte;
  };
  access(0x0c, std::nullopt);
  access(0x0b, 0x12);  // UIE
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(2500);
  while (!irq.level && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_TRUE(irq.level) << "no update interrupt within 2.5 s";
  EXPECT_EQ(access(0x0c, std::nullopt) & 0x90, 0x90);
  EXPECT_FALSE(irq.level);
}

TEST_F(CmosTest, MemorySizeRegisters) {
  EXPECT_EQ(get(0x15) | get(0x16) << 8, 640);
  EXPECT_EQ(get(0x17) | get(0x18) << 8, 0xffff);
  EXPECT_EQ(get(0x30) | get(0x31) << 8, 0xffff);
  EXPECT_EQ(get(0x34) | get(0x35) << 8, ((3u << 30) - (16u << 20)) >> 16);
  EXPECT_EQ(get(0x5b) | get(0x5c) << 8 | get(0x5d) << 16, (1u << 30) >> 16);

  Cmos small(64ull << 20, 0, [] { return int64_t{0}; }, log_);
  auto read = [&](uint8_t index) {
    small.write(0, {&index, 1});
    uint8_t value = 0;
    small.read(1, {&value, 1});
    return value;
  };
  EXPECT_EQ(read(0x30) | read(0x31) << 8, 63 * 1024);
  EXPECT_EQ(read(0x34) | read(0x35) << 8, 48 * 16);
  EXPECT_EQ(read(0x5b) | read(0x5c) | read(0x5d), 0);
  EXPECT_EQ(read(0x09), 0x70);  // the epoch: 1970
}

TEST_F(CmosTest, NvramAndOddAccesses) {
  set(0x40, 0x5a);
  EXPECT_EQ(get(0x40), 0x5a);
  set(0x7f, 0xa5);
  EXPECT_EQ(get(0x7f), 0xa5);
  uint8_t wide[2] = {};
  cmos_.read(0, wide);
  EXPECT_EQ(wide[0], 0xff);
  EXPECT_EQ(wide[1], 0xff);
  const uint8_t junk[2] = {0x00, 0x00};
  cmos_.write(0, junk);  // ignored: index stays 0x7f
  uint8_t value = 0;
  cmos_.read(1, {&value, 1});
  EXPECT_EQ(value, 0xa5);
}

}  // namespace
}  // namespace clonevm::vmm
