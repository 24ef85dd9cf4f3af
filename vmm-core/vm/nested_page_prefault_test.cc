// The prefault helper's memory image, without KVM: its loop, page tables that map guest RAM
// and the slot one to one, and the list. (That KVM's page tables get filled is shown in the
// lab: the fork benchmark's --server-forks against --fork-server-prefault false.)
#include "vmm-core/vm/nested_page_prefault.h"

#include <cstring>

#include <gtest/gtest.h>

#include "common/error.h"
#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

uint64_t wordAt(const PrefaultImage& image, uint64_t address) {
  uint64_t value = 0;
  std::memcpy(&value, image.bytes.data() + (address - kPrefaultSlotAddress), sizeof value);
  return value;
}

// Walks the image's 4-level tables for `address`; returns the physical address, or ~0 if
// unmapped. Every entry on the way must have its accessed bit set (a walk writes nothing
// into the slot), the leaf its dirty bit too.
uint64_t translate(const PrefaultImage& image, uint64_t address) {
  constexpr uint64_t kFrame = 0x000ffffffffff000ull;
  uint64_t pml4e = wordAt(image, image.pml4Address + ((address >> 39) & 511) * 8);
  if ((pml4e & 0x21) != 0x21) return ~0ull;
  uint64_t pdpte = wordAt(image, (pml4e & kFrame) + ((address >> 30) & 511) * 8);
  if ((pdpte & 0x21) != 0x21 || (pdpte & 0x80) != 0) return ~0ull;
  uint64_t pde = wordAt(image, (pdpte & kFrame) + ((address >> 21) & 511) * 8);
  if ((pde & 0xe1) != 0xe1) return ~0ull;  // present, accessed, dirty, 2 MiB page
  return (pde & ~0x1fffffull & kFrame) | (address & 0x1fffff);
}

TEST(NestedPagePrefaultTest, TheImageMapsRamAndItsSlotOneToOneAndListsThePages) {
  std::vector<uint64_t> pages = {0x1000, 0x2000, 0x7fff000, layout::kHighRamStart + 0x5000};
  auto image = buildPrefaultImage(pages, layout::kHighRamStart + 512 * layout::kMiB);
  EXPECT_EQ(image.codeAddress, kPrefaultSlotAddress);
  EXPECT_EQ(image.count, pages.size());
  EXPECT_EQ(image.bytes.size() % 4096, 0u);
  EXPECT_LE(image.bytes.size(), kPrefaultSlotMaxBytes);
  // The loop starts with `test rcx, rcx` and leaves through the two ports.
  EXPECT_EQ(image.bytes[0], 0x48);
  EXPECT_EQ(image.bytes[1], 0x85);
  EXPECT_EQ(image.bytes[2], 0xc9);
  EXPECT_EQ(image.bytes[22], 0xe6);
  EXPECT_EQ(image.bytes[23], kPrefaultChunkPort);
  EXPECT_EQ(image.bytes[26], 0xe6);
  EXPECT_EQ(image.bytes[27], kPrefaultDonePort);
  for (uint64_t address : {image.codeAddress, image.pml4Address, image.listAddress, pages[0], pages[2], pages[3]}) {
    EXPECT_EQ(translate(image, address), address) << std::hex << address;
  }
  for (size_t i = 0; i < pages.size(); ++i) EXPECT_EQ(wordAt(image, image.listAddress + i * 8), pages[i]);
}

TEST(NestedPagePrefaultTest, AddressesOutsideRamOrInTheSlotAndTooLongListsAreRefused) {
  uint64_t ramEnd = layout::kHighRamStart + layout::kGiB;
  std::vector<uint64_t> inSlot = {kPrefaultSlotAddress + 0x1000};
  EXPECT_THROW(buildPrefaultImage(inSlot, ramEnd), Error);
  std::vector<uint64_t> beyond = {ramEnd + 0x1000};
  EXPECT_THROW(buildPrefaultImage(beyond, ramEnd), Error);
  std::vector<uint64_t> tooMany(kPrefaultSlotMaxBytes / 8, 0x1000);
  EXPECT_THROW(buildPrefaultImage(tooMany, ramEnd), Error);
}

}  // namespace
}  // namespace clonevm::vmm
