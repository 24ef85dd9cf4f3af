#include "vmm-core/memory/guest_memory.h"

#include <gtest/gtest.h>

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <vector>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/boot/boot_test_util.h"

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

// A template's memory file of `size` bytes with data in its first half only (each 4 KiB page
// starts with its own index) and a hole after; returns its path.
std::filesystem::path writeMemoryFile(const testing::TempDir& dir, uint64_t size) {
  std::vector<uint8_t> bytes(size / 2);
  for (uint64_t page = 0; page < bytes.size() / 4096; ++page) {
    std::memcpy(bytes.data() + page * 4096, &page, sizeof(page));
  }
  auto path = dir / "memory";
  testing::writeFile(path, bytes);
  std::filesystem::resize_file(path, size);
  return path;
}

std::vector<std::pair<uint64_t, uint64_t>> firstHalf(uint64_t size) { return {{0, size / 2}}; }

uint64_t allocatedBytes(const std::filesystem::path& path) {
  struct stat info {};
  EXPECT_EQ(::stat(path.c_str(), &info), 0);
  return static_cast<uint64_t>(info.st_blocks) * 512;
}

TEST(GuestMemoryTest, CopyOnWriteMemoryReadsTheFileAndNeverWritesIt) {
  testing::TempDir dir;
  auto path = writeMemoryFile(dir, 4 * kMiB);
  uint64_t allocated = allocatedBytes(path);
  auto memory = GuestMemory::mapCopyOnWrite(path, 4 * kMiB, firstHalf(4 * kMiB));
  EXPECT_TRUE(memory.copyOnWrite());
  EXPECT_EQ(memory.readObject<uint64_t>(5 * 4096), 5u);
  memory.writeObject<uint64_t>(5 * 4096, 0xdeadbeef);
  EXPECT_EQ(memory.readObject<uint64_t>(5 * 4096), 0xdeadbeefu);
  // The hole reads as zero, written or not.
  EXPECT_EQ(memory.readObject<uint64_t>(3 * kMiB), 0u);
  memory.writeObject<uint64_t>(3 * kMiB + 4096, 7);
  EXPECT_EQ(memory.readObject<uint64_t>(3 * kMiB + 4096), 7u);
  EXPECT_EQ(memory.populate({0, 4096, 3 * kMiB, 3 * kMiB + 8192, 4 * kMiB}), 4u);
  // Touched: pages 0, 1 and 5, the hole's two written and two populated pages (the kernel
  // may map file pages around a fault too: at least these, none of the hole's others).
  auto [resident, written] = memory.residentPages();
  for (uint64_t page : std::vector<uint64_t>{0, 4096, 5 * 4096, 3 * kMiB, 3 * kMiB + 4096, 3 * kMiB + 8192}) {
    EXPECT_TRUE(std::binary_search(resident.begin(), resident.end(), page)) << page;
  }
  EXPECT_FALSE(std::binary_search(resident.begin(), resident.end(), 3 * kMiB + 3 * 4096));
  EXPECT_FALSE(std::binary_search(resident.begin(), resident.end(), 2 * kMiB + 4096));
  // Written: the file page and the hole page; a hole page only read maps the zero page.
  EXPECT_EQ(written, (std::vector<uint64_t>{5 * 4096, 3 * kMiB + 4096}));

  // A page made writable ahead is this process's copy, with the file's bytes (a hole's, all
  // zeros, is not counted as written).
  EXPECT_EQ(memory.populateWritable({7 * 4096, 3 * kMiB + 5 * 4096}), 2u);
  EXPECT_EQ(memory.residentPages().written, (std::vector<uint64_t>{5 * 4096, 7 * 4096, 3 * kMiB + 4096}));
  EXPECT_EQ(memory.readObject<uint64_t>(7 * 4096), 7u);
  EXPECT_EQ(memory.readObject<uint64_t>(3 * kMiB + 5 * 4096), 0u);

  // The file, and a second mapping of it (another fork), still hold the template's bytes,
  // and its hole is still a hole.
  std::ifstream file(path, std::ios::binary);
  file.seekg(5 * 4096);
  uint64_t onDisk = 0;
  file.read(reinterpret_cast<char*>(&onDisk), sizeof(onDisk));
  EXPECT_EQ(onDisk, 5u);
  auto sibling = GuestMemory::mapCopyOnWrite(path, 4 * kMiB, firstHalf(4 * kMiB));
  EXPECT_EQ(sibling.readObject<uint64_t>(5 * 4096), 5u);
  EXPECT_EQ(sibling.readObject<uint64_t>(3 * kMiB + 4096), 0u);
  EXPECT_EQ(allocatedBytes(path), allocated);
}

// A fork filled up front: after the unmapping, what shows as resident is what was touched
// since, and the memfd kept every byte.
TEST(GuestMemoryTest, UnmappingMemfdPagesKeepsTheirBytesAndShowsOnlyLaterTouches) {
  auto memory = GuestMemory::create(4 * kMiB);
  for (uint64_t page = 0; page < 16; ++page) memory.writeObject<uint64_t>(page * 4096, page + 1);
  EXPECT_EQ(memory.residentPages().pages.size(), 16u);
  memory.unmapPagesKeepingContents();
  EXPECT_TRUE(memory.residentPages().pages.empty());
  EXPECT_EQ(memory.readObject<uint64_t>(5 * 4096), 6u);
  memory.writeObject<uint64_t>(2 * kMiB, 7);  // a page the memfd did not hold
  auto resident = memory.residentPages().pages;
  EXPECT_TRUE(std::count(resident.begin(), resident.end(), 5 * 4096));
  EXPECT_TRUE(std::count(resident.begin(), resident.end(), 2 * kMiB));
  for (uint64_t offset : resident) {  // a read maps the memfd's neighbours too (fault-around)
    EXPECT_TRUE(offset < 16 * 4096 || offset == 2 * kMiB) << offset;
  }
  for (uint64_t page = 0; page < 16; ++page) EXPECT_EQ(memory.readObject<uint64_t>(page * 4096), page + 1);

  testing::TempDir dir;
  auto copyOnWrite = GuestMemory::mapCopyOnWrite(writeMemoryFile(dir, 2 * kMiB), 2 * kMiB, firstHalf(2 * kMiB));
  EXPECT_THROW(copyOnWrite.unmapPagesKeepingContents(), Error);
}

TEST(GuestMemoryTest, CopyOnWriteMemoryHasNoFdForDevices) {
  testing::TempDir dir;
  auto memory = GuestMemory::mapCopyOnWrite(writeMemoryFile(dir, 2 * kMiB), 2 * kMiB, firstHalf(2 * kMiB));
  EXPECT_THROW(memory.fd(), Error);
  auto moved = std::move(memory);
  EXPECT_TRUE(moved.copyOnWrite());
  EXPECT_THROW(moved.fd(), Error);
}

TEST(GuestMemoryTest, CopyOnWriteRefusesAFileOfTheWrongSizeAndExtentsOutsideIt) {
  testing::TempDir dir;
  auto path = writeMemoryFile(dir, 2 * kMiB);
  try {
    GuestMemory::mapCopyOnWrite(path, 4 * kMiB, firstHalf(4 * kMiB));
    FAIL() << "a truncated memory file was mapped";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("found 2097152 bytes"), std::string::npos) << e.what();
  }
  EXPECT_THROW(GuestMemory::mapCopyOnWrite(dir / "missing", 2 * kMiB, {}), Error);
  EXPECT_THROW(GuestMemory::mapCopyOnWrite(path, 2 * kMiB, {{kMiB, 2 * kMiB}}), Error);
}

}  // namespace
}  // namespace clonevm::vmm
