#include "vmm-core/devices/i8042.h"

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/devices/fake_irq_line.h"

namespace clonevm::vmm {
namespace {

constexpr uint8_t kObf = 0x01, kAuxData = 0x20, kTimeout = 0x40;

class I8042Test : public ::testing::Test {
 protected:
  I8042Test()
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        kbc_(keyboardIrq_, auxIrq_, [this] { ++resets_; }, log_) {}

  uint8_t status() { return in(I8042::kCommandOffset); }
  uint8_t data() { return in(I8042::kDataOffset); }
  void command(uint8_t value) { out(I8042::kCommandOffset, value); }
  void writeData(uint8_t value) { out(I8042::kDataOffset, value); }
  uint8_t in(uint64_t offset) {
    uint8_t value = 0;
    kbc_.read(offset, {&value, 1});
    return value;
  }
  void out(uint64_t offset, uint8_t value) { kbc_.write(offset, {&value, 1}); }
  // What Linux's i8042_command() does for a command with one result byte.
  uint8_t query(uint8_t cmd) {
    command(cmd);
    EXPECT_TRUE(status() & kObf) << "no reply to " << int(cmd);
    return data();
  }

  FakeIrqLine keyboardIrq_;
  FakeIrqLine auxIrq_;
  spdlog::logger log_;
  int resets_ = 0;
  I8042 kbc_;
};

TEST_F(I8042Test, IdleStatusHasNoDataAndNoKeyLock) {
  EXPECT_EQ(status() & kObf, 0);
  EXPECT_EQ(status() & 0x10, 0x10);  // Linux warns "Keylock active" without it
  EXPECT_NE(status(), 0xff);         // 0xff would read as "no controller"
}

TEST_F(I8042Test, SelfTestAndInterfaceTests) {
  EXPECT_EQ(query(0xaa), 0x55);
  EXPECT_EQ(status() & kObf, 0);
  EXPECT_EQ(query(0xab), 0x00);
  EXPECT_EQ(query(0xa9), 0x00);
}

TEST_F(I8042Test, CommandByteReadWrite) {
  EXPECT_EQ(query(0x20), 0x65);
  command(0x60);
  EXPECT_EQ(status() & 0x08, 0x08);  // last write was a command
  writeData(0x47);
  EXPECT_EQ(status() & 0x08, 0x00);
  EXPECT_EQ(query(0x20), 0x47);
  command(0xad);
  EXPECT_EQ(query(0x20) & 0x10, 0x10);
  command(0xae);
  EXPECT_EQ(query(0x20) & 0x10, 0x00);
  command(0xa7);
  EXPECT_EQ(query(0x20) & 0x20, 0x20);
  command(0xa8);
  EXPECT_EQ(query(0x20) & 0x20, 0x00);
}

TEST_F(I8042Test, PulseResetCallsTheResetCallback) {
  command(0xff);  // pulses no line
  command(0xfd);
  EXPECT_EQ(resets_, 0);
  command(0xfe);
  EXPECT_EQ(resets_, 1);
  command(0xd1);
  writeData(0x03);  // reset line stays high
  EXPECT_EQ(resets_, 1);
  command(0xd1);
  writeData(0x02);  // reset line low
  EXPECT_EQ(resets_, 2);
  EXPECT_EQ(query(0xd0) & 0x01, 0x01);
}

TEST_F(I8042Test, AuxLoopbackRaisesTheAuxIrq) {
  // Linux's i8042_check_aux(): loop 0x5a through the aux port, then again with IRQ 12 on.
  command(0xd3);
  writeData(0x5a);
  EXPECT_EQ(status() & (kObf | kAuxData), kObf | kAuxData);
  EXPECT_FALSE(auxIrq_.level);  // aux interrupt not enabled yet
  EXPECT_EQ(data(), 0x5a);
  command(0x60);
  writeData(0x47);  // aux enabled, aux interrupt on
  command(0xd3);
  writeData(0xa5);
  EXPECT_TRUE(auxIrq_.level);
  EXPECT_FALSE(keyboardIrq_.level);
  EXPECT_EQ(data(), 0xa5);
  EXPECT_FALSE(auxIrq_.level);
}

TEST_F(I8042Test, AbsentDevicesAnswerWithTimeout) {
  writeData(0xf2);  // GET ID to the keyboard
  EXPECT_EQ(status() & (kObf | kAuxData | kTimeout), kObf | kTimeout);
  EXPECT_TRUE(keyboardIrq_.level);
  EXPECT_EQ(data(), 0xfe);
  EXPECT_FALSE(keyboardIrq_.level);
  command(0xd4);
  writeData(0xff);  // reset the mouse
  EXPECT_EQ(status() & (kObf | kAuxData | kTimeout), kObf | kAuxData | kTimeout);
  EXPECT_EQ(data(), 0xfe);
  EXPECT_EQ(status() & kObf, 0);
}

TEST_F(I8042Test, EachQueuedByteGetsItsOwnEdge) {
  command(0xd2);
  writeData(0x11);
  command(0xd2);
  writeData(0x22);
  EXPECT_EQ(keyboardIrq_.history, (std::vector<bool>{true}));
  EXPECT_EQ(data(), 0x11);
  EXPECT_EQ(keyboardIrq_.history, (std::vector<bool>{true, false, true}));
  EXPECT_EQ(data(), 0x22);
  EXPECT_EQ(keyboardIrq_.history, (std::vector<bool>{true, false, true, false}));
  EXPECT_EQ(data(), 0x22);  // empty buffer: the last byte again
  EXPECT_EQ(status() & kObf, 0);
}

TEST_F(I8042Test, ARunawayGuestCannotGrowTheQueue) {
  for (int i = 0; i < 1000; ++i) command(0x20);
  int bytes = 0;
  while ((status() & kObf) && bytes < 1000) {
    data();
    ++bytes;
  }
  EXPECT_LE(bytes, 17);
  EXPECT_GE(bytes, 1);
}

TEST_F(I8042Test, OddAccessesAreIgnored) {
  uint8_t wide[2] = {};
  kbc_.read(I8042::kDataOffset, wide);
  EXPECT_EQ(wide[0], 0xff);
  EXPECT_EQ(wide[1], 0xff);
  const uint8_t reset[2] = {0xfe, 0xfe};
  kbc_.write(I8042::kCommandOffset, reset);  // 16-bit write: not a command
  out(2, 0xfe);
  EXPECT_EQ(resets_, 0);
  EXPECT_EQ(in(1), 0xff);
}

}  // namespace
}  // namespace clonevm::vmm
