#pragma once
// The host side of the guest agent protocol (docs/AGENT.md): connect to a VM's agent over
// AF_VSOCK, run commands with their stdio streamed, apply a fork's identity.
//
// One AgentConnection carries one request, as the protocol says. Frames from the agent are
// validated by the shared decoders (guest/agent/agent_protocol.h); anything malformed is an
// AgentError, never a crash or an over-read. A connection may be used from two threads only
// the way exec() does it: one writes (stdin), one reads.

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"

namespace clonevm::cli {

inline constexpr uint32_t kAgentPort = 1024;

// The agent answered with an ERROR frame (errno and text from the guest), or broke the
// protocol (errorCode 0).
class AgentError : public Error {
 public:
  AgentError(int errorCode, const std::string& message) : Error(message), errorCode_(errorCode) {}
  int errorCode() const { return errorCode_; }

 private:
  int errorCode_;
};

struct AgentFrame {
  uint16_t type = 0;
  std::vector<uint8_t> payload;
};

class AgentConnection {
 public:
  // Connects to CID:port, retrying while nobody listens yet (the VM is still booting)
  // until `timeout`. Throws clonevm::Error naming the CID and port.
  static AgentConnection connect(uint32_t cid, uint32_t port, std::chrono::milliseconds timeout);
  // Over an already connected stream socket (tests: a socketpair).
  explicit AgentConnection(UniqueFd fd) : fd_(std::move(fd)) {}

  void sendFrame(uint16_t type, std::span<const uint8_t> payload);
  // The next frame; nullopt at a clean EOF between frames. Waits at most until `deadline`
  // (throws clonevm::Error "timed out" then). Throws AgentError on a malformed frame.
  std::optional<AgentFrame> readFrame(
      std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);
  int fd() const { return fd_.get(); }

 private:
  UniqueFd fd_;
};

// PING: returns how long the agent took to answer.
std::chrono::microseconds ping(AgentConnection& connection);

struct ExecRequest {
  std::vector<std::string> argv;                 // argv[0] is looked up in PATH
  std::optional<std::vector<std::string>> env;   // KEY=VALUE; none: the agent's default
};

struct ExecResult {
  bool signaled = false;
  int value = 0;  // exit code, or signal number
  // The shell convention: the code, or 128 + signal.
  int exitCode() const { return signaled ? 128 + value : value; }
};

// Runs a command: stdout bytes go to `outFd`, stderr bytes to `errFd`; `inFd` is read to
// EOF and forwarded on a second thread (-1: the command's stdin is closed at once).
// `timeout` bounds the whole run (then clonevm::Error "timed out"; closing the connection
// makes the agent kill the command). Throws AgentError when the command cannot start
// (errorCode() is the guest's errno, e.g. ENOENT).
ExecResult exec(AgentConnection& connection, const ExecRequest& request, int inFd, int outFd,
                int errFd, std::optional<std::chrono::milliseconds> timeout = std::nullopt);

struct Identity {
  std::optional<std::string> hostname;
  std::vector<uint8_t> rngSeed;  // empty: none
  std::optional<std::chrono::system_clock::time_point> clock;
};

struct IdentityResult {
  bool hostnameApplied = false, seedApplied = false, clockApplied = false;
  int hostnameError = 0, seedError = 0, reseedError = 0, clockError = 0;  // guest errnos
  int entropyAvail = -1;  // /proc/sys/kernel/random/entropy_avail after the seed
  int crngReady = -1;     // getrandom(GRND_NONBLOCK) works: 1, would block: 0
  std::chrono::system_clock::time_point guestClock;  // CLOCK_REALTIME read back
  std::string guestHostname;                          // uname's nodename read back
};

// Applies a fork's identity inside the guest and returns what the guest reads back.
IdentityResult applyIdentity(AgentConnection& connection, const Identity& identity);

}  // namespace clonevm::cli
