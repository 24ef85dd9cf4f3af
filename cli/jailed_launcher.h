#pragma once
// The default ProcessLauncher of `clone run`: each process of the VM runs through clone-jailer
// (docs/JAILER.md) with only the paths, devices and fds its ProcessSpec names.

#include <sys/types.h>

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/process_launcher.h"

namespace clonevm::cli {

struct JailOptions {
  std::string user;          // "UID:GID"; empty: the caller's own uid and gid
  std::string cgroupParent;  // empty: clone-jailer's default, <cgroup2 mount>/clone
  std::string userns = "auto";
  std::string jailer;        // empty: clone-jailer beside this executable
};

// Adds --jail-user, --jail-cgroup-parent and --jail-userns to `run`.
void addJailOptions(CLI::App& run, JailOptions& options);

class JailedLauncher : public ProcessLauncher {
 public:
  explicit JailedLauncher(const JailOptions& options) : options_(options) {}
  pid_t launch(const ProcessSpec& spec) override;

  // clone-jailer's argument vector (without argv[0]) for `spec`.
  std::vector<std::string> jailerArguments(const ProcessSpec& spec) const;

 private:
  const JailOptions& options_;
};

// The memory.max a process gets: what it said it needs plus room for its own code, page tables
// and buffers; 0 (no limit) when the spec names no size.
uint64_t memoryLimitFor(const ProcessSpec& spec);

}  // namespace clonevm::cli
