#include "ipc/capnp/rpc_socket.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/error.h"
#include "common/unique_fd.h"

namespace clonevm::rpc {
namespace {

bool someoneListens(const std::string& path) {
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe) return false;
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  path.copy(address.sun_path, sizeof(address.sun_path) - 1);
  return ::connect(probe.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
}

}  // namespace

std::string describeKjException(const kj::Exception& exception) {
  return std::string(exception.getDescription().cStr());
}

kj::Own<kj::ConnectionReceiver> listenUnix(kj::AsyncIoContext& io, const std::string& path) {
  require(!path.empty() && path.size() < sizeof(sockaddr_un::sun_path),
          "socket path '{}' is empty or too long", path);
  struct stat info {};
  if (::lstat(path.c_str(), &info) == 0) {
    require(S_ISSOCK(info.st_mode), "{} exists and is not a socket", path);
    require(!someoneListens(path), "socket {} is in use by another process", path);
    CLONE_SYSCALL(::unlink(path.c_str()), "remove stale socket", path);
  }
  mode_t old = ::umask(0077);
  auto receiver = rethrowKj("listen on " + path, [&] {
    return io.provider->getNetwork()
        .parseAddress(kj::str("unix:", path.c_str()))
        .wait(io.waitScope)
        ->listen();
  });
  ::umask(old);
  return receiver;
}

kj::Own<kj::AsyncIoStream> connectUnix(kj::AsyncIoContext& io, const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) throwSystemError(errno, "connect to", path);
  return rethrowKj("connect to " + path, [&] {
    return io.provider->getNetwork()
        .parseAddress(kj::str("unix:", path.c_str()))
        .wait(io.waitScope)
        ->connect()
        .wait(io.waitScope);
  });
}

}  // namespace clonevm::rpc
