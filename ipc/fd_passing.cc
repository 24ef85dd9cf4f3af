#include "ipc/fd_passing.h"

#include <cstring>

#include "common/error.h"

namespace clonevm::ipc {

FdsToSend::FdsToSend(std::span<const int> fds) {
  if (fds.empty()) return;
  control_.assign(CMSG_SPACE(sizeof(int) * fds.size()), 0);
  msghdr message{};
  message.msg_control = control_.data();
  message.msg_controllen = control_.size();
  cmsghdr* header = CMSG_FIRSTHDR(&message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(header), fds.data(), sizeof(int) * fds.size());
}

void FdsToSend::attachTo(msghdr& message) {
  message.msg_control = control_.empty() ? nullptr : control_.data();
  message.msg_controllen = control_.size();
}

void sendDatagramWithFds(int socket, const void* bytes, size_t size, std::span<const int> fds,
                         std::string_view what) {
  iovec iov{const_cast<void*>(bytes), size};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  FdsToSend control(fds);
  control.attachTo(message);
  ssize_t sent = CLONE_SYSCALL(::sendmsg(socket, &message, MSG_NOSIGNAL), what);
  require(static_cast<size_t>(sent) == size, "{}: sent {} of {} bytes", what, sent, size);
}

}  // namespace clonevm::ipc
