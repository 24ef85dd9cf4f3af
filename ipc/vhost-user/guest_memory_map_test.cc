#include "ipc/vhost-user/guest_memory_map.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include <gtest/gtest.h>

#include "ipc/vhost-user/test_guest.h"

namespace clonevm::ipc::vhost {
namespace {

using testing::TestGuestMemory;

UniqueFd memfd(uint64_t size) {
  UniqueFd fd(::memfd_create("map-test", MFD_CLOEXEC));
  EXPECT_EQ(::ftruncate(fd.get(), static_cast<off_t>(size)), 0);
  return fd;
}

std::vector<UniqueFd> fds(std::initializer_list<uint64_t> sizes) {
  std::vector<UniqueFd> result;
  for (uint64_t size : sizes) result.push_back(memfd(size));
  return result;
}

void expectTableRejected(std::vector<MemoryRegion> regions, std::vector<UniqueFd> files,
                         const std::string& fragment) {
  GuestMemoryMap map;
  try {
    map.setTable(regions, std::move(files));
    FAIL() << "accepted a table that should fail with '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
  EXPECT_EQ(map.regionCount(), 0u);
}

TEST(GuestMemoryMapTest, TranslatesGuestAndUserAddressesOfOneMapping) {
  TestGuestMemory guest(1 << 16, 0x40000000);
  GuestMemoryMap map = guest.mapForBackend();
  std::memcpy(guest.host(0x40000100), "hello", 5);

  auto byGuest = map.translateContiguous(AddressSpace::kGuestPhysical, 0x40000100, 5);
  auto byUser = map.translateContiguous(AddressSpace::kFrontendUser, guest.userOf(0x40000100), 5);
  ASSERT_EQ(byGuest.size(), 5u);
  EXPECT_EQ(byGuest.data(), byUser.data());
  EXPECT_EQ(std::memcmp(byGuest.data(), "hello", 5), 0);
  // Our mapping is shared with the guest's: writes are seen both ways.
  byGuest[0] = 'J';
  EXPECT_EQ(*guest.host(0x40000100), 'J');
}

TEST(GuestMemoryMapTest, RejectsRangesOutsideMemory) {
  TestGuestMemory guest(1 << 16, 0x40000000);
  GuestMemoryMap map = guest.mapForBackend();
  std::vector<GuestSpan> spans;
  EXPECT_THROW(map.translate(AddressSpace::kGuestPhysical, 0x3fffffff, 2, spans), Error);
  EXPECT_THROW(map.translate(AddressSpace::kGuestPhysical, 0x4000ffff, 2, spans), Error);
  EXPECT_THROW(map.translate(AddressSpace::kGuestPhysical, 0x40000000, (1 << 16) + 1, spans), Error);
  EXPECT_THROW(map.translate(AddressSpace::kGuestPhysical, ~0ull - 1, 16, spans), Error);
  EXPECT_THROW(map.translate(AddressSpace::kGuestPhysical, 0x40000000, ~0ull, spans), Error);
  // A user address is not a guest address.
  EXPECT_THROW(map.translate(AddressSpace::kFrontendUser, 0x40000000, 1, spans), Error);
  EXPECT_TRUE(spans.empty());
  EXPECT_NO_THROW(map.translate(AddressSpace::kGuestPhysical, 0x4000ffff, 1, spans));
  EXPECT_NO_THROW(map.translate(AddressSpace::kGuestPhysical, 0x99999999, 0, spans));
  EXPECT_EQ(spans.size(), 1u);
}

TEST(GuestMemoryMapTest, RangesCrossAdjacentRegionsAsSeveralSpans) {
  GuestMemoryMap map;
  std::vector<MemoryRegion> regions = {{0x0, 0x1000, 0x10000, 0}, {0x1000, 0x1000, 0x20000, 0}};
  map.setTable(regions, fds({0x1000, 0x1000}));
  std::vector<GuestSpan> spans;
  map.translate(AddressSpace::kGuestPhysical, 0xff0, 0x20, spans);
  ASSERT_EQ(spans.size(), 2u);
  EXPECT_EQ(spans[0].size(), 0x10u);
  EXPECT_EQ(spans[1].size(), 0x10u);
  // Rings must not straddle regions.
  EXPECT_THROW(map.translateContiguous(AddressSpace::kGuestPhysical, 0xff0, 0x20), Error);
  // The user ranges are not adjacent, so the same crossing fails there.
  spans.clear();
  EXPECT_THROW(map.translate(AddressSpace::kFrontendUser, 0x10ff0, 0x20, spans), Error);
}

TEST(GuestMemoryMapTest, RejectsZeroSize) {
  expectTableRejected({{0, 0, 0x1000, 0}}, fds({0x1000}), "zero size");
}

TEST(GuestMemoryMapTest, RejectsWraparound) {
  expectTableRejected({{~0ull - 0xfff, 0x2000, 0x1000, 0}}, fds({0x2000}),
                      "wraps around the guest physical");
  expectTableRejected({{0, 0x2000, ~0ull - 0xfff, 0}}, fds({0x2000}), "wraps around the user");
  expectTableRejected({{0, 0x2000, 0x1000, ~0ull - 0xfff}}, fds({0x2000}),
                      "wraps around the file offset");
}

TEST(GuestMemoryMapTest, RejectsOverlaps) {
  expectTableRejected({{0x0, 0x2000, 0x10000, 0}, {0x1000, 0x1000, 0x20000, 0}},
                      fds({0x2000, 0x1000}), "in guest physical space");
  expectTableRejected({{0x0, 0x1000, 0x10000, 0}, {0x8000, 0x1000, 0x10800, 0}},
                      fds({0x1000, 0x1000}), "in user address space");
}

TEST(GuestMemoryMapTest, RejectsAFileShorterThanTheRegion) {
  // Mapping beyond the end of the file would SIGBUS on access.
  expectTableRejected({{0, 0x4000, 0x10000, 0}}, fds({0x1000}), "only 0x1000 bytes");
  expectTableRejected({{0, 0x1000, 0x10000, 0x1000}}, fds({0x1000}), "only 0x1000 bytes");
}

TEST(GuestMemoryMapTest, RejectsFdsThatAreNotFiles) {
  int pipeFds[2];
  ASSERT_EQ(::pipe(pipeFds), 0);
  std::vector<UniqueFd> files;
  files.emplace_back(pipeFds[0]);
  UniqueFd writeEnd(pipeFds[1]);
  expectTableRejected({{0, 0x1000, 0x10000, 0}}, std::move(files), "not a regular file");
}

TEST(GuestMemoryMapTest, MapsAtAnUnalignedFileOffset) {
  UniqueFd file = memfd(0x3000);
  uint8_t marker = 0x5a;
  ASSERT_EQ(::pwrite(file.get(), &marker, 1, 0x1234), 1);
  GuestMemoryMap map;
  std::vector<UniqueFd> files;
  files.push_back(std::move(file));
  MemoryRegion region{0x100000, 0x1000, 0x7000000, 0x1234};
  map.setTable(std::span<const MemoryRegion>(&region, 1), std::move(files));
  EXPECT_EQ(map.translateContiguous(AddressSpace::kGuestPhysical, 0x100000, 1)[0], 0x5a);
}

TEST(GuestMemoryMapTest, AFailedTableKeepsTheOldOne) {
  TestGuestMemory guest(1 << 16, 0x40000000);
  GuestMemoryMap map = guest.mapForBackend();
  uint64_t generation = map.generation();
  EXPECT_THROW(map.setTable(std::vector<MemoryRegion>{{0, 0, 0, 0}}, fds({0x1000})), Error);
  EXPECT_EQ(map.regionCount(), 1u);
  EXPECT_EQ(map.generation(), generation);
  EXPECT_NO_THROW(map.translateContiguous(AddressSpace::kGuestPhysical, 0x40000000, 16));
}

TEST(GuestMemoryMapTest, AddAndRemoveRegions) {
  GuestMemoryMap map(2);
  map.addRegion({0x0, 0x1000, 0x10000, 0}, memfd(0x1000));
  map.addRegion({0x2000, 0x1000, 0x30000, 0}, memfd(0x1000));
  EXPECT_EQ(map.regionCount(), 2u);
  try {
    map.addRegion({0x8000, 0x1000, 0x80000, 0}, memfd(0x1000));
    FAIL() << "a third region fit in two slots";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("all 2 slots used"), std::string::npos) << e.what();
  }
  EXPECT_THROW(map.addRegion({0x0, 0x1000, 0x90000, 0}, memfd(0x1000)), Error);  // overlap
  // Removal ignores the mmap offset but needs guest address, user address and size to match.
  EXPECT_THROW(map.removeRegion({0x2000, 0x1000, 0x31000, 0}), Error);
  map.removeRegion({0x2000, 0x1000, 0x30000, 0x5000});
  EXPECT_EQ(map.regionCount(), 1u);
  std::vector<GuestSpan> spans;
  EXPECT_THROW(map.translate(AddressSpace::kGuestPhysical, 0x2000, 1, spans), Error);
}

TEST(GuestMemoryMapTest, TableLargerThanTheSlotsIsRejected) {
  GuestMemoryMap map(1);
  EXPECT_THROW(map.setTable(std::vector<MemoryRegion>{{0, 0x1000, 0x10000, 0},
                                                      {0x1000, 0x1000, 0x20000, 0}},
                            fds({0x1000, 0x1000})),
               Error);
}

}  // namespace
}  // namespace clonevm::ipc::vhost
