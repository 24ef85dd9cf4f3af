#pragma once
// One end of a vhost-user unix stream socket: sends and receives whole messages with their
// file descriptors (SCM_RIGHTS).
//
// receive() checks the framing (header complete, version bits, size within the framing
// limit, no more than kMaxFdsPerMessage fds, the whole payload present); the per-request
// rules (message.h) are applied by the side that knows which direction the message travels.
// Any failure throws clonevm::Error; fds that arrived with a rejected message are closed
// because Message owns them. A peer that goes away throws ChannelClosed, never SIGPIPE.

#include <chrono>
#include <span>
#include <string>
#include <utility>

#include "common/error.h"
#include "common/unique_fd.h"
#include "ipc/vhost-user/message.h"

namespace clonevm::ipc::vhost {

// The peer closed the connection (EOF, EPIPE or ECONNRESET).
class ChannelClosed : public Error {
 public:
  using Error::Error;
};

// A receive that waited longer than the channel's timeout.
class ChannelTimeout : public Error {
 public:
  using Error::Error;
};

class Channel {
 public:
  Channel() = default;
  // Takes a connected unix stream socket. `peerName` names the peer in errors.
  explicit Channel(UniqueFd socket, std::string peerName = "peer");

  Channel(Channel&&) noexcept = default;
  Channel& operator=(Channel&&) noexcept = default;

  int fd() const { return socket_.get(); }
  bool valid() const { return socket_.valid(); }
  const std::string& peerName() const { return peerName_; }
  void close() { socket_.reset(); }

  // Zero waits forever. Applies to every read of receive().
  void setReceiveTimeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }

  // Sends `header` and `payload` with `fds` (borrowed, not closed) as one sendmsg.
  void send(const MessageHeader& header, std::span<const uint8_t> payload,
            std::span<const int> fds = {});
  // Sends a message, passing its fds (which it keeps owning).
  void send(const Message& message);

  // Receives one whole message. Throws ChannelClosed when the peer closed the connection
  // before a new message began, clonevm::Error on anything malformed or truncated.
  Message receive();

 private:
  // Reads exactly bytes.size() bytes, collecting any fds into `fds`.
  void readExactly(std::span<uint8_t> bytes, std::vector<UniqueFd>& fds, bool atMessageStart);
  void waitReadable();

  UniqueFd socket_;
  std::string peerName_;
  std::chrono::milliseconds timeout_{0};
};

// A connected pair of unix stream sockets (SOCK_CLOEXEC), for tests and the back-end request
// channel.
std::pair<UniqueFd, UniqueFd> makeSocketPair();

// A listening unix socket at `path` (a stale socket file there is replaced): the back-end's
// --socket-path.
UniqueFd listenUnixSocket(const std::string& path, int backlog = 1);
// Whether `fd` is a listening socket (the back-end's --fd may be listening or connected).
bool isListeningSocket(int fd);
// A socket connected to `path` (front-ends).
UniqueFd connectUnixSocket(const std::string& path);

}  // namespace clonevm::ipc::vhost
