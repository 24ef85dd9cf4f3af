// Loopback tests: our front-end drives our back-end library over a unix socket, with the test
// playing the guest driver in a memfd-backed guest memory. Then everything a hostile or buggy
// front-end or driver can send, and a check that the back-end keeps serving after each.

#include "ipc/vhost-user/backend.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include "ipc/vhost-user/frontend.h"
#include "ipc/vhost-user/test_device.h"
#include "ipc/vhost-user/test_guest.h"

namespace clonevm::ipc::vhost {
namespace {

using testing::TestGuestMemory;
using testing::TestRing;
using testing::XorDevice;

constexpr auto kTimeout = std::chrono::milliseconds(5000);

bool waitReadable(int fd, std::chrono::milliseconds timeout = kTimeout) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, static_cast<int>(timeout.count())) == 1;
}

uint64_t drain(int fd) {
  uint64_t count = 0;
  if (::read(fd, &count, sizeof(count)) != sizeof(count)) return 0;
  return count;
}

void kick(int fd) {
  uint64_t one = 1;
  ASSERT_EQ(::write(fd, &one, sizeof(one)), 8);
}

template <typename T>
std::vector<uint8_t> bytes(const T& value) {
  auto* p = reinterpret_cast<const uint8_t*>(&value);
  return std::vector<uint8_t>(p, p + sizeof(T));
}

class BackendTest : public ::testing::Test {
 protected:
  void SetUp() override { startBackend(1); }

  void startBackend(uint16_t queues) {
    static std::atomic<int> counter{0};
    device_ = std::make_unique<XorDevice>(queues);
    sink_ = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(256);
    log_ = std::make_shared<spdlog::logger>("vhost-test", sink_);
    log_->set_level(spdlog::level::trace);
    backend_ = std::make_unique<VhostUserBackend>(*device_, *log_);
    path_ = fmt::format("{}/vhost-backend-test-{}-{}.sock", ::testing::TempDir(), ::getpid(),
                        counter++);
    UniqueFd listener = listenUnixSocket(path_);
    thread_ = std::thread([this, fd = listener.release()] { backend_->serveFd(UniqueFd(fd)); });
  }

  void TearDown() override {
    backend_->stop();
    thread_.join();
    ::unlink(path_.c_str());
  }

  std::string logText() {
    std::string text;
    for (const auto& line : sink_->last_formatted()) text += line;
    return text;
  }

  Frontend connect() { return Frontend::connect(path_, FrontendOptions{kTimeout}); }

  // Features and protocol features, everything the back-end offers.
  void negotiate(Frontend& frontend, bool replyAck = true) {
    uint64_t features = frontend.getFeatures();
    uint64_t protocols = frontend.getProtocolFeatures();
    if (!replyAck) protocols &= ~bit(protocol::kReplyAck);
    frontend.setFeatures(features);
    frontend.setProtocolFeatures(protocols);
    frontend.setOwner();
  }

  // Memory table and queue 0 fully set up and enabled.
  void setUpQueue(Frontend& frontend, TestRing& ring, int kickFd, int callFd, uint32_t base = 0,
                  int errFd = -1) {
    auto spec = guest_.spec();
    frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
    frontend.setVringNum(0, ring.size());
    frontend.setVringBase(0, base);
    frontend.setVringAddr(0, ring.addresses());
    frontend.setVringCall(0, callFd);
    if (errFd >= 0) frontend.setVringErr(0, errFd);
    frontend.setVringKick(0, kickFd);
    frontend.setVringEnable(0, true);
  }

  // After a failure: the back-end serves a new front-end.
  void expectServesANewConnection() {
    Frontend fresh = connect();
    EXPECT_NE(fresh.getFeatures() & bit(feature::kVersion1), 0u);
  }

  TestGuestMemory guest_{1 << 20, 0x80000000};
  std::unique_ptr<XorDevice> device_;
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
  std::shared_ptr<spdlog::logger> log_;
  std::unique_ptr<VhostUserBackend> backend_;
  std::string path_;
  std::thread thread_;
  UniqueFd kick_{::eventfd(0, EFD_CLOEXEC)};
  UniqueFd call_{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  UniqueFd err_{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
};

TEST_F(BackendTest, NegotiatesFeaturesAndProtocolFeatures) {
  Frontend frontend = connect();
  uint64_t features = frontend.getFeatures();
  EXPECT_EQ(features & kLibraryTransportFeatures, kLibraryTransportFeatures);
  EXPECT_NE(features & bit(3), 0u) << "the device's own feature bit";
  uint64_t protocols = frontend.getProtocolFeatures();
  for (unsigned f : {protocol::kMq, protocol::kReplyAck, protocol::kConfig, protocol::kBackendReq,
                     protocol::kInflightShmfd, protocol::kResetDevice,
                     protocol::kConfigureMemSlots, protocol::kStatus}) {
    EXPECT_TRUE(hasBit(protocols, f)) << protocolFeatureName(f);
  }
  EXPECT_FALSE(hasBit(protocols, protocol::kLogShmfd));
  negotiate(frontend);
  EXPECT_EQ(frontend.getQueueNum(), 1u);
  EXPECT_EQ(frontend.getMaxMemSlots(), GuestMemoryMap::kDefaultMaxRegions);
  // Features that were not offered are refused, with the request's name.
  try {
    frontend.setFeatures(bit(feature::kRingPacked));
    FAIL() << "an unoffered feature was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("refused SET_FEATURES"), std::string::npos) << e.what();
  }
  EXPECT_EQ(frontend.getQueueNum(), 1u) << "a refused request leaves the connection usable";
}

TEST_F(BackendTest, ConfigSpaceAndStatus) {
  Frontend frontend = connect();
  negotiate(frontend);
  EXPECT_EQ(frontend.getConfig(0, 8)[0], 0xff);
  uint8_t key = 0x5a;
  EXPECT_NO_THROW(frontend.setConfig(0, std::span<const uint8_t>(&key, 1))) << logText();
  EXPECT_EQ(frontend.getConfig(0, 1), std::vector<uint8_t>{0x5a});
  EXPECT_THROW(frontend.getConfig(4, 8), Error);  // beyond the 8-byte space: empty reply
  EXPECT_THROW(frontend.setConfig(3, std::span<const uint8_t>(&key, 1)), Error);  // read-only
  frontend.setStatus(0x0f);
  EXPECT_EQ(frontend.getStatus(), 0x0f);
  EXPECT_EQ(device_->lastStatus, 0x0f);
}

TEST_F(BackendTest, ProcessesDirectChainedAndIndirectRequests) {
  Frontend frontend = connect();
  negotiate(frontend);
  TestRing ring(guest_, 16);
  setUpQueue(frontend, ring, kick_.get(), call_.get());
  EXPECT_EQ(device_->started, 1);

  // A direct readable buffer and a writable one, chained.
  uint64_t in = guest_.put({1, 2, 3});
  uint64_t out = guest_.allocate(3);
  ring.setDescriptor(0, in, 3, kDescFlagNext, 1);
  ring.setDescriptor(1, out, 3, kDescFlagWrite);
  // An indirect table: two readable buffers and a writable one.
  uint64_t table = guest_.allocate(3 * 16);
  uint64_t in2a = guest_.put({0x10, 0x20});
  uint64_t in2b = guest_.put({0x30});
  uint64_t out2 = guest_.allocate(3);
  ring.setIndirect(table, 0, in2a, 2, kDescFlagNext, 1);
  ring.setIndirect(table, 1, in2b, 1, kDescFlagNext, 2);
  ring.setIndirect(table, 2, out2, 3, kDescFlagWrite);
  ring.setDescriptor(5, table, 48, kDescFlagIndirect);
  ring.publish(0);
  ring.publish(5);
  kick(kick_.get());
  ASSERT_TRUE(waitReadable(call_.get())) << "no interrupt: " << logText();
  drain(call_.get());

  EXPECT_EQ(ring.usedIndex(), 2);
  EXPECT_EQ(ring.usedElement(0), std::make_pair(0u, 3u));
  EXPECT_EQ(ring.usedElement(1), std::make_pair(5u, 3u));
  EXPECT_EQ(guest_.get(out, 3), (std::vector<uint8_t>{0xfe, 0xfd, 0xfc}));
  EXPECT_EQ(guest_.get(out2, 3), (std::vector<uint8_t>{0xef, 0xdf, 0xcf}));
  EXPECT_EQ(frontend.getVringBase(0), 2u);
  EXPECT_EQ(device_->stopped, 1);
}

TEST_F(BackendTest, EventIdxSuppressionEndToEnd) {
  Frontend frontend = connect();
  negotiate(frontend);
  TestRing ring(guest_, 8);
  ring.setUsedEvent(0);
  setUpQueue(frontend, ring, kick_.get(), call_.get());
  uint64_t buffer = guest_.allocate(4);
  for (uint16_t i = 0; i < 8; ++i) ring.setDescriptor(i, buffer, 4, kDescFlagWrite);
  ring.publish(0);
  kick(kick_.get());
  ASSERT_TRUE(waitReadable(call_.get()));
  drain(call_.get());
  EXPECT_EQ(ring.availEvent(), 1) << "the back-end asks for a kick at the next entry";

  // The driver asks for an interrupt only after used index passes 3.
  ring.setUsedEvent(3);
  ring.publish(1);
  kick(kick_.get());
  // Wait until the request is used, then check that no interrupt came.
  for (int i = 0; i < 500 && ring.usedIndex() != 2; ++i) ::usleep(1000);
  EXPECT_EQ(ring.usedIndex(), 2);
  EXPECT_FALSE(waitReadable(call_.get(), std::chrono::milliseconds(50)));
  ring.publish(2);
  ring.publish(3);
  kick(kick_.get());
  ASSERT_TRUE(waitReadable(call_.get())) << "used index passed used_event: an interrupt is due";
  EXPECT_EQ(ring.usedIndex(), 4);
}

TEST_F(BackendTest, DisabledRingIsNotProcessedUntilEnabled) {
  Frontend frontend = connect();
  negotiate(frontend);
  TestRing ring(guest_, 8);
  setUpQueue(frontend, ring, kick_.get(), call_.get());
  frontend.setVringEnable(0, false);
  uint64_t out = guest_.allocate(4);
  ring.setDescriptor(0, out, 4, kDescFlagWrite);
  ring.publish(0);
  kick(kick_.get());
  EXPECT_FALSE(waitReadable(call_.get(), std::chrono::milliseconds(100)));
  EXPECT_EQ(ring.usedIndex(), 0);
  frontend.setVringEnable(0, true);
  ASSERT_TRUE(waitReadable(call_.get()));
  EXPECT_EQ(ring.usedIndex(), 1);
}

TEST_F(BackendTest, AddAndRemoveMemoryRegions) {
  Frontend frontend = connect();
  negotiate(frontend);
  TestGuestMemory second(1 << 16, 0x10000000);
  frontend.addMemRegion(guest_.spec());
  frontend.addMemRegion(second.spec());
  EXPECT_THROW(frontend.addMemRegion(second.spec()), Error);  // overlaps itself
  frontend.removeMemRegion(second.spec());
  EXPECT_THROW(frontend.removeMemRegion(second.spec()), Error);  // already gone
  TestRing ring(guest_, 8);
  frontend.setVringNum(0, 8);
  frontend.setVringAddr(0, ring.addresses());
  frontend.setVringCall(0, call_.get());
  frontend.setVringKick(0, kick_.get());
  frontend.setVringEnable(0, true);
  ring.setDescriptor(0, guest_.allocate(1), 1, kDescFlagWrite);
  ring.publish(0);
  kick(kick_.get());
  ASSERT_TRUE(waitReadable(call_.get()));
  EXPECT_EQ(ring.usedIndex(), 1);
}

TEST_F(BackendTest, ResetDeviceStopsQueuesAndKeepsServing) {
  Frontend frontend = connect();
  negotiate(frontend);
  TestRing ring(guest_, 8);
  setUpQueue(frontend, ring, kick_.get(), call_.get());
  frontend.resetDevice();
  EXPECT_EQ(device_->resets, 1);
  EXPECT_EQ(device_->stopped, 1);
  EXPECT_EQ(frontend.getStatus(), 0);
  // The queue has to be set up again; until then a kick does nothing.
  ring.setDescriptor(0, guest_.allocate(1), 1, kDescFlagWrite);
  ring.publish(0);
  kick(kick_.get());
  EXPECT_FALSE(waitReadable(call_.get(), std::chrono::milliseconds(50)));
  setUpQueue(frontend, ring, kick_.get(), call_.get());
  kick(kick_.get());
  ASSERT_TRUE(waitReadable(call_.get()));
  EXPECT_EQ(ring.usedIndex(), 1);
}

TEST_F(BackendTest, ReconnectResubmitsInflightRequests) {
  TestRing ring(guest_, 8);
  uint64_t out = guest_.allocate(4);
  for (uint16_t i = 0; i < 8; ++i) ring.setDescriptor(i, out, 4, kDescFlagWrite);
  InflightArea area;
  {
    Frontend frontend = connect();
    negotiate(frontend);
    area = frontend.getInflightFd(1, 8);
    ASSERT_TRUE(area.fd.valid());
    EXPECT_GE(area.mmapSize, inflightQueueBytes(8));
    frontend.setInflightFd(area);
    setUpQueue(frontend, ring, kick_.get(), call_.get());
    device_->hold = true;  // the device takes requests and "crashes" before finishing them
    ring.publish(3);
    ring.publish(6);
    kick(kick_.get());
    for (int i = 0; i < 500 && device_->heldCount < 2; ++i) ::usleep(1000);
  }
  // The front-end lost the back-end: it reconnects, hands the inflight area back and
  // restarts the ring from the used index, as QEMU does.
  for (int i = 0; i < 500 && device_->disconnects == 0; ++i) ::usleep(1000);
  device_->hold = false;
  Frontend frontend = connect();
  negotiate(frontend);
  frontend.setInflightFd(area);
  setUpQueue(frontend, ring, kick_.get(), call_.get(), ring.usedIndex());
  ASSERT_TRUE(waitReadable(call_.get())) << logText();
  EXPECT_EQ(ring.usedIndex(), 2);
  EXPECT_EQ(ring.usedElement(0).first, 3u);
  EXPECT_EQ(ring.usedElement(1).first, 6u);
  EXPECT_EQ(frontend.getVringBase(0), 2u);
}

TEST_F(BackendTest, BackendRequestChannelCarriesConfigChange) {
  Frontend frontend = connect();
  negotiate(frontend);
  BackendRequestChannel channel = frontend.openBackendRequestChannel();
  // The device announces a config change from the back-end's thread (here: on SET_STATUS).
  device_->statusHook = [this] { backend_->session()->notifyConfigChanged(); };
  frontend.setStatus(1);
  ASSERT_TRUE(waitReadable(channel.fd()));
  int changes = 0;
  EXPECT_TRUE(channel.handleOne({[&] { ++changes; }}));
  EXPECT_EQ(changes, 1);
}

// --- Malformed input. Each case: with REPLY_ACK negotiated and NEED_REPLY set the request is
// refused and the connection stays usable; without it the back-end drops the connection.

struct MalformedCase {
  const char* name;
  FrontendRequest request;
  std::function<std::vector<uint8_t>(BackendTest*)> payload;
  int fdCount;  // eventfds, or -1 for one memfd per region (memory cases)
  const char* logFragment;
};

class MalformedTest : public BackendTest, public ::testing::WithParamInterface<int> {};

std::vector<uint8_t> memTable(std::vector<MemoryRegion> regions) {
  std::vector<uint8_t> payload(sizeof(MemoryTableHeader) + regions.size() * sizeof(MemoryRegion));
  MemoryTableHeader header{static_cast<uint32_t>(regions.size()), 0};
  std::memcpy(payload.data(), &header, sizeof(header));
  std::memcpy(payload.data() + sizeof(header), regions.data(), regions.size() * sizeof(MemoryRegion));
  return payload;
}

const std::vector<MalformedCase>& malformedCases() {
  static const std::vector<MalformedCase> cases = {
      {"short payload", FrontendRequest::kSetFeatures, [](BackendTest*) { return std::vector<uint8_t>(4); }, 0,
       "payload is 4 bytes, must be 8"},
      {"long payload", FrontendRequest::kSetVringNum, [](BackendTest*) { return std::vector<uint8_t>(12); }, 0,
       "must be 8"},
      {"bad queue index", FrontendRequest::kSetVringNum, [](BackendTest*) { return bytes(VringState{7, 8}); }, 0,
       "queue index 7 is out of range"},
      {"bad queue index on kick", FrontendRequest::kSetVringCall, [](BackendTest*) { return bytes(uint64_t{200}); }, 1,
       "queue index 200 is out of range"},
      {"queue size not a power of two", FrontendRequest::kSetVringNum,
       [](BackendTest*) { return bytes(VringState{0, 100}); }, 0, "not a power of two"},
      {"queue size above the device's", FrontendRequest::kSetVringNum,
       [](BackendTest*) { return bytes(VringState{0, 1024}); }, 0, "exceeds the device's 256"},
      {"missing fd", FrontendRequest::kSetVringKick, [](BackendTest*) { return bytes(uint64_t{0}); }, 0,
       "0 file descriptors with the no-fd flag clear"},
      {"extra fd", FrontendRequest::kSetVringEnable, [](BackendTest*) { return bytes(VringState{0, 1}); }, 2,
       "came with 2 file descriptors, must be 0"},
      {"fd count not matching regions", FrontendRequest::kSetMemTable,
       [](BackendTest*) { return memTable({{0, 0x1000, 0x10000, 0}}); }, 3, "need 1 file descriptors, got 3"},
      {"overlapping regions", FrontendRequest::kSetMemTable,
       [](BackendTest*) { return memTable({{0, 0x2000, 0x10000, 0}, {0x1000, 0x1000, 0x40000, 0}}); }, -1,
       "overlaps"},
      {"region wraparound", FrontendRequest::kSetMemTable,
       [](BackendTest*) { return memTable({{~0ull - 0xfff, 0x2000, 0x10000, 0}}); }, -1, "wraps around"},
      {"zero-size region", FrontendRequest::kSetMemTable,
       [](BackendTest*) { return memTable({{0, 0, 0x10000, 0}}); }, -1, "zero size"},
      {"vring addresses outside memory", FrontendRequest::kSetVringAddr,
       [](BackendTest*) { return bytes(VringAddress{0, 0, 0xdead0000, 0xdead1000, 0xdead2000, 0}); }, 0,
       "outside guest memory"},
      {"unknown request", static_cast<FrontendRequest>(99), [](BackendTest*) { return std::vector<uint8_t>(); }, 0,
       "unknown front-end request 99"},
      {"unsupported request", FrontendRequest::kSetLogBase, [](BackendTest*) { return bytes(uint64_t{0}); }, 0,
       "not supported"},
      {"config beyond the space", FrontendRequest::kSetConfig,
       [](BackendTest*) {
         std::vector<uint8_t> p(sizeof(ConfigHeader) + 4);
         ConfigHeader h{6, 4, 0};
         std::memcpy(p.data(), &h, sizeof(h));
         return p;
       },
       0, "outside the 8-byte config space"},
      {"inflight area of a bogus size", FrontendRequest::kSetInflightFd,
       [](BackendTest*) { return bytes(InflightDescription{16, 0, 1, 8, 0}); }, -1, "needs"},
  };
  return cases;
}

// Sends case `c` on a raw channel, with memfds or eventfds as it asks.
void sendCase(Channel& channel, const MalformedCase& c, BackendTest* test, uint32_t flags) {
  std::vector<uint8_t> payload = c.payload(test);
  std::vector<UniqueFd> owned;
  int count = c.fdCount;
  if (count < 0) {
    count = c.request == FrontendRequest::kSetMemTable
                ? static_cast<int>(reinterpret_cast<MemoryTableHeader*>(payload.data())->regionCount)
                : 1;
    for (int i = 0; i < count; ++i) {
      owned.emplace_back(::memfd_create("case", MFD_CLOEXEC));
      EXPECT_EQ(::ftruncate(owned.back().get(), 0x10000), 0);
    }
  } else {
    for (int i = 0; i < count; ++i) owned.emplace_back(::eventfd(0, EFD_CLOEXEC));
  }
  std::vector<int> fds;
  for (auto& fd : owned) fds.push_back(fd.get());
  MessageHeader header{static_cast<uint32_t>(c.request), kVersion | flags,
                       static_cast<uint32_t>(payload.size())};
  channel.send(header, payload, fds);
}

TEST_P(MalformedTest, RefusedWithAnAckWhenOneWasAsked) {
  const MalformedCase& c = malformedCases()[GetParam()];
  SCOPED_TRACE(c.name);
  {
  Frontend frontend = connect();
  negotiate(frontend);
  auto spec = guest_.spec();
  frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
  frontend.setVringNum(0, 8);

  // Reuse the front-end's socket for the raw message.
  Channel raw(UniqueFd(::dup(frontend.socketFd())), "backend");
  raw.setReceiveTimeout(kTimeout);
  sendCase(raw, c, this, kNeedReplyFlag);
  Message reply = raw.receive();
  EXPECT_EQ(reply.header.request, static_cast<uint32_t>(c.request));
  EXPECT_NE(reply.header.flags & kReplyFlag, 0u);
  ASSERT_EQ(reply.payload.size(), 8u);
  EXPECT_NE(reply.payloadAs<uint64_t>(), 0u) << "the malformed request was acked as a success";
  EXPECT_NE(logText().find(c.logFragment), std::string::npos) << logText();
  // Same connection, still in step.
  EXPECT_EQ(frontend.getQueueNum(), 1u);
  }
  expectServesANewConnection();
}

TEST_P(MalformedTest, DropsTheConnectionWithoutAnAck) {
  const MalformedCase& c = malformedCases()[GetParam()];
  SCOPED_TRACE(c.name);
  Frontend frontend = connect();
  negotiate(frontend, /*replyAck=*/false);
  auto spec = guest_.spec();
  frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
  frontend.setVringNum(0, 8);
  Channel raw(UniqueFd(::dup(frontend.socketFd())), "backend");
  raw.setReceiveTimeout(kTimeout);
  sendCase(raw, c, this, 0);
  EXPECT_THROW(raw.receive(), ChannelClosed);
  EXPECT_NE(logText().find("dropping the front-end connection"), std::string::npos) << logText();
  EXPECT_NE(logText().find(c.logFragment), std::string::npos) << logText();
  try {
    frontend.getFeatures();
    FAIL() << "the dropped connection still answered";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("disconnected during GET_FEATURES"), std::string::npos)
        << e.what();
  }
  expectServesANewConnection();
}

INSTANTIATE_TEST_SUITE_P(Cases, MalformedTest,
                         ::testing::Range(0, static_cast<int>(malformedCases().size())),
                         [](const ::testing::TestParamInfo<int>& param) {
                           std::string name = malformedCases()[param.param].name;
                           for (auto& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

TEST_F(BackendTest, GarbageBytesDropTheConnectionAndServingGoesOn) {
  {
    UniqueFd socket = connectUnixSocket(path_);
    const char garbage[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    ASSERT_GT(::send(socket.get(), garbage, sizeof(garbage), MSG_NOSIGNAL), 0);
    char byte;
    ssize_t n = ::recv(socket.get(), &byte, 1, 0);
    // EOF, or a reset because the garbage was never read.
    EXPECT_TRUE(n == 0 || (n < 0 && errno == ECONNRESET)) << "the back-end did not drop the connection";
  }
  expectServesANewConnection();
}

TEST(BackendStallTest, AFrontendStuckMidMessageIsDropped) {
  XorDevice device;
  auto log = std::make_shared<spdlog::logger>("vhost-test", std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16));
  VhostUserBackend backend(device, *log, BackendOptions{std::chrono::milliseconds(100)});
  auto [ours, theirs] = makeSocketPair();
  std::thread thread([&, fd = theirs.release()] { backend.serveFd(UniqueFd(fd)); });
  MessageHeader header{static_cast<uint32_t>(FrontendRequest::kSetFeatures), kVersion, 8};
  ASSERT_EQ(::send(ours.get(), &header, sizeof(header), MSG_NOSIGNAL), 12);
  // The payload never comes; the back-end gives up instead of hanging.
  char byte;
  EXPECT_EQ(::recv(ours.get(), &byte, 1, 0), 0);
  thread.join();
  EXPECT_EQ(device.disconnects, 1);
}

TEST_F(BackendTest, TruncatedMessageAndAbruptDisconnect) {
  {
    UniqueFd socket = connectUnixSocket(path_);
    MessageHeader header{static_cast<uint32_t>(FrontendRequest::kSetFeatures), kVersion, 8};
    ASSERT_EQ(::send(socket.get(), &header, sizeof(header), MSG_NOSIGNAL), 12);
  }  // closed with the payload missing
  expectServesANewConnection();
  EXPECT_GE(device_->disconnects, 1);
}

// Hostile drivers: the queue breaks, the error eventfd fires, the connection goes on.
class HostileDriverTest : public BackendTest {
 protected:
  void run(const std::function<void(TestRing&)>& poison, const std::string& fragment) {
    Frontend frontend = connect();
    negotiate(frontend);
    TestRing ring(guest_, 8);
    setUpQueue(frontend, ring, kick_.get(), call_.get(), 0, err_.get());
    poison(ring);
    kick(kick_.get());
    ASSERT_TRUE(waitReadable(err_.get())) << "the error eventfd was not signalled: " << logText();
    EXPECT_NE(logText().find(fragment), std::string::npos) << logText();
    EXPECT_EQ(ring.usedIndex(), 0);
    // The connection is fine; the front-end can stop and restart the queue.
    EXPECT_EQ(frontend.getVringBase(0), 0u);
    frontend = connect();  // the old one closes; one front-end at a time
    EXPECT_NE(frontend.getFeatures(), 0u);
  }
};

TEST_F(HostileDriverTest, DescriptorLoop) {
  run(
      [&](TestRing& ring) {
        uint64_t b = guest_.allocate(4);
        ring.setDescriptor(0, b, 4, kDescFlagNext, 1);
        ring.setDescriptor(1, b, 4, kDescFlagNext, 2);
        ring.setDescriptor(2, b, 4, kDescFlagNext, 0);
        ring.publish(0);
      },
      "loops");
}

TEST_F(HostileDriverTest, OutOfRangeDescriptorIndex) {
  run([](TestRing& ring) { ring.publish(9); }, "head descriptor index 9");
}

TEST_F(HostileDriverTest, IndirectTableTooBig) {
  run(
      [&](TestRing& ring) {
        ring.setDescriptor(0, guest_.allocate(16 * 2048), 16 * 2048, kDescFlagIndirect);
        ring.publish(0);
      },
      "2048 entries, at most 1024");
}

TEST_F(HostileDriverTest, BufferOutsideGuestMemory) {
  run(
      [](TestRing& ring) {
        ring.setDescriptor(0, 0x1000, 4, kDescFlagWrite);
        ring.publish(0);
      },
      "outside guest memory");
}

// Postcopy's order, driven on a session directly: LISTEN needs ADVISE first, ADVISE answers
// with a userfaultfd, the memory table after LISTEN is answered with this process's own
// addresses, and anything but the front-end's go-ahead after it drops the connection.
TEST(BackendPostcopyTest, OrderIsCheckedAndOnlyTheGoAheadMayFollowTheTable) {
  XorDevice device(1);
  spdlog::logger log("postcopy-test");
  BackendSession session(device, log);
  EXPECT_FALSE(hasBit(session.offeredProtocolFeatures(), protocol::kPagefault));
  // A stand-in for a userfaultfd: nothing here registers memory.
  session.enablePostcopy([] { return UniqueFd(::eventfd(0, EFD_CLOEXEC)); });
  ASSERT_TRUE(hasBit(session.offeredProtocolFeatures(), protocol::kPagefault));
  auto make = [](FrontendRequest request, std::vector<uint8_t> payload, uint32_t flags = 0) {
    return Message::make(static_cast<uint32_t>(request), flags, payload);
  };
  uint64_t features = bit(protocol::kPagefault) | bit(protocol::kReplyAck);
  EXPECT_FALSE(session.handle(make(FrontendRequest::kSetProtocolFeatures, bytes(features))));

  auto early = session.handle(make(FrontendRequest::kPostcopyListen, {}, kNeedReplyFlag));
  ASSERT_TRUE(early);
  EXPECT_EQ(early->payloadAs<uint64_t>(), 1u) << "LISTEN before ADVISE must be refused";

  auto advise = session.handle(make(FrontendRequest::kPostcopyAdvise, {}));
  ASSERT_TRUE(advise);
  EXPECT_EQ(advise->payload.size(), 0u);
  ASSERT_EQ(advise->fds.size(), 1u);
  auto listen = session.handle(make(FrontendRequest::kPostcopyListen, {}, kNeedReplyFlag));
  ASSERT_TRUE(listen);
  EXPECT_EQ(listen->payloadAs<uint64_t>(), 0u);

  Message table = make(FrontendRequest::kSetMemTable, memTable({{0, 0x10000, 0x7000000, 0}}));
  table.fds.emplace_back(::memfd_create("postcopy", MFD_CLOEXEC));
  ASSERT_EQ(::ftruncate(table.fds.back().get(), 0x10000), 0);
  auto answer = session.handle(std::move(table));
  ASSERT_TRUE(answer);
  ASSERT_EQ(answer->payload.size(), sizeof(MemoryTableHeader) + sizeof(MemoryRegion));
  MemoryRegion mapped{};
  std::memcpy(&mapped, answer->payload.data() + sizeof(MemoryTableHeader), sizeof(mapped));
  EXPECT_EQ(mapped.guestAddress, 0u);
  EXPECT_EQ(mapped.size, 0x10000u);
  EXPECT_NE(mapped.userAddress, 0x7000000u) << "the answer carries the back-end's own address";
  EXPECT_EQ(mapped.userAddress % 4096, 0u);
  EXPECT_FALSE(session.postcopyRegistered());

  try {
    session.handle(make(FrontendRequest::kGetQueueNum, {}));
    ADD_FAILURE() << "a request in place of the go-ahead was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("postcopy acknowledgement"), std::string::npos) << e.what();
  }
}

TEST(BackendConventionsTest, CapabilitiesJson) {
  EXPECT_EQ(capabilitiesJson("blk", {"read-only", "blk-file"}),
            "{\n  \"type\": \"blk\",\n  \"features\": [\n    \"read-only\",\n    \"blk-file\"\n  ]\n}\n");
  EXPECT_EQ(capabilitiesJson("fs", {}), "{\n  \"type\": \"fs\",\n  \"features\": []\n}\n");
}

TEST(BackendConventionsTest, ServeFdAcceptsAConnectedSocket) {
  XorDevice device;
  auto log = std::make_shared<spdlog::logger>("vhost-test", std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(16));
  VhostUserBackend backend(device, *log);
  auto [ours, theirs] = makeSocketPair();
  std::thread thread([&, fd = theirs.release()] { backend.serveFd(UniqueFd(fd)); });
  {
    Frontend frontend(std::move(ours), "socketpair", FrontendOptions{kTimeout});
    EXPECT_NE(frontend.getFeatures(), 0u);
  }
  thread.join();  // returns by itself once the only front-end is gone
  EXPECT_EQ(backend.connectionsServed(), 1u);
  EXPECT_EQ(device.disconnects, 1);
}

// A device that completes requests later, from its event fd, as an io_uring device does.
class AsyncXorDevice : public XorDevice {
 public:
  AsyncXorDevice() { eventFd_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }
  int deviceEventFd() const override { return eventFd_.get(); }
  void processQueue(Virtqueue& queue) override {
    while (auto request = queue.pop()) {
      pending_.push_back({&queue, std::move(*request)});
      ++popped;
    }
  }
  // The test plays the I/O finishing by writing the event fd.
  void finishAll() {
    uint64_t one = 1;
    ASSERT_EQ(::write(eventFd_.get(), &one, 8), 8);
  }
  void onDeviceEvent() override {
    uint64_t count;
    ssize_t n = ::read(eventFd_.get(), &count, 8);
    (void)n;
    completeAll();
  }
  void drain() override {
    drainedWithPending += static_cast<int>(pending_.size());
    completeAll();
  }
  void onQueueStopped(Virtqueue& queue) override {
    std::erase_if(pending_, [&](Pending& p) {
      if (p.queue != &queue) return false;
      ++stoppedWithPending;
      complete(p);
      return true;
    });
  }

  std::atomic<int> popped{0}, completed{0}, drainedWithPending{0}, stoppedWithPending{0};

 private:
  struct Pending {
    Virtqueue* queue;
    VirtqueueRequest request;
  };
  void complete(Pending& p) {
    std::vector<uint8_t> data(p.request.readableBytes());
    p.request.read(0, data);
    for (auto& b : data) b ^= 0xff;
    p.queue->complete(p.request, static_cast<uint32_t>(p.request.write(0, data)));
    ++completed;
  }
  void completeAll() {
    for (auto& p : pending_) complete(p);
    pending_.clear();
  }
  UniqueFd eventFd_;
  std::vector<Pending> pending_;  // loop thread only
};

bool waitFor(const std::function<bool()>& condition) {
  for (int i = 0; i < 500; ++i) {
    if (condition()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return false;
}

TEST(BackendAsyncTest, CompletesFromTheDeviceEventAndDrainsBeforeMemoryChangesAndStops) {
  AsyncXorDevice device;
  auto log = std::make_shared<spdlog::logger>("vhost-test", std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(64));
  VhostUserBackend backend(device, *log);
  auto [ours, theirs] = makeSocketPair();
  std::thread thread([&, fd = theirs.release()] { backend.serveFd(UniqueFd(fd)); });
  TestGuestMemory guest(1 << 20, 0x80000000);
  UniqueFd kickFd(::eventfd(0, EFD_CLOEXEC)), callFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  {
    Frontend frontend(std::move(ours), "socketpair", FrontendOptions{kTimeout});
    frontend.setFeatures(frontend.getFeatures());
    frontend.setProtocolFeatures(frontend.getProtocolFeatures());
    frontend.setOwner();
    TestRing ring(guest, 16);
    auto spec = guest.spec();
    frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
    frontend.setVringNum(0, ring.size());
    frontend.setVringBase(0, 0);
    frontend.setVringAddr(0, ring.addresses());
    frontend.setVringCall(0, callFd.get());
    frontend.setVringKick(0, kickFd.get());
    frontend.setVringEnable(0, true);

    auto submit = [&](uint16_t head, uint8_t value) {
      uint64_t in = guest.put({value});
      uint64_t out = guest.allocate(1);
      ring.setDescriptor(head, in, 1, kDescFlagNext, static_cast<uint16_t>(head + 1));
      ring.setDescriptor(static_cast<uint16_t>(head + 1), out, 1, kDescFlagWrite);
      ring.publish(head);
      kick(kickFd.get());
      return out;
    };

    // Taken by processQueue, not completed: nothing on the used ring, no interrupt.
    uint64_t out = submit(0, 0x0f);
    ASSERT_TRUE(waitFor([&] { return device.popped == 1; }));
    EXPECT_EQ(ring.usedIndex(), 0);
    EXPECT_FALSE(waitReadable(callFd.get(), std::chrono::milliseconds(50)));
    // The device's event completes it from the loop, and the library signals the driver.
    device.finishAll();
    ASSERT_TRUE(waitReadable(callFd.get()));
    drain(callFd.get());
    EXPECT_EQ(ring.usedIndex(), 1);
    EXPECT_EQ(guest.get(out, 1), std::vector<uint8_t>{0xf0});

    // A new memory table waits for the request in flight first.
    ring.setUsedEvent(1);  // EVENT_IDX: interrupt once the next entry is used
    out = submit(2, 0x01);
    ASSERT_TRUE(waitFor([&] { return device.popped == 2; }));
    frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
    EXPECT_EQ(device.drainedWithPending, 1);
    EXPECT_EQ(ring.usedIndex(), 2);
    EXPECT_EQ(guest.get(out, 1), std::vector<uint8_t>{0xfe});
    EXPECT_TRUE(waitReadable(callFd.get()));
    drain(callFd.get());

    // So does GET_VRING_BASE, and the base it returns counts the finished request.
    frontend.setVringKick(0, kickFd.get());  // restart after the table change
    out = submit(4, 0x02);
    ASSERT_TRUE(waitFor([&] { return device.popped == 3; }));
    EXPECT_EQ(frontend.getVringBase(0), 3u);
    EXPECT_EQ(device.stoppedWithPending, 1);
    EXPECT_EQ(ring.usedIndex(), 3);
    EXPECT_EQ(guest.get(out, 1), std::vector<uint8_t>{0xfd});
  }
  thread.join();
  EXPECT_EQ(device.completed, 3);
}

}  // namespace
}  // namespace clonevm::ipc::vhost
