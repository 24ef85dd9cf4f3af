#pragma once
// How `clone run` (and later `clone fork`) starts the processes of one VM: the core and one
// process per device. The plain launcher execs them directly (--no-jail); the jailed launcher
// (jailer/) runs each through clone-jailer with the sandbox its kind needs. Wired in main.

#include <spawn.h>
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace clonevm::cli {

// What a process needs from its sandbox. The jailer grants exactly this and nothing more.
struct ProcessSpec {
  std::string kind;                     // "vmm", "block", "net", "fs", "vfio": selects the policy
  std::string id;                       // unique per VM process, e.g. "vm-1234-block0"
  std::string program;                  // absolute path of the executable
  std::vector<std::string> args;        // argv[1..]
  std::vector<int> keepFds;             // inherited fds (stdin/out/err are always kept)
  std::vector<std::string> readPaths;   // files/dirs visible read-only inside the jail
  std::vector<std::string> writePaths;  // files/dirs visible read-write (sockets, images)
  std::vector<std::string> devices;     // device nodes, e.g. "/dev/kvm", "/dev/vhost-vsock"
  bool needsNetwork = false;            // false: an empty network namespace
  uint64_t memoryBytes = 0;             // memory it needs (guest RAM for the core); 0: unknown
  unsigned processes = 1;               // processes sharing the jail (a fork server's forks + 1)
  // Empty: the process shares our stdio and session, and we wait for it. Otherwise it is
  // detached (a fork's core outlives `clone fork`): its own session, stdin /dev/null, stdout
  // and stderr to this file (created 0600, truncated).
  std::string detachedOutput;
};

// Adds what `spec` asks of the new process's stdio and session to a posix_spawn setup (the
// fds it keeps, detaching); both launchers use it.
void prepareSpawn(const ProcessSpec& spec, posix_spawn_file_actions_t& actions,
                  posix_spawnattr_t& attributes);

class ProcessLauncher {
 public:
  virtual ~ProcessLauncher() = default;
  // Starts the process and returns its pid; the caller waits for it. Throws clonevm::Error.
  virtual pid_t launch(const ProcessSpec& spec) = 0;
};

}  // namespace clonevm::cli
