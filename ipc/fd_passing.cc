#include "ipc/fd_passing.h"

#include <cstring>

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

}  // namespace clonevm::ipc
