#include "ipc/vhost-user/channel.h"

#include <dirent.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>

#include <gtest/gtest.h>

namespace clonevm::ipc::vhost {
namespace {

size_t openFdCount() {
  size_t count = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
    ++count;
  }
  return count;
}

// Sends raw bytes with `fdCount` eventfds attached, bypassing Channel's own checks.
void sendRaw(int socket, const void* data, size_t size, size_t fdCount = 0) {
  std::vector<int> fds;
  for (size_t i = 0; i < fdCount; ++i) fds.push_back(::eventfd(0, EFD_CLOEXEC));
  iovec iov{const_cast<void*>(data), size};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * fds.size()));
  if (!fds.empty()) {
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(cmsg), fds.data(), sizeof(int) * fds.size());
  }
  ASSERT_EQ(::sendmsg(socket, &msg, MSG_NOSIGNAL), static_cast<ssize_t>(size));
  for (int fd : fds) ::close(fd);
}

TEST(ChannelTest, RoundTripWithFds) {
  auto [a, b] = makeSocketPair();
  Channel sender(std::move(a), "sender");
  Channel receiver(std::move(b), "receiver");
  UniqueFd event(::eventfd(0, EFD_CLOEXEC));
  uint64_t value = 0x1234;
  MessageHeader header{static_cast<uint32_t>(FrontendRequest::kSetVringKick), kVersion, 8};
  int fd = event.get();
  sender.send(header, std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&value), 8),
              std::span<const int>(&fd, 1));
  Message m = receiver.receive();
  EXPECT_EQ(m.frontendRequest(), FrontendRequest::kSetVringKick);
  EXPECT_EQ(m.payloadAs<uint64_t>(), 0x1234u);
  ASSERT_EQ(m.fds.size(), 1u);
  // The received fd is the same eventfd: a write through it is seen through ours.
  uint64_t one = 1;
  ASSERT_EQ(::write(m.fds[0].get(), &one, 8), 8);
  uint64_t got = 0;
  ASSERT_EQ(::read(event.get(), &got, 8), 8);
  EXPECT_EQ(got, 1u);
}

TEST(ChannelTest, CleanEofIsChannelClosed) {
  auto [a, b] = makeSocketPair();
  Channel receiver(std::move(b), "front-end");
  a.reset();
  EXPECT_THROW(receiver.receive(), ChannelClosed);
}

TEST(ChannelTest, TruncatedHeaderIsAnError) {
  auto [a, b] = makeSocketPair();
  Channel receiver(std::move(b), "front-end");
  uint32_t partial[2] = {1, kVersion};
  sendRaw(a.get(), partial, sizeof(partial));
  a.reset();
  try {
    receiver.receive();
    FAIL() << "a truncated header was accepted";
  } catch (const ChannelClosed& e) {
    EXPECT_NE(std::string(e.what()).find("in the middle of a message (8 of 12"), std::string::npos)
        << e.what();
  }
}

TEST(ChannelTest, TruncatedPayloadClosesItsFds) {
  size_t before = openFdCount();
  {
    auto [a, b] = makeSocketPair();
    Channel receiver(std::move(b), "front-end");
    MessageHeader header{static_cast<uint32_t>(FrontendRequest::kSetVringKick), kVersion, 8};
    sendRaw(a.get(), &header, sizeof(header), 1);
    a.reset();
    EXPECT_THROW(receiver.receive(), ChannelClosed);
  }
  EXPECT_EQ(openFdCount(), before);
}

TEST(ChannelTest, OversizedPayloadIsRejected) {
  auto [a, b] = makeSocketPair();
  Channel receiver(std::move(b), "front-end");
  MessageHeader header{1, kVersion, kMaxPayloadSize + 1};
  sendRaw(a.get(), &header, sizeof(header));
  EXPECT_THROW(receiver.receive(), Error);
}

TEST(ChannelTest, WrongVersionIsRejected) {
  auto [a, b] = makeSocketPair();
  Channel receiver(std::move(b), "front-end");
  MessageHeader header{1, 0x2, 0};
  sendRaw(a.get(), &header, sizeof(header));
  try {
    receiver.receive();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("version 2"), std::string::npos) << e.what();
  }
}

TEST(ChannelTest, TooManyFdsAreRejectedAndNoneLeak) {
  size_t before = openFdCount();
  {
    auto [a, b] = makeSocketPair();
    Channel receiver(std::move(b), "front-end");
    MessageHeader header{static_cast<uint32_t>(FrontendRequest::kSetMemTable), kVersion, 0};
    sendRaw(a.get(), &header, sizeof(header), kMaxFdsPerMessage + 3);
    try {
      receiver.receive();
      FAIL() << "11 fds were accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("more than 8 file descriptors"), std::string::npos)
          << e.what();
    }
  }
  EXPECT_EQ(openFdCount(), before);
}

TEST(ChannelTest, SendToAClosedPeerIsChannelClosedNotSigpipe) {
  auto [a, b] = makeSocketPair();
  Channel sender(std::move(a), "back-end");
  b.reset();
  MessageHeader header{1, kVersion, 0};
  EXPECT_THROW(sender.send(header, {}), ChannelClosed);
}

TEST(ChannelTest, ReceiveTimesOut) {
  auto [a, b] = makeSocketPair();
  Channel receiver(std::move(b), "back-end");
  receiver.setReceiveTimeout(std::chrono::milliseconds(20));
  EXPECT_THROW(receiver.receive(), ChannelTimeout);
}

TEST(ChannelTest, PayloadSplitAcrossWritesIsReassembled) {
  auto [a, b] = makeSocketPair();
  Channel receiver(std::move(b), "front-end");
  MessageHeader header{static_cast<uint32_t>(FrontendRequest::kSetFeatures), kVersion, 8};
  uint64_t value = 42;
  sendRaw(a.get(), &header, 5);
  sendRaw(a.get(), reinterpret_cast<uint8_t*>(&header) + 5, sizeof(header) - 5);
  sendRaw(a.get(), &value, 3);
  sendRaw(a.get(), reinterpret_cast<uint8_t*>(&value) + 3, 5, 1);  // an fd with a later piece
  Message m = receiver.receive();
  EXPECT_EQ(m.payloadAs<uint64_t>(), 42u);
  EXPECT_EQ(m.fds.size(), 1u);
}

TEST(ChannelTest, ListenAcceptConnect) {
  std::string path = ::testing::TempDir() + "/vhost-channel-test.sock";
  UniqueFd listener = listenUnixSocket(path);
  EXPECT_TRUE(isListeningSocket(listener.get()));
  UniqueFd client = connectUnixSocket(path);
  EXPECT_FALSE(isListeningSocket(client.get()));
  // A stale socket file is replaced.
  UniqueFd again = listenUnixSocket(path);
  EXPECT_TRUE(isListeningSocket(again.get()));
  ::unlink(path.c_str());
}

}  // namespace
}  // namespace clonevm::ipc::vhost
