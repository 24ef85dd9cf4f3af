#pragma once
// clone-vmm --fork-server-fd: a core that has verified a template once and fork()s a new VM
// from it for every request (ipc/fork-server/fork_request.h, docs/FORK.md). A fork made so
// skips the process start, the dynamic linking and the template checks; and its libraries'
// relocated pages stay shared with the server and its siblings until written.

#include <chrono>
#include <optional>

#include <spdlog/logger.h>

#include "ipc/fork-server/fork_request.h"

namespace clonevm::vmm {

struct ForkServerLimits {
  // With a listening socket: how long the server waits, with no fork running and no client
  // connected, before it ends.
  std::chrono::milliseconds linger{0};
  unsigned maxForks = 64;  // running at once; more requests are refused
};

// Serves requests on `socket`: one connected SOCK_SEQPACKET end (the server ends when that
// client has hung up and every fork started here has ended), or a listening SOCK_SEQPACKET
// socket (any number of clients; the server ends after `limits.linger` with neither forks nor
// clients). Returns the request in a fork (a child process, which goes on to restore the VM);
// std::nullopt in the server, once it is done. A malformed request is answered with its error
// and the server goes on. Must be called with one thread only.
std::optional<ipc::ForkRequest> serveForks(int socket, const ForkServerLimits& limits,
                                           spdlog::logger& log);

}  // namespace clonevm::vmm
