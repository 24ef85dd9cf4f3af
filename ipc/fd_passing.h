#pragma once
// File descriptors sent with a message over a unix socket (SCM_RIGHTS), the one place that
// lays out the control data: the vhost-user channel and the fork server's requests use it.

#include <sys/socket.h>

#include <cstddef>
#include <span>
#include <string_view>
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

// Sends `size` bytes and `fds` (borrowed) in one sendmsg (no SIGPIPE); throws, naming `what`,
// unless all of it went. For datagram sockets, where one call is one message.
void sendDatagramWithFds(int socket, const void* bytes, size_t size, std::span<const int> fds,
                         std::string_view what);

}  // namespace clonevm::ipc
