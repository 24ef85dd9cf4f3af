#pragma once
// The VM control API (ipc/capnp/vm_control.capnp) served on clone-vmm's --api-socket.

#include <string>

#include <spdlog/logger.h>

#include "vmm-core/vm/machine.h"
#include "vmm-core/vm/exit_signal.h"

namespace clonevm::vmm {

// Where the API is served: an inherited listening socket (--api-fd; its creator, the CLI,
// removes the file, so a jailed core needs no writable directory), or else a socket the core
// creates at `path` and removes on return. With an fd, `path` only names it.
struct ApiEndpoint {
  std::string path;
  int inheritedFd = -1;
};

// Runs the API and the VM until the VM ends; returns why it ended.
ExitReason runWithApi(Machine& machine, const ApiEndpoint& endpoint, spdlog::logger& log);

}  // namespace clonevm::vmm
