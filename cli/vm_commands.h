#pragma once
// `clone status|pause|resume|shutdown --vm SOCKET`: the VM control API's client side.

#include <CLI/CLI.hpp>

#include "cli/app.h"

namespace clonevm::cli {

struct VmCommandOptions {
  std::string socket;
  bool graceful = false;
  bool json = false;
};

void addVmCommands(CLI::App& app, VmCommandOptions& options, Streams streams);

// The VM's vsock CID from its status (0: no vsock device).
uint32_t vmVsockCid(const std::string& socket);

}  // namespace clonevm::cli
