// Issue 3: clone run boots Debian's cloud kernel with the test initramfs on real KVM.
#include <chrono>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "tests/e2e/guest_session.h"

namespace clonevm::e2e {
namespace {

constexpr char kReady[] = "CLONE-GUEST-READY";
constexpr int kExitReset = 3;  // docs/VMM.md

std::vector<std::string> runArgs(std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"run", "--no-jail", "--kernel", guestKernel(), "--initrd",
                                guestInitrd(), "--cmdline", "console=ttyS0 panic=-1 quiet"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

TEST(BootTest, ReachesUserspaceAndPowersOffWithinASecond) {
  GuestSession vm(buildBin("clone"), runArgs());
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  // A line written to stdin reaches the guest's shell, which computes the answer.
  auto answer = vm.run("echo $((6*7))");
  ASSERT_TRUE(answer) << vm.output();
  EXPECT_EQ(*answer, "42");
  auto start = std::chrono::steady_clock::now();
  vm.sendLine("poweroff -f");
  auto code = vm.waitExit(10s);
  auto elapsed = std::chrono::steady_clock::now() - start;
  ASSERT_TRUE(code) << "clone run did not exit after poweroff\n" << vm.output();
  EXPECT_EQ(*code, 0) << vm.output();
  EXPECT_LT(elapsed, 1s) << "poweroff took "
                         << std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count()
                         << " ms";
}

TEST(BootTest, GuestCountsTwoVcpus) {
  GuestSession vm(buildBin("clone"), runArgs({"--vcpus", "2"}));
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  auto nproc = vm.run("nproc");
  ASSERT_TRUE(nproc) << vm.output();
  EXPECT_EQ(*nproc, "2");
  auto online = vm.run("cat /sys/devices/system/cpu/online");
  ASSERT_TRUE(online) << vm.output();
  EXPECT_EQ(*online, "0-1");
  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
}

TEST(BootTest, MemoryAbove4GiBIsUsable) {
  GuestSession vm(buildBin("clone"), runArgs({"--mem-mb", "4608"}));
  ASSERT_TRUE(vm.expect(kReady, 180s)) << vm.output();
  auto memTotal = vm.run("awk '/MemTotal/ {print $2}' /proc/meminfo");
  ASSERT_TRUE(memTotal) << vm.output();
  EXPECT_GT(std::stoull(*memTotal), 4ull * 1024 * 1024) << "MemTotal kB: " << *memTotal;
  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
}

TEST(BootTest, DmesgHasNoErrorsOrWarnings) {
  GuestSession vm(buildBin("clone"), runArgs({"--vcpus", "2"}));
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  auto bad = vm.run("dmesg | grep -E 'ACPI Error|ACPI Exception|BUG:|WARNING:'; true");
  ASSERT_TRUE(bad) << vm.output();
  EXPECT_EQ(*bad, "") << "dmesg lines:\n" << *bad;
  auto dmesg = vm.run("dmesg | grep -iE 'acpi|pci|serial|8250|clocksource' | head -60");
  ASSERT_TRUE(dmesg);
  // The machine model really is ACPI + PCIe with a 16550A and kvmclock.
  EXPECT_NE(dmesg->find("16550A"), std::string::npos) << *dmesg;
  EXPECT_NE(dmesg->find("PCI Root Bridge"), std::string::npos) << *dmesg;
  EXPECT_NE(dmesg->find("kvm-clock"), std::string::npos) << *dmesg;
  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
}

TEST(BootTest, RebootExitsWithResetCode) {
  GuestSession vm(buildBin("clone"), runArgs());
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  vm.sendLine("reboot -f");
  EXPECT_EQ(vm.waitExit(10s), kExitReset) << vm.output();
}

TEST(BootTest, RtcShowsHostTime) {
  GuestSession vm(buildBin("clone"), runArgs());
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  auto guestEpoch = vm.run("date +%s");
  ASSERT_TRUE(guestEpoch) << vm.output();
  auto hostEpoch = std::chrono::duration_cast<std::chrono::seconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
  EXPECT_NEAR(std::stoll(*guestEpoch), hostEpoch, 30);
  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
}

}  // namespace
}  // namespace clonevm::e2e
