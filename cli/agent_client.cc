#include "cli/agent_client.h"

#include <linux/vm_sockets.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "agent_protocol.h"

namespace clonevm::cli {
namespace {

using Clock = std::chrono::steady_clock;

void sendAll(int fd, const uint8_t* data, size_t size) {
  while (size) {
    ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      throwSystemError(errno, "send to the guest agent");
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
}

// Waits until `fd` is readable or `deadline` passes (then throws).
void waitReadable(int fd, std::optional<Clock::time_point> deadline) {
  for (;;) {
    int timeoutMs = -1;
    if (deadline) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(*deadline - Clock::now());
      if (left.count() <= 0) throw Error("guest agent: timed out");
      timeoutMs = static_cast<int>(std::min<int64_t>(left.count() + 1, 1 << 30));
    }
    pollfd p{fd, POLLIN, 0};
    int rc = ::poll(&p, 1, timeoutMs);
    if (rc > 0) return;
    if (rc < 0 && errno != EINTR) throwSystemError(errno, "poll the guest agent connection");
  }
}

// Reads exactly `size` bytes; false at EOF before the first byte.
bool readAll(int fd, uint8_t* data, size_t size, std::optional<Clock::time_point> deadline) {
  size_t got = 0;
  while (got < size) {
    waitReadable(fd, deadline);
    ssize_t n = ::read(fd, data + got, size - got);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      throwSystemError(errno, "read from the guest agent");
    }
    if (n == 0) {
      if (got == 0) return false;
      throw AgentError(0, "guest agent: connection closed in the middle of a frame");
    }
    got += static_cast<size_t>(n);
  }
  return true;
}

void writeAllFd(int fd, const uint8_t* data, size_t size, const char* what) {
  while (size) {
    ssize_t n = ::write(fd, data, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE) return;  // our reader went away; keep the command's exit code
      throwSystemError(errno, what);
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
}

[[noreturn]] void throwAgentError(const AgentFrame& frame) {
  int32_t code = 0;
  char text[CA_MAX_ERROR_TEXT + 1];
  int status = ca_decode_error(frame.payload.data(), frame.payload.size(), &code, text);
  if (status != CA_OK) {
    throw AgentError(0, fmt::format("guest agent: malformed ERROR frame: {}", ca_status_text(status)));
  }
  throw AgentError(code, fmt::format("guest agent: {}", text));
}

[[noreturn]] void throwUnexpected(const AgentFrame& frame, const char* during) {
  if (frame.type == CA_ERROR) throwAgentError(frame);
  throw AgentError(0, fmt::format("guest agent: unexpected frame type {} {}", frame.type, during));
}

AgentFrame requireFrame(AgentConnection& connection, const char* during,
                        std::optional<Clock::time_point> deadline = std::nullopt) {
  auto frame = connection.readFrame(deadline);
  if (!frame) throw AgentError(0, fmt::format("guest agent: connection closed {}", during));
  return std::move(*frame);
}

bool retryableConnectError(int error) {
  // No listener yet (ECONNRESET is what vsock answers), no driver yet (ETIMEDOUT), or the
  // device is not up (ENODEV, EHOSTUNREACH).
  return error == ECONNRESET || error == ECONNREFUSED || error == ETIMEDOUT ||
         error == EHOSTUNREACH || error == ENODEV || error == EINTR;
}

}  // namespace

AgentConnection AgentConnection::connect(uint32_t cid, uint32_t port,
                                         std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  for (;;) {
    UniqueFd fd(::socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd) throwSystemError(errno, "socket(AF_VSOCK) (is the vsock module loaded?)");
    // Each attempt waits at most kConnectAttempt: a request the guest never answers (sent
    // while a fork's driver was still resetting for its new CID) is then sent again, instead
    // of holding the whole timeout.
    constexpr std::chrono::nanoseconds kConnectAttempt = std::chrono::seconds(2);
    auto left = std::min(kConnectAttempt, std::chrono::duration_cast<std::chrono::nanoseconds>(
                                              deadline - Clock::now()));
    if (left.count() > 0) {
      timeval tv{static_cast<time_t>(left.count() / 1000000000),
                 static_cast<suseconds_t>(left.count() % 1000000000 / 1000)};
      ::setsockopt(fd.get(), AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
    }
    sockaddr_vm address{};
    address.svm_family = AF_VSOCK;
    address.svm_cid = cid;
    address.svm_port = port;
    if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof address) == 0) {
      return AgentConnection(std::move(fd));
    }
    int error = errno;
    if (!retryableConnectError(error) || Clock::now() >= deadline) {
      throwSystemError(error, fmt::format("connect to the guest agent at vsock CID {} port {}{}", cid,
                                          port, retryableConnectError(error) ? " (gave up)" : ""));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

void AgentConnection::sendFrame(uint16_t type, std::span<const uint8_t> payload) {
  require(payload.size() <= CA_MAX_PAYLOAD, "guest agent frame of {} bytes is too long", payload.size());
  uint8_t header[CA_HEADER_SIZE];
  ca_encode_header(header, type, static_cast<uint32_t>(payload.size()));
  sendAll(fd_.get(), header, sizeof header);
  if (!payload.empty()) sendAll(fd_.get(), payload.data(), payload.size());
}

std::optional<AgentFrame> AgentConnection::readFrame(std::optional<Clock::time_point> deadline) {
  uint8_t raw[CA_HEADER_SIZE];
  if (!readAll(fd_.get(), raw, sizeof raw, deadline)) return std::nullopt;
  ca_header header;
  int status = ca_decode_header(raw, &header);
  if (status != CA_OK) throw AgentError(0, fmt::format("guest agent: {}", ca_status_text(status)));
  AgentFrame frame;
  frame.type = header.type;
  frame.payload.resize(header.length);
  if (header.length && !readAll(fd_.get(), frame.payload.data(), header.length, deadline)) {
    throw AgentError(0, "guest agent: connection closed in the middle of a frame");
  }
  return frame;
}

std::chrono::microseconds ping(AgentConnection& connection) {
  static constexpr uint8_t kProbe[] = {'c', 'l', 'o', 'n', 'e'};
  auto start = Clock::now();
  connection.sendFrame(CA_PING, kProbe);
  auto frame = requireFrame(connection, "before PONG");
  if (frame.type != CA_PONG) throwUnexpected(frame, "instead of PONG");
  if (frame.payload != std::vector<uint8_t>(std::begin(kProbe), std::end(kProbe))) {
    throw AgentError(0, "guest agent: PONG does not echo the PING");
  }
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - start);
}

ExecResult exec(AgentConnection& connection, const ExecRequest& request, int inFd, int outFd,
                int errFd, std::optional<std::chrono::milliseconds> timeout) {
  std::optional<Clock::time_point> deadline;
  if (timeout) deadline = Clock::now() + *timeout;
  std::vector<const char*> argv, env;
  for (const auto& arg : request.argv) argv.push_back(arg.c_str());
  if (request.env) {
    for (const auto& entry : *request.env) env.push_back(entry.c_str());
  }
  std::vector<uint8_t> payload(CA_MAX_PAYLOAD);
  long size = ca_encode_exec(payload.data(), payload.size(), argv.data(),
                             static_cast<uint32_t>(argv.size()), env.data(),
                             static_cast<uint32_t>(env.size()), request.env.has_value());
  if (size < 0) {
    throw Error(fmt::format("guest command: {} (at most {} arguments and {} bytes in all)",
                            ca_status_text(static_cast<int>(size)), CA_MAX_ARGS, CA_MAX_PAYLOAD));
  }
  payload.resize(static_cast<size_t>(size));
  connection.sendFrame(CA_EXEC, payload);

  // stdin goes on its own thread: the agent stops reading the connection while the command
  // does not consume its input, and we must keep reading its output meanwhile.
  UniqueFd stop(::eventfd(0, EFD_CLOEXEC));
  if (!stop) throwSystemError(errno, "eventfd");
  std::thread forwarder([&connection, inFd, stopFd = stop.get()] {
    try {
      if (inFd >= 0) {
        std::vector<uint8_t> buffer(CA_MAX_PAYLOAD);
        for (;;) {
          pollfd fds[2] = {{inFd, POLLIN, 0}, {stopFd, POLLIN, 0}};
          if (::poll(fds, 2, -1) < 0) {
            if (errno == EINTR) continue;
            return;
          }
          if (fds[1].revents) return;
          ssize_t n = ::read(inFd, buffer.data(), buffer.size());
          if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
          if (n <= 0) break;
          connection.sendFrame(CA_STDIN, std::span(buffer.data(), static_cast<size_t>(n)));
        }
      }
      connection.sendFrame(CA_STDIN_EOF, {});
    } catch (const std::exception&) {
      // The agent went away; the reader reports it.
    }
  });
  auto stopForwarder = [&] {
    uint64_t one = 1;
    (void)!::write(stop.get(), &one, sizeof one);
    forwarder.join();
  };

  try {
    for (;;) {
      auto frame = requireFrame(connection, "before the command's exit status", deadline);
      switch (frame.type) {
        case CA_STDOUT:
          writeAllFd(outFd, frame.payload.data(), frame.payload.size(), "write the command's stdout");
          break;
        case CA_STDERR:
          writeAllFd(errFd, frame.payload.data(), frame.payload.size(), "write the command's stderr");
          break;
        case CA_EXIT: {
          ca_exit status;
          int rc = ca_decode_exit(frame.payload.data(), frame.payload.size(), &status);
          if (rc != CA_OK) throw AgentError(0, fmt::format("guest agent: bad EXIT: {}", ca_status_text(rc)));
          stopForwarder();
          return ExecResult{status.kind == 1, status.value};
        }
        default:
          throwUnexpected(frame, "during EXEC");
      }
    }
  } catch (...) {
    stopForwarder();
    throw;
  }
}

IdentityResult applyIdentity(AgentConnection& connection, const Identity& identity) {
  ca_identity request{};
  if (identity.hostname) {
    require(!identity.hostname->empty() && identity.hostname->size() <= CA_MAX_HOSTNAME,
            "hostname '{}': 1 to {} characters", *identity.hostname, CA_MAX_HOSTNAME);
    request.fields |= CA_ID_HOSTNAME;
    request.hostname_length = static_cast<uint32_t>(identity.hostname->size());
    std::memcpy(request.hostname, identity.hostname->data(), identity.hostname->size());
  }
  if (!identity.rngSeed.empty()) {
    require(identity.rngSeed.size() <= CA_MAX_SEED, "RNG seed of {} bytes: at most {}",
            identity.rngSeed.size(), CA_MAX_SEED);
    request.fields |= CA_ID_SEED;
    request.seed_length = static_cast<uint32_t>(identity.rngSeed.size());
    std::memcpy(request.seed, identity.rngSeed.data(), identity.rngSeed.size());
  }
  if (identity.clock) {
    auto since = identity.clock->time_since_epoch();
    auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(since).count();
    require(ns >= 0, "clock before 1970");
    request.fields |= CA_ID_CLOCK;
    request.clock_seconds = ns / 1000000000;
    request.clock_nanoseconds = static_cast<uint32_t>(ns % 1000000000);
  }
  uint8_t payload[CA_IDENTITY_MAX_SIZE];
  long size = ca_encode_identity(payload, sizeof payload, &request);
  require(size >= 0, "identity: {}", ca_status_text(static_cast<int>(size)));
  connection.sendFrame(CA_IDENTITY, std::span(payload, static_cast<size_t>(size)));
  auto frame = requireFrame(connection, "before IDENTITY_RESULT");
  if (frame.type != CA_IDENTITY_RESULT) throwUnexpected(frame, "instead of IDENTITY_RESULT");
  ca_identity_result raw;
  int rc = ca_decode_identity_result(frame.payload.data(), frame.payload.size(), &raw);
  if (rc != CA_OK) throw AgentError(0, fmt::format("guest agent: bad IDENTITY_RESULT: {}", ca_status_text(rc)));
  IdentityResult result;
  result.hostnameApplied = raw.applied & CA_ID_HOSTNAME;
  result.seedApplied = raw.applied & CA_ID_SEED;
  result.clockApplied = raw.applied & CA_ID_CLOCK;
  result.hostnameError = raw.hostname_error;
  result.seedError = raw.seed_error;
  result.reseedError = raw.reseed_error;
  result.clockError = raw.clock_error;
  result.entropyAvail = raw.entropy_avail;
  result.crngReady = raw.crng_ready;
  result.guestClock = std::chrono::system_clock::time_point(std::chrono::duration_cast<std::chrono::system_clock::duration>(
      std::chrono::seconds(raw.clock_seconds) + std::chrono::nanoseconds(raw.clock_nanoseconds)));
  result.guestHostname.assign(raw.hostname, raw.hostname_length);
  return result;
}

}  // namespace clonevm::cli
