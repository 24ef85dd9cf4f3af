#pragma once
// Unix-socket plumbing for Cap'n Proto two-party RPC, with Clone's error style.

#include <sys/un.h>

#include <string>

#include <kj/async-io.h>

#include "common/unique_fd.h"

namespace clonevm::rpc {

// File descriptors one RPC message may carry (a snapshot's output directory).
inline constexpr unsigned kMaxFdsPerMessage = 2;

// The address of `path`; throws if it is empty or too long for a unix socket.
sockaddr_un unixAddress(const std::string& path);

// Creates a unix socket listening on `path` (only its owner may connect). A stale socket file (nobody
// listening) is replaced; a live one is an error ("socket PATH is in use by another
// process"). The CLI binds a VM's API socket this way and hands the fd to the core, which so
// needs no writable directory in its jail.
UniqueFd bindUnixListener(const std::string& path);

// Listens on `path` (bindUnixListener).
kj::Own<kj::ConnectionReceiver> listenUnix(kj::AsyncIoContext& io, const std::string& path);

// Serves an inherited listening unix socket (bindUnixListener's, passed to this process).
// Throws naming `what` unless `fd` is one.
kj::Own<kj::ConnectionReceiver> listenOnFd(kj::AsyncIoContext& io, UniqueFd fd,
                                           const std::string& what);

// Connects to `path`; throws clonevm::Error naming the path when nobody listens there. The
// stream can carry file descriptors (TwoPartyClient with kMaxFdsPerMessage).
kj::Own<kj::AsyncCapabilityStream> connectUnix(kj::AsyncIoContext& io, const std::string& path);

// Whether a unix socket listens at `path`: false when the file is missing, is no socket, or
// nobody accepts on it (its process ended).
bool someoneListens(const std::string& path);

// Runs `body`, turning a kj::Exception into clonevm::Error with `what` as context.
template <typename Body>
auto rethrowKj(const std::string& what, Body&& body) -> decltype(body());

std::string describeKjException(const kj::Exception& exception);

}  // namespace clonevm::rpc

#include "ipc/capnp/rpc_socket_inl.h"
