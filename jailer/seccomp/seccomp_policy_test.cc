#include "jailer/seccomp/seccomp_policy.h"

#include <seccomp.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

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

// Forks of one fork server share a pid namespace and a uid: under its policy a process may
// signal its own threads, never another process.
TEST(SeccompPolicyTest, AProcessMaySignalOnlyItsOwnThreads) {
  pid_t parent = ::getpid();
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    try {
      install(Kind::kVmm, Mode::kKill);
    } catch (...) {
      ::_exit(3);
    }
    // Signal 0: only the permission check.
    if (::syscall(SYS_tgkill, ::getpid(), ::syscall(SYS_gettid), 0) != 0) ::_exit(4);
    ::syscall(SYS_tgkill, parent, parent, 0);  // killed here
    ::_exit(5);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGSYS)
      << (WIFEXITED(status) ? "exited " + std::to_string(WEXITSTATUS(status)) : "status " + std::to_string(status));
}

TEST(SeccompPolicyTest, NamesParseBothWays) {
  for (Kind kind : kKinds) EXPECT_EQ(parseKind(kindName(kind)), kind);
  EXPECT_THROW(parseKind("gpu"), Error);
  EXPECT_EQ(parseMode("log"), Mode::kLog);
  EXPECT_THROW(parseMode("warn"), Error);
}

}  // namespace
}  // namespace clonevm::seccomp
