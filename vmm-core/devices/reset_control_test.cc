#include "vmm-core/devices/reset_control.h"

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

class ResetControlTest : public ::testing::Test {
 protected:
  ResetControlTest()
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        reset_([this] { ++resets_; }, log_) {}

  void out(uint8_t value) { reset_.write(0, {&value, 1}); }
  uint8_t in() {
    uint8_t value = 0;
    reset_.read(0, {&value, 1});
    return value;
  }

  spdlog::logger log_;
  int resets_ = 0;
  ResetControl reset_;
};

TEST_F(ResetControlTest, ResetValueResets) {
  out(layout::kResetValue);
  EXPECT_EQ(resets_, 1);
}

TEST_F(ResetControlTest, LinuxRebootPciSequence) {
  out(0x02);  // SYS_RST alone only selects the kind of reset
  EXPECT_EQ(resets_, 0);
  EXPECT_EQ(in(), 0x02);
  out(0x06);
  EXPECT_EQ(resets_, 1);
  EXPECT_EQ(in(), 0x02);  // RST_CPU does not stick
}

TEST_F(ResetControlTest, WideAccessesAreIgnored) {
  const uint8_t wide[2] = {0x06, 0x06};
  reset_.write(0, wide);
  EXPECT_EQ(resets_, 0);
  uint8_t bytes[2] = {};
  reset_.read(0, bytes);
  EXPECT_EQ(bytes[0], 0xff);
}

}  // namespace
}  // namespace clonevm::vmm
