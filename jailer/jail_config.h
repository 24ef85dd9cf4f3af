#pragma once
// What clone-jailer is asked to do: one process, its sandbox, its limits. Parsed from the
// clone-jailer command line (parseJailerArgs) or built by the CLI's jailed launcher, which
// turns it back into a command line (toJailerArgs).

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace clonevm::jailer {

enum class UserNamespace { kAuto, kOn, kOff };  // auto: on unless the jailer runs as root

struct JailConfig {
  std::string id;                         // [A-Za-z0-9_.-]{1,64}: names the cgroup and the jail
  std::string execFile;                   // absolute path of the program to exec
  std::vector<std::string> args;          // argv[1..]
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<std::string> cgroupLimits;  // "memory.max=536870912", "cpu.max=50000 100000", ...
  std::string cgroupParent;               // empty: <cgroup2 mount>/clone
  std::vector<std::string> readPaths;     // bound read-only at the same path inside the jail
  std::vector<std::string> writePaths;    // bound read-write
  std::vector<std::string> devices;       // device nodes bound at the same path
  std::vector<int> keepFds;               // kept open at the same number (0, 1, 2 always)
  bool network = false;                   // false: a new, empty network namespace
  UserNamespace userNamespace = UserNamespace::kAuto;
  uint64_t rlimitNofile = 4096;
  uint64_t rlimitNproc = 1024;            // per uid: counts every process of that uid
  std::optional<uint64_t> rlimitFsize;    // unset: unlimited (memfd ftruncate counts against it)
};

// Parses clone-jailer's arguments (without argv[0]); throws clonevm::Error on bad input,
// with the offending flag or value in the message. "--help" throws HelpRequested.
struct HelpRequested {
  std::string text;
};
JailConfig parseJailerArgs(const std::vector<std::string>& args);

// Checks what can be checked before any syscall: the id, the exec file, uid/gid, absolute
// paths. Throws clonevm::Error.
void validate(const JailConfig& config);

// The clone-jailer command line (without argv[0]) that parseJailerArgs turns back into `config`.
std::vector<std::string> toJailerArgs(const JailConfig& config);

}  // namespace clonevm::jailer
