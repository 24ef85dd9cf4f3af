#pragma once
// The VM control API (ipc/capnp/vm_control.capnp) served on clone-vmm's --api-socket.

#include <string>

#include <kj/async-io.h>
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

// Runs the API and the VM until the VM ends (starting it unless it runs); returns why it
// ended. `io`: the thread's event loop if the caller set it up already (a VM started before
// its API exists runs under the seccomp policy, which lacks what kj::setupAsyncIo() calls).
ExitReason runWithApi(Machine& machine, const ApiEndpoint& endpoint, spdlog::logger& log,
                      kj::AsyncIoContext* io = nullptr);

}  // namespace clonevm::vmm
