#pragma once
// The fork server's wire format (clone-vmm --fork-server-fd, docs/FORK.md): a client asks a
// running core that holds a verified template to fork() one more VM from it.
//
// One SOCK_SEQPACKET datagram per request and per reply, fixed layout, fds by SCM_RIGHTS.
// Not Cap'n Proto, unlike the VM API: the server fork()s for every request, and the child of
// a process inside a KJ event loop cannot start an event loop of its own (the loop is per
// thread and the child inherits the parent's). So the server is a plain poll loop.
//
// receiveForkRequest() and receiveForkReply() validate everything once, here: size, magic,
// version, the strings' termination and characters, the number and kind of fds. Any failure
// throws clonevm::Error and closes whatever fds came with the datagram.

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <utility>

#include "common/error.h"
#include "common/unique_fd.h"

namespace clonevm::ipc {

// The peer hung up (EOF on the socket).
class ForkSocketClosed : public Error {
 public:
  using Error::Error;
};

struct ForkRequest {
  std::string forkId;           // names the fork in logs: [A-Za-z0-9._-], 1..63 characters
  std::string apiSocketName;    // the API socket's path, for messages only (the fd is served)
  uint32_t vsockCid = 0;        // 0: the server picks a free one
  UniqueFd apiListener;         // a listening unix socket: the fork serves its API on it
  UniqueFd output;              // the fork's stdout and stderr (its console log)
};

struct ForkReply {
  pid_t pid = 0;          // the fork's pid in the server's pid namespace; 0 if refused
  uint32_t vsockCid = 0;  // the fork's CID (the request's, or the one the server picked); 0: none
  std::string error;      // empty: forked
};

// Sends `request`; its fds are borrowed (the caller closes them once sent).
void sendForkRequest(int socket, const ForkRequest& request);
ForkRequest receiveForkRequest(int socket);

void sendForkReply(int socket, const ForkReply& reply);
ForkReply receiveForkReply(int socket);

// Where the spare that became fork `pid` (the reply's) keeps disk N's overlay in the fork
// server's overlay directory, "DIR/spare-PID.diskN.qcow2" (vmm-core/api/spare_disks.h): the
// client moves it from there to the fork's own name.
std::string spareOverlayPath(const std::string& overlayDir, pid_t pid, size_t disk);

// A connected SOCK_SEQPACKET pair (close-on-exec): client end first, server end second.
std::pair<UniqueFd, UniqueFd> makeForkSocketPair();

}  // namespace clonevm::ipc
