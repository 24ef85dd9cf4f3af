#pragma once
// `clone run`: boot a VM from a kernel. Starts clone-vmm and waits for it; the VM's serial
// console is this terminal.

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/app.h"
#include "cli/global_options.h"
#include "cli/process_launcher.h"

namespace clonevm::cli {

struct RunOptions {
  std::string kernel;
  std::string initrd;
  std::string cmdline;
  uint64_t memoryMib = 512;
  uint32_t vcpus = 1;
  bool noJail = false;
  bool verbose = false;
  std::string apiSocket;
  std::vector<std::string> vhostUserBlk;  // SOCKET[,queues=N], passed to clone-vmm as is
  std::vector<std::string> vhostUserFs;   // SOCKET:TAG[,queues=N]
  std::vector<std::string> disks;         // PATH[,readonly][,overlay][,format=FMT]: clone-block
  uint64_t vsockCid = 0;                  // 0: automatic
  bool noVsock = false;
  std::string seccomp = "kill";           // clone-vmm --seccomp
};

// Adds the `run` verb to `app`; `exitCode` receives clone-vmm's exit code. Unless --no-jail,
// the processes start through `jailed`.
void addRunCommand(CLI::App& app, RunOptions& options, const GlobalOptions& global,
                   Streams streams, int& exitCode, ProcessLauncher& jailed);

// The clone-vmm argument vector for `options` (without the program path).
std::vector<std::string> vmmArguments(const RunOptions& options,
                                      const std::vector<std::string>& globalArgs);

}  // namespace clonevm::cli
