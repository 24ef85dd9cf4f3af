#include "ipc/capnp/rpc_socket.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "common/error.h"

namespace clonevm::rpc {
sockaddr_un unixAddress(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  require(!path.empty() && path.size() < sizeof(address.sun_path),
          "socket path '{}' is empty or longer than {} bytes", path, sizeof(address.sun_path) - 1);
  path.copy(address.sun_path, sizeof(address.sun_path) - 1);
  return address;
}

namespace {

int socketOption(int fd, int option) {
  int value = 0;
  socklen_t length = sizeof(value);
  if (::getsockopt(fd, SOL_SOCKET, option, &value, &length) != 0) return -1;
  return value;
}

}  // namespace

std::string describeKjException(const kj::Exception& exception) {
  return std::string(exception.getDescription().cStr());
}

bool someoneListens(const std::string& path) {
  UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!probe || path.empty() || path.size() >= sizeof(sockaddr_un::sun_path)) return false;
  sockaddr_un address = unixAddress(path);
  return ::connect(probe.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)) == 0;
}

UniqueFd bindUnixListener(const std::string& path) {
  sockaddr_un address = unixAddress(path);
  struct stat info {};
  if (::lstat(path.c_str(), &info) == 0) {
    require(S_ISSOCK(info.st_mode), "{} exists and is not a socket", path);
    require(!someoneListens(path), "socket {} is in use by another process", path);
    CLONE_SYSCALL(::unlink(path.c_str()), "remove stale socket", path);
  }
  UniqueFd fd(CLONE_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "create socket", path));
  mode_t old = ::umask(0077);
  int bound = ::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address));
  int bindError = errno;
  ::umask(old);
  if (bound != 0) throwSystemError(bindError, "bind socket", path);
  CLONE_SYSCALL(::listen(fd.get(), SOMAXCONN), "listen on socket", path);
  return fd;
}

kj::Own<kj::ConnectionReceiver> listenUnix(kj::AsyncIoContext& io, const std::string& path) {
  return listenOnFd(io, bindUnixListener(path), path);
}

kj::Own<kj::ConnectionReceiver> listenOnFd(kj::AsyncIoContext& io, UniqueFd fd,
                                           const std::string& what) {
  require(socketOption(fd.get(), SO_DOMAIN) == AF_UNIX && socketOption(fd.get(), SO_ACCEPTCONN) == 1,
          "{} (fd {}) is not a listening unix socket", what, fd.get());
  CLONE_SYSCALL(::fcntl(fd.get(), F_SETFD, FD_CLOEXEC), "make close-on-exec", what);
  return io.lowLevelProvider->wrapListenSocketFd(
      fd.release(), kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP);
}

kj::Own<kj::AsyncCapabilityStream> connectUnix(kj::AsyncIoContext& io, const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) throwSystemError(errno, "connect to", path);
  sockaddr_un address = unixAddress(path);
  UniqueFd fd(CLONE_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), "create socket", path));
  CLONE_SYSCALL(::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)),
                "connect to", path);
  return io.lowLevelProvider->wrapUnixSocketFd(
      fd.release(), kj::LowLevelAsyncIoProvider::TAKE_OWNERSHIP);
}

}  // namespace clonevm::rpc
