#include "jailer/seccomp/seccomp_policy.h"

#include <seccomp.h>

#include <set>
#include <string>

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm::seccomp {
namespace {

constexpr Kind kKinds[] = {Kind::kVmm, Kind::kBlock, Kind::kNet, Kind::kFs, Kind::kVfio};

TEST(SeccompPolicyTest, EveryRuleNamesARealSyscallAndSaysWhy) {
  for (Kind kind : kKinds) {
    const Policy& policy = policyFor(kind);
    for (const auto& rule : policy.syscalls) {
      EXPECT_NE(seccomp_syscall_resolve_name(rule.name), __NR_SCMP_ERROR) << rule.name;
      EXPECT_GT(std::string(rule.why).size(), 2u) << rule.name;
    }
    for (const auto& ioctl : policy.ioctls) EXPECT_GT(std::string(ioctl.why).size(), 2u) << ioctl.name;
  }
  for (const auto& rule : commonSyscalls()) {
    EXPECT_NE(seccomp_syscall_resolve_name(rule.name), __NR_SCMP_ERROR) << rule.name;
  }
}

TEST(SeccompPolicyTest, NoPolicyAllowsLeavingTheSandbox) {
  const std::set<std::string> forbidden{"execve", "execveat", "ptrace", "process_vm_readv",
                                        "process_vm_writev", "mount", "pivot_root", "setns",
                                        "unshare", "bpf", "init_module", "kexec_load", "open",
                                        "chroot", "setuid", "keyctl", "perf_event_open"};
  for (Kind kind : kKinds) {
    for (const auto& rule : policyFor(kind).syscalls) EXPECT_FALSE(forbidden.contains(rule.name)) << rule.name;
  }
  for (const auto& rule : commonSyscalls()) EXPECT_FALSE(forbidden.contains(rule.name)) << rule.name;
}

TEST(SeccompPolicyTest, NamesParseBothWays) {
  for (Kind kind : kKinds) EXPECT_EQ(parseKind(kindName(kind)), kind);
  EXPECT_THROW(parseKind("gpu"), Error);
  EXPECT_EQ(parseMode("log"), Mode::kLog);
  EXPECT_THROW(parseMode("warn"), Error);
}

}  // namespace
}  // namespace clonevm::seccomp
