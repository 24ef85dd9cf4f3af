#pragma once
// Seccomp policies, one per process kind, and the one call that installs them.
//
// Each process installs its own policy (install()) right after its setup and before it reads
// guest-controlled data: the jailer cannot, because setup itself needs syscalls the steady state
// must not have (open, socket, mmap of new files...). A violation kills the whole process
// (SCMP_ACT_KILL_PROCESS, the parent sees SIGSYS); Mode::kLog lets the call through and logs it
// to the kernel audit log instead, to find what a policy misses (docs/JAILER.md).
//
// The policies are data (seccomp_policy.cc): a table of syscalls with one comment each, and
// ioctls allowed by request number.

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace clonevm::seccomp {

enum class Kind { kVmm, kBlock, kNet, kFs, kVfio };
enum class Mode { kKill, kLog, kOff };

// One allowed syscall. When argIndex >= 0 the call is allowed only if argument argIndex,
// masked with argMask, equals argValue; several rules for one syscall are alternatives.
struct SyscallRule {
  const char* name;
  const char* why;
  int argIndex = -1;
  uint64_t argMask = 0;
  uint64_t argValue = 0;  // or kThisProcess
};

// A SyscallRule's argValue that stands for the pid of the process installing the policy.
inline constexpr uint64_t kThisProcess = ~0ull;

// One allowed ioctl request (argument 1 of ioctl).
struct IoctlRule {
  unsigned long request;
  const char* name;
  const char* why;
};

struct Policy {
  Kind kind;
  bool tested;  // false: a draft, written before its device process exists
  std::span<const SyscallRule> syscalls;
  std::span<const IoctlRule> ioctls;
};

// Throws clonevm::Error on an unknown name ("vmm", "block", "net", "fs", "vfio" / "kill",
// "log", "off").
Kind parseKind(std::string_view name);
Mode parseMode(std::string_view name);
std::string_view kindName(Kind kind);

const Policy& policyFor(Kind kind);
// The rules every kind shares (threads, memory, event loops, unix-socket messages).
std::span<const SyscallRule> commonSyscalls();

// Installs `kind`'s policy on every thread of this process (TSYNC). Sets no_new_privs, which
// seccomp needs without CAP_SYS_ADMIN. kOff does nothing. Throws clonevm::Error naming the
// syscall that libseccomp rejected, or SystemError if the kernel refused the filter.
void install(Kind kind, Mode mode);

}  // namespace clonevm::seccomp
