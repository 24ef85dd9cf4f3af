#include "vmm-core/devices/port_stubs.h"

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

TEST(PortStubsTest, PostCodePortKeepsTheLastCode) {
  spdlog::logger log("test", std::make_shared<spdlog::sinks::null_sink_mt>());
  Bus pio("pio");
  auto post = std::make_shared<PostCodePort>(log);
  pio.insert(layout::kPostCodePort, 1, post);
  const uint8_t code = 0x42;
  ASSERT_TRUE(pio.write(layout::kPostCodePort, {&code, 1}));
  EXPECT_EQ(post->lastCode(), 0x42);
  uint8_t value = 0;
  ASSERT_TRUE(pio.read(layout::kPostCodePort, {&value, 1}));
  EXPECT_EQ(value, 0x42);
  EXPECT_FALSE(pio.read(layout::kPostCodePort + 1, {&value, 1}));
}

TEST(PortStubsTest, NullPortsReadTheirValueAndDropWrites) {
  NullPorts zeros(0x00);
  uint8_t bytes[4] = {1, 2, 3, 4};
  zeros.read(0, bytes);
  EXPECT_EQ(bytes[0] | bytes[1] | bytes[2] | bytes[3], 0);
  NullPorts ones;
  const uint8_t junk[2] = {9, 9};
  ones.write(1, junk);
  ones.read(1, {bytes, 2});
  EXPECT_EQ(bytes[0], 0xff);
  EXPECT_EQ(bytes[1], 0xff);
}

}  // namespace
}  // namespace clonevm::vmm
