#pragma once
// clone-vmm --fork-server-fd: a core that has verified a template once and fork()s a new VM
// from it for every request (ipc/fork-server/fork_request.h, docs/FORK.md). A fork made so
// skips the process start, the dynamic linking and the template checks; and its libraries'
// relocated pages stay shared with the server and its siblings until written.
//
// The server keeps one spare fork ahead (as Android's zygote keeps unspecialized app
// processes): a child that has already restored the VM (KVM_CREATE_VM, guest memory mapped,
// vCPU and device state), by default runs it, and waits for the request that makes it a
// fork: its API socket, console, and the CID if the request names one.

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <optional>

#include <spdlog/logger.h>

#include "ipc/fork-server/fork_request.h"

namespace clonevm::vmm {

struct ForkServerLimits {
  // With a listening socket: how long the server waits, with no fork running and no client
  // connected, before it ends.
  std::chrono::milliseconds linger{0};
  unsigned maxForks = 64;  // running at once; more requests are refused
  // Keep a spare fork prepared ahead. Off: each fork starts at its request. A spare is
  // not a fork: it counts towards maxForks only once it has a request, and none is kept
  // while maxForks run.
  bool keepSpare = true;
  // How long after handing a fork out the server waits before it prepares the next spare,
  // so that the spare's restore (and a memfd spare's fill) does not compete for CPUs with
  // the fork's first answers. A request that comes meanwhile starts its spare at once.
  std::chrono::milliseconds spareDelay{0};
  // Called for a spare that ended, or was ended, without a request: what it made for its
  // fork (its disks' overlays, spare_disks.h) goes.
  std::function<void(pid_t)> spareEnded;
};

// A child of the fork server: it prepares its VM, then takes the request that makes it a fork.
class SpareFork {
 public:
  explicit SpareFork(UniqueFd fromServer) : fromServer_(std::move(fromServer)) {}
  // Tells the server this spare's VM is restored (or failed to restore: then 0) and the CID it
  // took, which the server's reply names when a request leaves the CID to it. The server
  // waits for this before it hands the spare a request.
  void announce(uint32_t vsockCid);
  // Blocks until the server hands this spare a request: the fork's id, API listener, output
  // and CID. std::nullopt: the server ended without one, and this process should end too.
  std::optional<ipc::ForkRequest> takeRequest();
  // Whether a request (or the server's hang-up) is waiting: takeRequest() would not block.
  bool requestWaiting() const;

 private:
  UniqueFd fromServer_;
};

// Serves requests on `socket`: one connected SOCK_SEQPACKET end (the server ends when that
// client has hung up and every fork started here has ended), or a listening SOCK_SEQPACKET
// socket (any number of clients; the server ends after `limits.linger` with neither forks nor
// clients). Returns in a child (a spare, which goes on to restore the VM and then takes its
// request); std::nullopt in the server, once it is done. A malformed request is answered with
// its error and the server goes on. Must be called with one thread only.
std::optional<SpareFork> serveForks(int socket, const ForkServerLimits& limits, spdlog::logger& log);

}  // namespace clonevm::vmm
