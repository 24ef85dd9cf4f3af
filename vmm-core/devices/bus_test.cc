#include "vmm-core/devices/bus.h"

#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm::vmm {
namespace {

class RecordingDevice : public BusDevice {
 public:
  void read(uint64_t offset, std::span<uint8_t> data) override {
    for (auto& byte : data) byte = static_cast<uint8_t>(offset);
    lastOffset = offset;
  }
  void write(uint64_t offset, std::span<const uint8_t> data) override {
    lastOffset = offset;
    written.assign(data.begin(), data.end());
  }
  uint64_t lastOffset = ~0ull;
  std::vector<uint8_t> written;
};

TEST(BusTest, DispatchesWithOffsetsRelativeToBase) {
  Bus bus("pio");
  auto device = std::make_shared<RecordingDevice>();
  bus.insert(0x3f8, 8, device);
  uint8_t value = 0;
  ASSERT_TRUE(bus.read(0x3fd, {&value, 1}));
  EXPECT_EQ(value, 5);
  const uint8_t out[2] = {1, 2};
  ASSERT_TRUE(bus.write(0x3f8, out));
  EXPECT_EQ(device->lastOffset, 0u);
  EXPECT_EQ(device->written, (std::vector<uint8_t>{1, 2}));
}

TEST(BusTest, UnclaimedAndStraddlingAccessesAreNotDispatched) {
  Bus bus("pio");
  bus.insert(0x70, 2, std::make_shared<RecordingDevice>());
  uint8_t bytes[4] = {};
  EXPECT_FALSE(bus.read(0x72, {bytes, 1}));
  EXPECT_FALSE(bus.read(0x6f, {bytes, 1}));
  EXPECT_FALSE(bus.read(0x71, {bytes, 2}));  // runs past the end of the range
  EXPECT_TRUE(bus.read(0x70, {bytes, 2}));
}

TEST(BusTest, OneDeviceCanOwnDisjointRangesWithADeviceOffset) {
  Bus bus("pio");
  auto device = std::make_shared<RecordingDevice>();
  bus.insert(0x60, 1, device);
  bus.insert(0x64, 1, device, 4);
  uint8_t value = 0;
  ASSERT_TRUE(bus.read(0x64, {&value, 1}));
  EXPECT_EQ(value, 4);
  const uint8_t out[1] = {0xfe};
  ASSERT_TRUE(bus.write(0x60, out));
  EXPECT_EQ(device->lastOffset, 0u);
  EXPECT_FALSE(bus.read(0x61, {&value, 1}));
  EXPECT_THROW(bus.insert(0x70, 1, nullptr), Error);
}

TEST(BusTest, RemoveFreesTheRange) {
  Bus bus("mmio");
  auto device = std::make_shared<RecordingDevice>();
  bus.insert(0xc0000000, 0x1000, device);
  EXPECT_EQ(bus.remove(0xc0000800), nullptr);  // only the exact base
  EXPECT_EQ(bus.remove(0xc0000000), device);
  uint8_t value = 0;
  EXPECT_FALSE(bus.read(0xc0000000, {&value, 1}));
  EXPECT_EQ(bus.remove(0xc0000000), nullptr);
  bus.insert(0xc0000800, 0x1000, device);  // the old range no longer blocks
  EXPECT_TRUE(bus.read(0xc0000800, {&value, 1}));
}

TEST(BusTest, RejectsOverlaps) {
  Bus bus("mmio");
  bus.insert(0x1000, 0x100, std::make_shared<RecordingDevice>());
  EXPECT_THROW(bus.insert(0x10ff, 1, std::make_shared<RecordingDevice>()), Error);
  EXPECT_THROW(bus.insert(0xf00, 0x101, std::make_shared<RecordingDevice>()), Error);
  EXPECT_THROW(bus.insert(0x2000, 0, std::make_shared<RecordingDevice>()), Error);
  EXPECT_NO_THROW(bus.insert(0x1100, 0x100, std::make_shared<RecordingDevice>()));
  EXPECT_NO_THROW(bus.insert(0xf00, 0x100, std::make_shared<RecordingDevice>()));
}

}  // namespace
}  // namespace clonevm::vmm
