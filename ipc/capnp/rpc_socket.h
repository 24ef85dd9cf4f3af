#pragma once
// Unix-socket plumbing for Cap'n Proto two-party RPC, with Clone's error style.

#include <string>

#include <kj/async-io.h>

namespace clonevm::rpc {

// Listens on `path` (mode 0600). A stale socket file (nobody listening) is replaced; a live one
// is an error ("VM API socket PATH is in use").
kj::Own<kj::ConnectionReceiver> listenUnix(kj::AsyncIoContext& io, const std::string& path);

// Connects to `path`; throws clonevm::Error naming the path when nobody listens there.
kj::Own<kj::AsyncIoStream> connectUnix(kj::AsyncIoContext& io, const std::string& path);

// Runs `body`, turning a kj::Exception into clonevm::Error with `what` as context.
template <typename Body>
auto rethrowKj(const std::string& what, Body&& body) -> decltype(body());

std::string describeKjException(const kj::Exception& exception);

}  // namespace clonevm::rpc

#include "ipc/capnp/rpc_socket_inl.h"
