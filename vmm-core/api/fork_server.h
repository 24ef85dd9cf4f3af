#pragma once
// clone-vmm --fork-server-fd: a core that has verified a template once and fork()s a new VM
// from it for every request (ipc/fork-server/fork_request.h, docs/FORK.md). A fork made so
// skips the process start, the dynamic linking and the template checks; and its libraries'
// relocated pages stay shared with the server and its siblings until written.

#include <optional>

#include <spdlog/logger.h>

#include "ipc/fork-server/fork_request.h"

namespace clonevm::vmm {

// Serves requests on `socket` (a connected SOCK_SEQPACKET end) until the client hangs up and
// every fork started here has ended. Returns the request in a fork (a child process, which goes
// on to restore the VM); std::nullopt in the server, once it is done. A malformed request is
// answered with its error and the server goes on. Must be called with one thread only.
std::optional<ipc::ForkRequest> serveForks(int socket, spdlog::logger& log);

}  // namespace clonevm::vmm
