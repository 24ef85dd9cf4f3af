#pragma once
// File descriptors sent with a message over a unix socket (SCM_RIGHTS), the one place that
// lays out the control data: the vhost-user channel and the fork server's requests use it.

#include <sys/socket.h>

#include <span>
#include <vector>

namespace clonevm::ipc {

class FdsToSend {
 public:
  // Borrows nothing: the fd numbers are copied; the caller keeps them open until sent.
  explicit FdsToSend(std::span<const int> fds);
  // Points `message`'s control data at these fds (leaves it empty when there are none).
  void attachTo(msghdr& message);

 private:
  std::vector<char> control_;  // operator new's alignment suits cmsghdr
};

}  // namespace clonevm::ipc
