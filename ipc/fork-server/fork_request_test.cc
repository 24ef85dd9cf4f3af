#include "ipc/fork-server/fork_request.h"
#include "ipc/fd_passing.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>
#include <gtest/gtest.h>

namespace clonevm::ipc {
namespace {

UniqueFd listeningSocket() {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_TRUE(fd.valid());
  sockaddr_un address{};
  address.sun_family = AF_UNIX;  // autobind: an abstract name of the kernel's choosing
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<sockaddr*>(&address), sizeof(sa_family_t)), 0);
  EXPECT_EQ(::listen(fd.get(), 1), 0);
  return fd;
}

struct Pipe {
  UniqueFd read, write;
};
Pipe makePipe() {
  int ends[2];
  EXPECT_EQ(::pipe2(ends, O_CLOEXEC), 0);
  return {UniqueFd(ends[0]), UniqueFd(ends[1])};
}

ForkRequest validRequest(Pipe& output) {
  ForkRequest request;
  request.forkId = "fork-0123abcd";
  request.apiSocketName = "/run/clone/fork-0123abcd.sock";
  request.vsockCid = 77;
  request.apiListener = listeningSocket();
  request.output = std::move(output.write);
  return request;
}

// Sends raw bytes and fds, as a hostile or broken client would.
void sendRaw(int socket, const void* bytes, size_t size, std::vector<int> fds = {}) {
  sendDatagramWithFds(socket, bytes, size, fds, "send raw");
}

std::string errorOf(int socket) {
  try {
    receiveForkRequest(socket);
  } catch (const ForkSocketClosed& closed) {
    return std::string("closed: ") + closed.what();
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(ForkRequestTest, RoundTripCarriesTheFieldsAndBothFds) {
  auto [client, server] = makeForkSocketPair();
  Pipe output = makePipe();
  ForkRequest sent = validRequest(output);
  sendForkRequest(client.get(), sent);
  ForkRequest got = receiveForkRequest(server.get());
  EXPECT_EQ(got.forkId, sent.forkId);
  EXPECT_EQ(got.apiSocketName, sent.apiSocketName);
  EXPECT_EQ(got.vsockCid, 77u);
  // The received output fd is the pipe's write end: what goes in comes out of ours.
  ASSERT_EQ(::write(got.output.get(), "hi", 2), 2);
  char text[2];
  ASSERT_EQ(::read(output.read.get(), text, 2), 2);
  EXPECT_EQ(std::string(text, 2), "hi");
  EXPECT_NE(got.apiListener.get(), sent.apiListener.get());
}

TEST(ForkRequestTest, ReplyRoundTrip) {
  auto [client, server] = makeForkSocketPair();
  sendForkReply(server.get(), {.pid = 1234, .vsockCid = 4000});
  auto ok = receiveForkReply(client.get());
  EXPECT_EQ(ok.pid, 1234);
  EXPECT_EQ(ok.vsockCid, 4000u);
  EXPECT_EQ(ok.error, "");
  sendForkReply(server.get(), {.error = std::string(1000, 'x')});  // cut to the field, not refused
  auto refused = receiveForkReply(client.get());
  EXPECT_EQ(refused.pid, 0);
  EXPECT_EQ(refused.error, std::string(239, 'x'));
}

TEST(ForkRequestTest, AHangUpIsReportedAsSuch) {
  auto [client, server] = makeForkSocketPair();
  client.reset();
  EXPECT_NE(errorOf(server.get()).find("closed: "), std::string::npos);
}

TEST(ForkRequestTest, MalformedRequestsAreRefusedWithTheReasonAndTheirFdsClosed) {
  auto [client, server] = makeForkSocketPair();
  Pipe output = makePipe();
  ForkRequest good = validRequest(output);
  // A correct datagram to copy and break.
  sendForkRequest(client.get(), good);
  std::vector<uint8_t> bytes(4096);
  ssize_t size = ::recv(server.get(), bytes.data(), bytes.size(), 0);  // its fds are dropped
  ASSERT_GT(size, 0);
  bytes.resize(static_cast<size_t>(size));
  int fds[2] = {good.apiListener.get(), good.output.get()};
  auto openFds = [] {
    int open = 0;
    for (int fd = 0; fd < 256; ++fd) open += ::fcntl(fd, F_GETFD) >= 0;
    return open;
  };
  int openBefore = openFds();

  sendRaw(client.get(), bytes.data(), bytes.size() - 1, {fds[0], fds[1]});
  EXPECT_NE(errorOf(server.get()).find("bytes, expected"), std::string::npos);
  std::vector<uint8_t> longer = bytes;
  longer.push_back(0);
  sendRaw(client.get(), longer.data(), longer.size(), {fds[0], fds[1]});
  EXPECT_NE(errorOf(server.get()).find(fmt::format("{} bytes, expected {}", longer.size(), bytes.size())),
            std::string::npos);

  auto broken = bytes;
  broken[0] ^= 1;
  sendRaw(client.get(), broken.data(), broken.size(), {fds[0], fds[1]});
  EXPECT_NE(errorOf(server.get()).find("magic"), std::string::npos);

  sendRaw(client.get(), bytes.data(), bytes.size(), {fds[0]});
  EXPECT_NE(errorOf(server.get()).find("1 fds, expected 2"), std::string::npos);
  sendRaw(client.get(), bytes.data(), bytes.size(), {fds[0], fds[1], fds[1]});
  EXPECT_NE(errorOf(server.get()).find("3 fds, expected 2"), std::string::npos);

  sendRaw(client.get(), bytes.data(), bytes.size(), {fds[1], fds[0]});  // swapped
  EXPECT_NE(errorOf(server.get()).find("not a listening unix socket"), std::string::npos);
  sendRaw(client.get(), bytes.data(), bytes.size(), {fds[0], output.read.get()});
  EXPECT_NE(errorOf(server.get()).find("not open for writing"), std::string::npos);

  // The fork id field (after 16 header bytes) unterminated, then with a '/'.
  auto unterminated = bytes;
  std::memset(unterminated.data() + 16, 'a', 64);
  sendRaw(client.get(), unterminated.data(), unterminated.size(), {fds[0], fds[1]});
  EXPECT_NE(errorOf(server.get()).find("fork id is not terminated"), std::string::npos);
  auto slash = bytes;
  slash[16] = '/';
  sendRaw(client.get(), slash.data(), slash.size(), {fds[0], fds[1]});
  EXPECT_NE(errorOf(server.get()).find("is not [A-Za-z0-9._-]+"), std::string::npos);

  // Every fd that came with a refused request was closed: only ours are left open.
  EXPECT_EQ(openFds(), openBefore);

  // And a good request still goes through afterwards.
  sendForkRequest(client.get(), good);
  EXPECT_EQ(receiveForkRequest(server.get()).forkId, good.forkId);
}

TEST(ForkRequestTest, TheSenderChecksWhatItSends) {
  auto [client, server] = makeForkSocketPair();
  Pipe output = makePipe();
  ForkRequest request = validRequest(output);
  request.forkId = "../escape";
  EXPECT_THROW(sendForkRequest(client.get(), request), Error);
  request.forkId = "ok";
  request.apiSocketName = std::string(200, 's');
  EXPECT_THROW(sendForkRequest(client.get(), request), Error);
  request.apiSocketName = "s";
  request.output.reset();
  EXPECT_THROW(sendForkRequest(client.get(), request), Error);
}

}  // namespace
}  // namespace clonevm::ipc
