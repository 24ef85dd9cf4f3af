#pragma once
// The client side of one VM's control API socket.

#include <string>

#include <capnp/rpc-twoparty.h>

#include "ipc/capnp/rpc_socket.h"
#include "vm_control.capnp.h"

namespace clonevm::cli {

// Connects to the VM's API socket and runs `call` with its VmControl capability; KJ errors
// come back as clonevm::Error naming the socket.
template <typename Call>
void withVm(const std::string& socket, Call&& call) {
  auto io = kj::setupAsyncIo();
  auto connection = rpc::connectUnix(io, socket);
  capnp::TwoPartyClient client(*connection, rpc::kMaxFdsPerMessage);
  auto vm = client.bootstrap().castAs<rpc::VmControl>();
  rpc::rethrowKj("VM API " + socket, [&] { call(vm, io.waitScope); });
}

const char* stateName(rpc::VmState state);

}  // namespace clonevm::cli
