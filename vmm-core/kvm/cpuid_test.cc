#include "vmm-core/kvm/cpuid.h"

#include <algorithm>

#include <gtest/gtest.h>

namespace clonevm::vmm {
namespace {

kvm_cpuid_entry2 leaf(uint32_t function, uint32_t index, uint32_t eax, uint32_t ebx,
                      uint32_t ecx, uint32_t edx) {
  kvm_cpuid_entry2 entry{};
  entry.function = function;
  entry.index = index;
  entry.eax = eax;
  entry.ebx = ebx;
  entry.ecx = ecx;
  entry.edx = edx;
  return entry;
}

const kvm_cpuid_entry2& find(const std::vector<kvm_cpuid_entry2>& entries, uint32_t function,
                             uint32_t index = 0) {
  auto it = std::find_if(entries.begin(), entries.end(), [&](const auto& e) {
    return e.function == function && e.index == index;
  });
  if (it == entries.end()) throw std::runtime_error("leaf missing");
  return *it;
}

bool has(const std::vector<kvm_cpuid_entry2>& entries, uint32_t function) {
  return std::any_of(entries.begin(), entries.end(),
                     [&](const auto& e) { return e.function == function; });
}

std::vector<kvm_cpuid_entry2> hostLike() {
  return {
      leaf(0x0, 0, 0x1f, 0x756e6547, 0x6c65746e, 0x49656e69),
      leaf(0x1, 0, 0x000906ea, 0x0a100800, 0x7ffafbff | (1u << 3), 0xbfebfbff),
      leaf(0x4, 0, 0x1c004121, 0, 0, 0),   // L1d
      leaf(0x4, 3, 0x1c03c163, 0, 0, 0),   // L3
      leaf(0x5, 0, 0x40, 0x40, 3, 0x11142120),
      leaf(0x7, 0, 0, 0xffffffff, 0xffffffff, 0xffffffff),
      leaf(0xb, 0, 1, 2, 0x100, 7),
      leaf(0xb, 1, 4, 8, 0x201, 7),
      leaf(0xb, 2, 0, 0, 2, 7),
      leaf(0x12, 0, 1, 0, 0, 0),
      leaf(0x14, 0, 1, 0, 0, 0),
      leaf(0x40000000, 0, 0x40000001, 0x4b4d564b, 0x564b4d56, 0x4d),
      leaf(0x80000008, 0, 0x3030, 0, 0x7007, 0),
      leaf(0x8000001e, 0, 9, 0x105, 3, 0),
  };
}

TEST(CpuidTest, Leaf1CarriesApicIdCountAndHypervisorBit) {
  auto entries = buildGuestCpuid(hostLike(), 3, 4);
  const auto& l1 = find(entries, 0x1);
  EXPECT_EQ(l1.ebx >> 24, 3u);
  EXPECT_EQ((l1.ebx >> 16) & 0xff, 4u);
  EXPECT_TRUE(l1.ecx & (1u << 31));
  EXPECT_FALSE(l1.ecx & (1u << 3)) << "MONITOR must be hidden";
  EXPECT_TRUE(l1.edx & (1u << 28));

  auto single = buildGuestCpuid(hostLike(), 0, 1);
  EXPECT_FALSE(find(single, 0x1).edx & (1u << 28));
}

TEST(CpuidTest, TopologyLeafDescribesOneThreadPerCore) {
  auto entries = buildGuestCpuid(hostLike(), 2, 3);
  const auto& smt = find(entries, 0xb, 0);
  const auto& core = find(entries, 0xb, 1);
  const auto& invalid = find(entries, 0xb, 2);
  EXPECT_EQ(smt.eax, 0u);
  EXPECT_EQ(smt.ebx, 1u);
  EXPECT_EQ((smt.ecx >> 8) & 0xff, 1u);
  EXPECT_EQ(core.eax, 2u);  // 3 vCPUs need 2 bits
  EXPECT_EQ(core.ebx, 3u);
  EXPECT_EQ((core.ecx >> 8) & 0xff, 2u);
  EXPECT_EQ((invalid.ecx >> 8) & 0xff, 0u);
  EXPECT_EQ(smt.edx, 2u);
  EXPECT_EQ(core.edx, 2u);
}

TEST(CpuidTest, CacheLeafSharesOnlyL3) {
  auto entries = buildGuestCpuid(hostLike(), 0, 4);
  EXPECT_EQ((find(entries, 0x4, 0).eax >> 14) & 0xfff, 0u);
  EXPECT_EQ((find(entries, 0x4, 3).eax >> 14) & 0xfff, 3u);
  EXPECT_EQ(find(entries, 0x4, 3).eax >> 26, 3u);
}

TEST(CpuidTest, HidesUnstableFeaturesAndLeaves) {
  auto entries = buildGuestCpuid(hostLike(), 0, 1);
  const auto& l7 = find(entries, 0x7);
  for (unsigned b : {2u, 4u, 11u, 12u, 14u, 15u, 25u}) {
    EXPECT_FALSE(l7.ebx & (1u << b)) << "leaf 7 ebx bit " << b;
  }
  EXPECT_FALSE(l7.ecx & (1u << 5));
  EXPECT_TRUE(l7.ebx & (1u << 0)) << "unrelated features stay";
  EXPECT_FALSE(has(entries, 0x12));
  EXPECT_FALSE(has(entries, 0x14));
  EXPECT_TRUE(has(entries, 0x40000000)) << "KVM paravirtual leaves stay";
  EXPECT_EQ(find(entries, 0x5).eax, 0u);
}

TEST(CpuidTest, AmdCoreCountAndExtendedApicId) {
  auto entries = buildGuestCpuid(hostLike(), 5, 8);
  EXPECT_EQ(find(entries, 0x80000008).ecx & 0xff, 7u);
  EXPECT_EQ((find(entries, 0x80000008).ecx >> 12) & 0xf, 3u);
  EXPECT_EQ(find(entries, 0x8000001e).eax, 5u);
  EXPECT_EQ((find(entries, 0x8000001e).ebx >> 8) & 0xff, 0u);
}

}  // namespace
}  // namespace clonevm::vmm
