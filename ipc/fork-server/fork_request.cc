#include "ipc/fork-server/fork_request.h"

#include <fcntl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include <fmt/format.h>

#include "ipc/fd_passing.h"

namespace clonevm::ipc {
namespace {

constexpr uint32_t kRequestMagic = 0x4b524643;  // "CFRK"
constexpr uint32_t kReplyMagic = 0x52524643;    // "CFRR"
constexpr uint16_t kVersion = 1;
constexpr size_t kRequestFds = 2;
// Room for more fds than a request carries, so that extra ones are seen and closed.
constexpr size_t kMaxReceivedFds = 8;

struct WireRequest {
  uint32_t magic;
  uint16_t version;
  uint16_t reserved;
  uint32_t vsockCid;
  uint32_t reserved2;
  char forkId[64];
  char apiSocketName[108];  // sizeof(sockaddr_un::sun_path)
};

struct WireReply {
  uint32_t magic;
  uint16_t version;
  uint16_t reserved;
  int32_t pid;
  uint32_t vsockCid;
  char error[240];
};

template <size_t N>
void copyString(char (&to)[N], std::string_view from, std::string_view what) {
  require(from.size() < N, "fork request: {} is {} bytes, more than {}", what, from.size(), N - 1);
  std::memset(to, 0, N);
  std::memcpy(to, from.data(), from.size());
}

// The string up to its NUL, which must be inside the field.
template <size_t N>
std::string fieldString(const char (&field)[N], std::string_view message, std::string_view what) {
  const char* end = std::find(field, field + N, '\0');
  require(end != field + N, "{}: {} is not terminated", message, what);
  return std::string(field, end);
}

// Receives one datagram of exactly `size` bytes; returns the fds that came with it.
std::vector<UniqueFd> receiveDatagram(int socket, void* bytes, size_t size, std::string_view what) {
  std::vector<uint8_t> buffer(size + 1);  // one more: a longer datagram shows as too long
  iovec iov{buffer.data(), buffer.size()};
  msghdr message{};
  message.msg_iov = &iov;
  message.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxReceivedFds)]{};
  message.msg_control = control;
  message.msg_controllen = sizeof(control);
  ssize_t received = CLONE_SYSCALL(::recvmsg(socket, &message, MSG_CMSG_CLOEXEC), what);
  std::vector<UniqueFd> fds;
  for (cmsghdr* header = CMSG_FIRSTHDR(&message); header != nullptr;
       header = CMSG_NXTHDR(&message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
    size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof(int));
      fds.emplace_back(fd);
    }
  }
  if (received == 0 && fds.empty()) throw ForkSocketClosed(fmt::format("{}: the peer hung up", what));
  require((message.msg_flags & MSG_CTRUNC) == 0, "{}: more than {} fds", what, kMaxReceivedFds);
  require((message.msg_flags & MSG_TRUNC) == 0 && static_cast<size_t>(received) == size,
          "{}: {} bytes{}, expected {}", what, received,
          (message.msg_flags & MSG_TRUNC) != 0 ? " or more" : "", size);
  std::memcpy(bytes, buffer.data(), size);
  return fds;
}

bool validForkId(std::string_view id) {
  return !id.empty() && std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '_' || c == '-';
  });
}

}  // namespace

void sendForkRequest(int socket, const ForkRequest& request) {
  require(validForkId(request.forkId), "fork request: fork id '{}' is not [A-Za-z0-9._-]+",
          request.forkId);
  require(request.apiListener.valid() && request.output.valid(),
          "fork request: an API listener and an output fd are both needed");
  WireRequest wire{};
  wire.magic = kRequestMagic;
  wire.version = kVersion;
  wire.vsockCid = request.vsockCid;
  copyString(wire.forkId, request.forkId, "the fork id");
  copyString(wire.apiSocketName, request.apiSocketName, "the API socket name");
  int fds[kRequestFds] = {request.apiListener.get(), request.output.get()};
  sendDatagramWithFds(socket, &wire, sizeof(wire), fds, "send a fork request");
}

ForkRequest receiveForkRequest(int socket) {
  WireRequest wire{};
  auto fds = receiveDatagram(socket, &wire, sizeof(wire), "receive a fork request");
  constexpr std::string_view kBad = "bad fork request";
  require(wire.magic == kRequestMagic && wire.version == kVersion,
          "{}: magic {:#x} version {}, expected {:#x} version {}", kBad, wire.magic, wire.version,
          kRequestMagic, kVersion);
  require(fds.size() == kRequestFds, "{}: {} fds, expected {} (API listener, output)", kBad,
          fds.size(), kRequestFds);
  ForkRequest request;
  request.forkId = fieldString(wire.forkId, kBad, "the fork id");
  require(validForkId(request.forkId), "{}: fork id '{}' is not [A-Za-z0-9._-]+", kBad,
          request.forkId);
  request.apiSocketName = fieldString(wire.apiSocketName, kBad, "the API socket name");
  request.vsockCid = wire.vsockCid;
  request.apiListener = std::move(fds[0]);
  request.output = std::move(fds[1]);
  int listening = 0;
  socklen_t length = sizeof(listening);
  int domain = 0;
  socklen_t domainLength = sizeof(domain);
  require(::getsockopt(request.apiListener.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0 &&
              listening == 1 &&
              ::getsockopt(request.apiListener.get(), SOL_SOCKET, SO_DOMAIN, &domain, &domainLength) == 0 &&
              domain == AF_UNIX,
          "{}: the first fd is not a listening unix socket", kBad);
  int flags = ::fcntl(request.output.get(), F_GETFL);
  require(flags >= 0 && ((flags & O_ACCMODE) == O_WRONLY || (flags & O_ACCMODE) == O_RDWR),
          "{}: the second fd (output) is not open for writing", kBad);
  return request;
}

void sendForkReply(int socket, const ForkReply& reply) {
  WireReply wire{};
  wire.magic = kReplyMagic;
  wire.version = kVersion;
  wire.pid = reply.pid;
  wire.vsockCid = reply.vsockCid;
  // An error longer than the field is cut, not refused: it is only text.
  std::string_view error = reply.error;
  copyString(wire.error, error.substr(0, sizeof(wire.error) - 1), "the error");
  sendDatagramWithFds(socket, &wire, sizeof(wire), {}, "send a fork reply");
}

ForkReply receiveForkReply(int socket) {
  WireReply wire{};
  auto fds = receiveDatagram(socket, &wire, sizeof(wire), "receive a fork reply");
  constexpr std::string_view kBad = "bad fork reply";
  require(wire.magic == kReplyMagic && wire.version == kVersion, "{}: magic {:#x} version {}",
          kBad, wire.magic, wire.version);
  require(fds.empty(), "{}: {} unexpected fds", kBad, fds.size());
  ForkReply reply;
  reply.pid = wire.pid;
  reply.vsockCid = wire.vsockCid;
  reply.error = fieldString(wire.error, kBad, "the error");
  require(reply.error.empty() ? reply.pid > 0 : reply.pid == 0,
          "{}: pid {} with error '{}'", kBad, reply.pid, reply.error);
  return reply;
}

std::pair<UniqueFd, UniqueFd> makeForkSocketPair() {
  int ends[2];
  CLONE_SYSCALL(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ends),
                "create the fork server's socket pair");
  return {UniqueFd(ends[0]), UniqueFd(ends[1])};
}

std::string spareOverlayPath(const std::string& overlayDir, pid_t pid, size_t disk) {
  return fmt::format("{}/spare-{}.disk{}.qcow2", overlayDir, pid, disk);
}

}  // namespace clonevm::ipc
