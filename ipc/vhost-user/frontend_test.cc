// The front-end against a scripted fake back-end: replies, refusals, disconnects, timeouts.

#include "ipc/vhost-user/frontend.h"

#include <sys/eventfd.h>

#include <functional>
#include <thread>

#include <gtest/gtest.h>

namespace clonevm::ipc::vhost {
namespace {

// Runs `script` on the back-end end of a socket pair in a thread.
class FakeBackend {
 public:
  explicit FakeBackend(std::function<void(Channel&)> script) {
    auto [ours, theirs] = makeSocketPair();
    frontendSocket_ = std::move(ours);
    thread_ = std::thread([script = std::move(script), fd = theirs.release()] {
      Channel channel(UniqueFd(fd), "front-end");
      try {
        script(channel);
      } catch (const std::exception&) {
        // The front-end went away first; fine for these tests.
      }
    });
  }
  ~FakeBackend() { thread_.join(); }
  UniqueFd takeSocket() { return std::move(frontendSocket_); }

 private:
  UniqueFd frontendSocket_;
  std::thread thread_;
};

void reply(Channel& channel, const Message& request, std::vector<uint8_t> payload,
           uint32_t flags = kReplyFlag) {
  MessageHeader header{request.header.request, kVersion | flags,
                       static_cast<uint32_t>(payload.size())};
  channel.send(header, payload);
}

template <typename T>
std::vector<uint8_t> bytes(const T& value) {
  auto* p = reinterpret_cast<const uint8_t*>(&value);
  return std::vector<uint8_t>(p, p + sizeof(T));
}

FrontendOptions quick() { return FrontendOptions{std::chrono::milliseconds(2000)}; }

TEST(FrontendTest, SendsWellFormedRequestsAndReadsReplies) {
  FakeBackend backend([](Channel& channel) {
    Message m = channel.receive();
    EXPECT_EQ(m.frontendRequest(), FrontendRequest::kGetFeatures);
    EXPECT_EQ(m.header.flags, kVersion);
    EXPECT_EQ(m.header.size, 0u);
    reply(channel, m, bytes(uint64_t{0x140000000}));

    m = channel.receive();
    EXPECT_EQ(m.frontendRequest(), FrontendRequest::kSetFeatures);
    EXPECT_EQ(m.payloadAs<uint64_t>(), 0x100000000u);

    m = channel.receive();
    EXPECT_EQ(m.frontendRequest(), FrontendRequest::kSetVringKick);
    EXPECT_EQ(m.payloadAs<uint64_t>(), 2u);
    EXPECT_EQ(m.fds.size(), 1u);

    m = channel.receive();
    EXPECT_EQ(m.frontendRequest(), FrontendRequest::kSetVringCall);
    EXPECT_EQ(m.payloadAs<uint64_t>(), 3u | kVringNoFdFlag);
    EXPECT_TRUE(m.fds.empty());

    m = channel.receive();
    EXPECT_EQ(m.frontendRequest(), FrontendRequest::kGetVringBase);
    reply(channel, m, bytes(VringState{1, 77}));
  });
  Frontend frontend(backend.takeSocket(), "fake", quick());
  EXPECT_EQ(frontend.getFeatures(), 0x140000000u);
  frontend.setFeatures(0x100000000u);
  UniqueFd event(::eventfd(0, EFD_CLOEXEC));
  frontend.setVringKick(2, event.get());
  frontend.setVringCall(3, -1);
  EXPECT_EQ(frontend.getVringBase(1), 77u);
}

TEST(FrontendTest, ReplyAckOnEveryRequestWithoutAReply) {
  FakeBackend backend([](Channel& channel) {
    Message m = channel.receive();  // SET_PROTOCOL_FEATURES: no NEED_REPLY yet
    EXPECT_EQ(m.header.flags & kNeedReplyFlag, 0u);
    for (int i = 0; i < 2; ++i) {
      m = channel.receive();
      EXPECT_NE(m.header.flags & kNeedReplyFlag, 0u) << requestName(m.frontendRequest());
      // Refuse SET_VRING_ADDR, accept the other.
      uint64_t status = m.frontendRequest() == FrontendRequest::kSetVringAddr ? 1 : 0;
      reply(channel, m, bytes(status));
    }
    m = channel.receive();  // GET_QUEUE_NUM has its own reply: no NEED_REPLY
    EXPECT_EQ(m.header.flags & kNeedReplyFlag, 0u);
    reply(channel, m, bytes(uint64_t{4}));
  });
  Frontend frontend(backend.takeSocket(), "fake", quick());
  frontend.setProtocolFeatures(bit(protocol::kReplyAck));
  frontend.setVringNum(0, 256);
  try {
    frontend.setVringAddr(0, {});
    FAIL() << "a refused request did not throw";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "vhost-user backend fake refused SET_VRING_ADDR (status 1)");
  }
  EXPECT_EQ(frontend.getQueueNum(), 4u) << "a refusal leaves the connection usable";
}

TEST(FrontendTest, DisconnectDuringARequestIsAClearError) {
  FakeBackend backend([](Channel& channel) {
    channel.receive();  // SET_PROTOCOL_FEATURES
    channel.receive();  // SET_VRING_ADDR with NEED_REPLY: hang up instead of answering
  });
  Frontend frontend(backend.takeSocket(), "/run/clone/blk0.sock", quick());
  frontend.setProtocolFeatures(bit(protocol::kReplyAck));
  try {
    frontend.setVringAddr(0, {});
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "vhost-user backend /run/clone/blk0.sock disconnected during SET_VRING_ADDR");
  }
  // Later calls fail fast with the reason.
  try {
    frontend.getFeatures();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("cannot send GET_FEATURES, the connection is unusable"),
              std::string::npos)
        << e.what();
  }
}

TEST(FrontendTest, SendingToAGoneBackendIsNotSigpipe) {
  FakeBackend backend([](Channel&) {});
  Frontend frontend(backend.takeSocket(), "gone", quick());
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  try {
    frontend.setOwner();
    frontend.setOwner();  // the first may still fit in the socket buffer
    FAIL();
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "vhost-user backend gone disconnected during SET_OWNER");
  }
}

TEST(FrontendTest, MalformedRepliesAreRejected) {
  FakeBackend backend([](Channel& channel) {
    Message m = channel.receive();
    reply(channel, m, bytes(uint32_t{1}));  // 4 bytes instead of 8
  });
  Frontend frontend(backend.takeSocket(), "fake", quick());
  try {
    frontend.getFeatures();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("failed GET_FEATURES"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("payload is 4 bytes, must be 8"), std::string::npos)
        << e.what();
  }
}

TEST(FrontendTest, ReplyToTheWrongRequestIsRejected) {
  FakeBackend backend([](Channel& channel) {
    Message m = channel.receive();
    m.header.request = static_cast<uint32_t>(FrontendRequest::kGetQueueNum);
    reply(channel, m, bytes(uint64_t{1}));
  });
  Frontend frontend(backend.takeSocket(), "fake", quick());
  EXPECT_THROW(frontend.getProtocolFeatures(), Error);
}

TEST(FrontendTest, ReplyWithoutTheReplyFlagIsRejected) {
  FakeBackend backend([](Channel& channel) {
    Message m = channel.receive();
    reply(channel, m, bytes(uint64_t{1}), 0);
  });
  Frontend frontend(backend.takeSocket(), "fake", quick());
  EXPECT_THROW(frontend.getFeatures(), Error);
}

TEST(FrontendTest, SilentBackendTimesOut) {
  FakeBackend backend([](Channel& channel) {
    channel.receive();
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
  });
  Frontend frontend(backend.takeSocket(), "slow", FrontendOptions{std::chrono::milliseconds(50)});
  try {
    frontend.getFeatures();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("vhost-user backend slow did not answer GET_FEATURES"),
              std::string::npos)
        << e.what();
  }
}

TEST(FrontendTest, GetConfigEmptyReplyIsARefusal) {
  FakeBackend backend([](Channel& channel) {
    Message m = channel.receive();
    EXPECT_EQ(m.header.size, sizeof(ConfigHeader) + 16);
    reply(channel, m, {});
    m = channel.receive();
    auto header = m.payloadAs<ConfigHeader>();
    std::vector<uint8_t> payload = m.payload;
    payload[sizeof(ConfigHeader)] = 0x42;
    (void)header;
    reply(channel, m, payload);
  });
  Frontend frontend(backend.takeSocket(), "fake", quick());
  EXPECT_THROW(frontend.getConfig(0, 16), Error);
  auto config = frontend.getConfig(0, 4);
  EXPECT_EQ(config.size(), 4u);
  EXPECT_EQ(config[0], 0x42);
}

TEST(FrontendTest, MemTableCarriesOneFdPerRegion) {
  FakeBackend backend([](Channel& channel) {
    Message m = channel.receive();
    EXPECT_EQ(m.frontendRequest(), FrontendRequest::kSetMemTable);
    EXPECT_NO_THROW(validateFrontendRequest(m));
    auto header = m.payloadAs<MemoryTableHeader>();
    EXPECT_EQ(header.regionCount, 2u);
    EXPECT_EQ(m.fds.size(), 2u);
    MemoryRegion second;
    std::memcpy(&second, m.payload.data() + 8 + 32, sizeof(second));
    EXPECT_EQ(second.guestAddress, 0x100000000u);
    EXPECT_EQ(second.mmapOffset, 0xc0000000u);
  });
  Frontend frontend(backend.takeSocket(), "fake", quick());
  UniqueFd fd(::eventfd(0, EFD_CLOEXEC));
  MemoryRegionSpec regions[] = {{0, 0xc0000000, 0x7f0000000000, 0, fd.get()},
                                {0x100000000, 0x40000000, 0x7f00c0000000, 0xc0000000, fd.get()}};
  frontend.setMemTable(regions);
  MemoryRegionSpec tooMany[9] = {};
  EXPECT_THROW(frontend.setMemTable(tooMany), Error);
}

}  // namespace
}  // namespace clonevm::ipc::vhost
