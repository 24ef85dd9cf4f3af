#include "vmm-core/memory/guest_memory.h"

#include <gtest/gtest.h>

#include "common/error.h"
#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

using layout::kGiB;
using layout::kMiB;

TEST(GuestMemoryTest, SmallMemoryIsOneRegionAtZero) {
  auto memory = GuestMemory::create(64 * kMiB);
  ASSERT_EQ(memory.regions().size(), 1u);
  EXPECT_EQ(memory.regions()[0].guestAddress, 0u);
  EXPECT_EQ(memory.regions()[0].size, 64 * kMiB);
  EXPECT_EQ(memory.endAddress(), 64 * kMiB);
  EXPECT_GE(memory.fd(), 0);
}

TEST(GuestMemoryTest, LargeMemorySplitsAroundPciHole) {
  auto memory = GuestMemory::create(4 * kGiB + 512 * kMiB);
  ASSERT_EQ(memory.regions().size(), 2u);
  EXPECT_EQ(memory.regions()[0].size, 3 * kGiB);
  EXPECT_EQ(memory.regions()[1].guestAddress, 4 * kGiB);
  EXPECT_EQ(memory.regions()[1].size, 1 * kGiB + 512 * kMiB);
  EXPECT_EQ(memory.regions()[1].fdOffset, 3 * kGiB);
  EXPECT_EQ(memory.endAddress(), 5 * kGiB + 512 * kMiB);
  EXPECT_FALSE(memory.contains(3 * kGiB, 1));
  EXPECT_TRUE(memory.contains(4 * kGiB, 4096));
}

TEST(GuestMemoryTest, ReadWriteRoundTrip) {
  auto memory = GuestMemory::create(4 * kMiB);
  memory.writeObject<uint64_t>(0x1000, 0x1122334455667788ull);
  EXPECT_EQ(memory.readObject<uint64_t>(0x1000), 0x1122334455667788ull);
  EXPECT_EQ(memory.readObject<uint8_t>(0x1000), 0x88);
}

TEST(GuestMemoryTest, RejectsRangesOutsideRam) {
  auto memory = GuestMemory::create(4 * kMiB);
  EXPECT_THROW(memory.slice(4 * kMiB - 4, 8), Error);
  EXPECT_THROW(memory.slice(~0ull - 2, 8), Error);  // wraps around
  EXPECT_THROW(memory.slice(8 * kMiB, 1), Error);
  EXPECT_NO_THROW(memory.slice(4 * kMiB - 8, 8));
  EXPECT_NO_THROW(memory.slice(4 * kMiB, 0));
}

TEST(GuestMemoryTest, RejectsBadSizes) {
  EXPECT_THROW(GuestMemory::create(0), Error);
  EXPECT_THROW(GuestMemory::create(3 * kMiB), Error);
}

}  // namespace
}  // namespace clonevm::vmm
