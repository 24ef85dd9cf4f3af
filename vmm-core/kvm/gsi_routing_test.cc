#include "vmm-core/kvm/gsi_routing.h"

#include <vector>

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm::vmm {
namespace {

class GsiRoutingTest : public ::testing::Test {
 protected:
  GsiRouting makeRouting(uint32_t maxRoutes = 4096) {
    return GsiRouting(
        [this](std::span<const kvm_irq_routing_entry> table) {
          if (failNext) {
            failNext = false;
            throw Error("KVM_SET_GSI_ROUTING: Invalid argument");
          }
          commits.emplace_back(table.begin(), table.end());
        },
        maxRoutes);
  }

  static std::vector<kvm_irq_routing_entry> msiEntries(
      const std::vector<kvm_irq_routing_entry>& table) {
    std::vector<kvm_irq_routing_entry> msi;
    for (const auto& entry : table) {
      if (entry.type == KVM_IRQ_ROUTING_MSI) msi.push_back(entry);
    }
    return msi;
  }

  std::vector<std::vector<kvm_irq_routing_entry>> commits;
  bool failNext = false;
};

TEST_F(GsiRoutingTest, KeepsTheIrqchipDefaultRoutes) {
  GsiRouting routing = makeRouting();
  auto table = routing.table();
  // 24 IOAPIC pins, and GSIs 0..15 on the PICs as well: the kernel's default_routing[].
  ASSERT_EQ(table.size(), 40u);
  int ioapic = 0, master = 0, slave = 0;
  for (const auto& entry : table) {
    ASSERT_EQ(entry.type, static_cast<uint32_t>(KVM_IRQ_ROUTING_IRQCHIP));
    switch (entry.u.irqchip.irqchip) {
      case KVM_IRQCHIP_IOAPIC:
        EXPECT_EQ(entry.u.irqchip.pin, entry.gsi);
        ++ioapic;
        break;
      case KVM_IRQCHIP_PIC_MASTER:
        EXPECT_LT(entry.gsi, 8u);
        EXPECT_EQ(entry.u.irqchip.pin, entry.gsi);
        ++master;
        break;
      case KVM_IRQCHIP_PIC_SLAVE:
        EXPECT_GE(entry.gsi, 8u);
        EXPECT_LT(entry.gsi, 16u);
        EXPECT_EQ(entry.u.irqchip.pin, entry.gsi - 8);
        ++slave;
        break;
      default:
        ADD_FAILURE() << "unexpected irqchip " << entry.u.irqchip.irqchip;
    }
  }
  EXPECT_EQ(ioapic, 24);
  EXPECT_EQ(master, 8);
  EXPECT_EQ(slave, 8);
  EXPECT_TRUE(commits.empty());  // nothing to commit until the first MSI route
}

TEST_F(GsiRoutingTest, AllocatesUpdatesAndFreesMsiRoutes) {
  GsiRouting routing = makeRouting();
  uint32_t a = routing.addMsi({0xfee00000, 0x4041});
  uint32_t b = routing.addMsi({0x1'fee01000, 0x4042});
  EXPECT_EQ(a, 24u);
  EXPECT_EQ(b, 25u);
  ASSERT_EQ(commits.size(), 2u);
  EXPECT_EQ(commits.back().size(), 42u);  // every commit carries the whole table
  auto msi = msiEntries(commits.back());
  ASSERT_EQ(msi.size(), 2u);
  EXPECT_EQ(msi[1].gsi, b);
  EXPECT_EQ(msi[1].u.msi.address_lo, 0xfee01000u);
  EXPECT_EQ(msi[1].u.msi.address_hi, 1u);
  EXPECT_EQ(msi[1].u.msi.data, 0x4042u);

  routing.updateMsi(a, {0xfee02000, 0x4051});
  ASSERT_EQ(commits.size(), 3u);
  msi = msiEntries(commits.back());
  EXPECT_EQ(msi[0].u.msi.address_lo, 0xfee02000u);
  EXPECT_EQ(msi[0].u.msi.data, 0x4051u);
  routing.updateMsi(a, {0xfee02000, 0x4051});  // unchanged: no ioctl
  EXPECT_EQ(commits.size(), 3u);

  routing.removeMsi(a);
  EXPECT_EQ(msiEntries(commits.back()).size(), 1u);
  EXPECT_EQ(routing.addMsi({0xfee00000, 0x4060}), a);  // the lowest free GSI is reused
  EXPECT_THROW(routing.updateMsi(100, {}), Error);
  EXPECT_THROW(routing.removeMsi(100), Error);
  EXPECT_THROW(routing.removeMsi(3), Error);  // an IOAPIC pin is not an MSI route
}

TEST_F(GsiRoutingTest, AFailedCommitChangesNothing) {
  GsiRouting routing = makeRouting();
  uint32_t a = routing.addMsi({0xfee00000, 0x4041});
  failNext = true;
  EXPECT_THROW(routing.addMsi({0xfee00000, 0x4042}), Error);
  EXPECT_EQ(msiEntries(routing.table()).size(), 1u);
  failNext = true;
  EXPECT_THROW(routing.updateMsi(a, {0xfee00000, 0x5000}), Error);
  EXPECT_EQ(msiEntries(routing.table())[0].u.msi.data, 0x4041u);
  failNext = true;
  EXPECT_THROW(routing.removeMsi(a), Error);
  EXPECT_EQ(msiEntries(routing.table()).size(), 1u);
  EXPECT_EQ(routing.addMsi({0xfee00000, 0x4042}), a + 1);
}

TEST_F(GsiRoutingTest, StopsAtKvmsRouteLimit) {
  GsiRouting routing = makeRouting(43);  // 40 defaults + 3 MSI routes
  routing.addMsi({0xfee00000, 1});
  routing.addMsi({0xfee00000, 2});
  routing.addMsi({0xfee00000, 3});
  EXPECT_THROW(routing.addMsi({0xfee00000, 4}), Error);
  EXPECT_THROW(makeRouting(40), Error);  // not even room for the defaults plus one
}

}  // namespace
}  // namespace clonevm::vmm
