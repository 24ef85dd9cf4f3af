#include "ipc/vhost-user/channel.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "ipc/fd_passing.h"

namespace clonevm::ipc::vhost {

Channel::Channel(UniqueFd socket, std::string peerName)
    : socket_(std::move(socket)), peerName_(std::move(peerName)) {}

void Channel::send(const MessageHeader& header, std::span<const uint8_t> payload,
                   std::span<const int> fds) {
  require(socket_.valid(), "vhost-user channel to {} is closed", peerName_);
  require(fds.size() <= kMaxFdsPerMessage, "vhost-user: {} fds in one message, at most {}",
          fds.size(), kMaxFdsPerMessage);
  require(payload.size() == header.size, "vhost-user: header size {} but payload is {} bytes",
          header.size, payload.size());

  iovec iov[2] = {
      {const_cast<MessageHeader*>(&header), sizeof(header)},
      {const_cast<uint8_t*>(payload.data()), payload.size()},
  };
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = payload.empty() ? 1 : 2;
  FdsToSend control(fds);
  control.attachTo(msg);

  size_t total = sizeof(header) + payload.size();
  size_t sent = 0;
  while (sent < total) {
    ssize_t n = ::sendmsg(socket_.get(), &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET) {
        throw ChannelClosed(fmt::format("vhost-user {} closed the connection", peerName_));
      }
      throwSystemError(errno, "send vhost-user message to", peerName_);
    }
    sent += static_cast<size_t>(n);
    // The fds went with the first bytes; advance the iovecs past what was sent.
    msg.msg_control = nullptr;
    msg.msg_controllen = 0;
    size_t skip = static_cast<size_t>(n);
    while (skip > 0 && msg.msg_iovlen > 0) {
      if (skip >= msg.msg_iov->iov_len) {
        skip -= msg.msg_iov->iov_len;
        ++msg.msg_iov;
        --msg.msg_iovlen;
      } else {
        msg.msg_iov->iov_base = static_cast<char*>(msg.msg_iov->iov_base) + skip;
        msg.msg_iov->iov_len -= skip;
        skip = 0;
      }
    }
  }
}

void Channel::send(const Message& message) {
  int fds[kMaxFdsPerMessage];
  require(message.fds.size() <= kMaxFdsPerMessage, "vhost-user: {} fds in one message, at most {}",
          message.fds.size(), kMaxFdsPerMessage);
  for (size_t i = 0; i < message.fds.size(); ++i) fds[i] = message.fds[i].get();
  send(message.header, message.payload, std::span<const int>(fds, message.fds.size()));
}

void Channel::waitReadable() {
  if (timeout_.count() <= 0) return;
  pollfd pfd{socket_.get(), POLLIN, 0};
  int rc = CLONE_SYSCALL(::poll(&pfd, 1, static_cast<int>(timeout_.count())),
                         "poll vhost-user socket of", peerName_);
  if (rc == 0) {
    throw ChannelTimeout(fmt::format("vhost-user {} did not answer within {} ms", peerName_,
                                     timeout_.count()));
  }
}

void Channel::readExactly(std::span<uint8_t> bytes, std::vector<UniqueFd>& fds,
                          bool atMessageStart) {
  size_t got = 0;
  while (got < bytes.size()) {
    waitReadable();
    iovec iov{bytes.data() + got, bytes.size() - got};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    ssize_t n = ::recvmsg(socket_.get(), &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == ECONNRESET) {
        throw ChannelClosed(fmt::format("vhost-user {} closed the connection", peerName_));
      }
      throwSystemError(errno, "receive vhost-user message from", peerName_);
    }
    // Take ownership of every fd first, so each is closed whatever happens next.
    for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
      if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
        fds.emplace_back(fd);
      }
    }
    // The kernel drops (closes) fds that did not fit; the message is unusable.
    require((msg.msg_flags & MSG_CTRUNC) == 0,
            "vhost-user {} sent more than {} file descriptors with one message", peerName_,
            kMaxFdsPerMessage);
    require(fds.size() <= kMaxFdsPerMessage,
            "vhost-user {} sent more than {} file descriptors with one message", peerName_,
            kMaxFdsPerMessage);
    if (n == 0) {
      if (atMessageStart && got == 0) {
        throw ChannelClosed(fmt::format("vhost-user {} closed the connection", peerName_));
      }
      throw ChannelClosed(fmt::format("vhost-user {} closed the connection in the middle of a "
                                      "message ({} of {} bytes read)",
                                      peerName_, got, bytes.size()));
    }
    got += static_cast<size_t>(n);
  }
}

Message Channel::receive() {
  require(socket_.valid(), "vhost-user channel to {} is closed", peerName_);
  Message message;
  readExactly(std::span<uint8_t>(reinterpret_cast<uint8_t*>(&message.header),
                                 sizeof(message.header)),
              message.fds, true);
  const auto& header = message.header;
  require((header.flags & kVersionMask) == kVersion,
          "vhost-user {} sent a message with version {} (flags {:#x}), only 1 is known", peerName_,
          header.flags & kVersionMask, header.flags);
  require(header.size <= kMaxPayloadSize,
          "vhost-user {} sent a {}-byte payload for request {}, more than the {}-byte limit",
          peerName_, header.size, header.request, kMaxPayloadSize);
  message.payload.resize(header.size);
  if (header.size > 0) {
    readExactly(message.payload, message.fds, false);
  }
  return message;
}

std::pair<UniqueFd, UniqueFd> makeSocketPair() {
  int fds[2];
  CLONE_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds),
                "create vhost-user socket pair");
  return {UniqueFd(fds[0]), UniqueFd(fds[1])};
}

UniqueFd listenUnixSocket(const std::string& path, int backlog) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  require(!path.empty() && path.size() < sizeof(address.sun_path),
          "vhost-user socket path '{}' is empty or longer than {} bytes", path,
          sizeof(address.sun_path) - 1);
  std::memcpy(address.sun_path, path.data(), path.size());
  UniqueFd fd(CLONE_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0),
                            "create vhost-user socket", path));
  // A socket file left by a previous run would make bind fail; only sockets are removed.
  struct stat st {};
  if (::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) ::unlink(path.c_str());
  CLONE_SYSCALL(::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)),
                "bind vhost-user socket", path);
  CLONE_SYSCALL(::listen(fd.get(), backlog), "listen on vhost-user socket", path);
  return fd;
}

bool isListeningSocket(int fd) {
  int listening = 0;
  socklen_t length = sizeof(listening);
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) < 0) return false;
  return listening != 0;
}

UniqueFd connectUnixSocket(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  require(!path.empty() && path.size() < sizeof(address.sun_path),
          "vhost-user socket path '{}' is empty or longer than {} bytes", path,
          sizeof(address.sun_path) - 1);
  std::memcpy(address.sun_path, path.data(), path.size());
  UniqueFd fd(CLONE_SYSCALL(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0),
                            "create vhost-user socket", path));
  CLONE_SYSCALL(::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(address)),
                "connect to vhost-user socket", path);
  return fd;
}

}  // namespace clonevm::ipc::vhost
