// VhostUserBackend against our own vhost-user back-end library over a unix socket, carried by
// the real virtio-pci transport and driven the way Linux's virtio_pci_modern driver does it
// (the test driver and fake KVM from virtio/testing). The guest's rings live in a real
// GuestMemory memfd that the back-end maps from SET_MEM_TABLE.

#include "vmm-core/virtio/vhost_user_backend.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/sinks/ringbuffer_sink.h>
#include <spdlog/spdlog.h>

#include "ipc/vhost-user/backend.h"
#include "ipc/vhost-user/channel.h"
#include "common/userfaultfd.h"
#include "vmm-core/memory/lazy_fill.h"
#include "vmm-core/virtio/testing/fake_device_events.h"
#include "vmm-core/virtio/testing/virtio_pci_test_driver.h"
#include "vmm-core/virtio/virtio.h"
#include "vmm-core/virtio/virtio_pci_device.h"

namespace clonevm::vmm {
namespace {

namespace vhost = ipc::vhost;
using virtio_testing::FakeDeviceEvents;
using virtio_testing::VirtioPciTestDriver;

constexpr auto kTimeout = std::chrono::milliseconds(5000);

bool waitReadable(int fd, std::chrono::milliseconds timeout = kTimeout) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, static_cast<int>(timeout.count())) == 1;
}

// A toy block-like device on our back-end library: type-agnostic request processing (each
// readable byte XOR 0x5a goes to the writable buffer), a virtio-blk shaped config space whose
// capacity the test can change, and as many queues as asked.
class ToyDevice : public vhost::VhostUserDevice {
 public:
  ToyDevice(uint16_t queues, bool withConfig, bool withMq)
      : queues_(queues), withConfig_(withConfig), withMq_(withMq) {
    setCapacity(2048);
    config_[vhost_user_config::kBlkNumQueuesOffset] = static_cast<uint8_t>(queues);
  }
  void setCapacity(uint64_t sectors) { std::memcpy(config_, &sectors, sizeof(sectors)); }

  uint64_t features() const override {
    return vhost::kLibraryTransportFeatures | vhost::bit(9 /* FLUSH */) |
           vhost::bit(vhost_user_config::kBlkFeatureMq);
  }
  uint64_t protocolFeatures() const override {
    uint64_t all = vhost::kLibraryProtocolFeatures;
    if (!withConfig_) all &= ~vhost::bit(vhost::protocol::kConfig);
    if (!withMq_) all &= ~vhost::bit(vhost::protocol::kMq);
    return all;
  }
  uint16_t queueCount() const override { return queues_; }
  uint32_t maxQueueSize() const override { return 256; }
  size_t configSize() const override { return withConfig_ ? sizeof(config_) : 0; }
  void readConfig(uint32_t offset, std::span<uint8_t> out) const override {
    std::memcpy(out.data(), config_ + offset, out.size());
  }
  void writeConfig(uint32_t offset, std::span<const uint8_t> data, vhost::ConfigFlags) override {
    require(offset == 32 && data.size() == 1, "only writeback is writable");
    config_[32] = data[0];
  }
  void onQueueStarted(vhost::Virtqueue&) override { ++started; }
  void onQueueStopped(vhost::Virtqueue&) override { ++stopped; }
  void onReset() override { ++resets; }
  void processQueue(vhost::Virtqueue& queue) override {
    while (auto request = queue.pop()) {
      std::vector<uint8_t> bytes(request->readableBytes());
      request->read(0, bytes);
      for (auto& b : bytes) b ^= 0x5a;
      size_t written = request->write(0, bytes);
      queue.complete(*request, static_cast<uint32_t>(written));
      ++processed;
      if (afterRequest) afterRequest();
    }
  }

  std::atomic<int> started{0}, stopped{0}, resets{0}, processed{0};
  std::function<void()> afterRequest;  // back-end loop thread

 private:
  uint16_t queues_;
  bool withConfig_;
  bool withMq_;
  uint8_t config_[60] = {};
};

// One split ring in guest memory, written the way a driver does.
struct GuestRing {
  const GuestMemory& memory;
  uint64_t desc, avail, used;
  uint16_t size;
  uint16_t next = 0;

  void init() {
    std::vector<uint8_t> zero(0x3000, 0);
    memory.write(desc, zero);
  }
  // One request: `out` readable bytes at `outAddr`, `inLength` writable bytes at `inAddr`.
  void submit(uint64_t outAddr, std::span<const uint8_t> out, uint64_t inAddr, uint32_t inLength) {
    memory.write(outAddr, out);
    submitChain(outAddr, static_cast<uint32_t>(out.size()), inAddr, inLength);
  }
  // The same with readable bytes already in guest memory (the driver does not touch them).
  void submitChain(uint64_t outAddr, uint32_t outLength, uint64_t inAddr, uint32_t inLength) {
    struct Desc {
      uint64_t addr;
      uint32_t len;
      uint16_t flags;
      uint16_t next;
    };
    uint16_t head = next;
    memory.writeObject(desc + 16 * head, Desc{outAddr, outLength, 1, static_cast<uint16_t>(head + 1)});
    memory.writeObject(desc + 16 * (head + 1), Desc{inAddr, inLength, 2, 0});
    next = static_cast<uint16_t>(next + 2);
    uint16_t index = memory.readObject<uint16_t>(avail + 2);
    memory.writeObject<uint16_t>(avail + 4 + 2 * (index % size), head);
    std::atomic_thread_fence(std::memory_order_release);
    memory.writeObject<uint16_t>(avail + 2, static_cast<uint16_t>(index + 1));
  }
  uint16_t usedIndex() const { return memory.readObject<uint16_t>(used + 2); }
};

class VhostUserBackendTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sink_ = std::make_shared<spdlog::sinks::ringbuffer_sink_mt>(512);
    log_ = std::make_shared<spdlog::logger>("vhost-user-backend-test", sink_);
    log_->set_level(spdlog::level::debug);
  }
  void TearDown() override {
    driver_.detach();
    transport_.reset();
    backend_.reset();
    stopServer();
  }

  void startServer(uint16_t queues, bool withConfig = true, bool withMq = true,
                   vhost::BackendOptions options = {}) {
    static std::atomic<int> counter{0};
    device_ = std::make_unique<ToyDevice>(queues, withConfig, withMq);
    server_ = std::make_unique<vhost::VhostUserBackend>(*device_, *log_, options);
    path_ = fmt::format("{}/vhost-user-backend-test-{}-{}.sock", ::testing::TempDir(), ::getpid(),
                        counter++);
    UniqueFd listener = vhost::listenUnixSocket(path_);
    thread_ = std::thread([this, fd = listener.release()] { server_->serveFd(UniqueFd(fd)); });
  }
  void stopServer() {
    if (!server_) return;
    server_->stop();
    thread_.join();
    ::unlink(path_.c_str());
    server_.reset();
  }

  VhostUserDeviceConfig blkConfig(uint16_t queues = 1) {
    return {.kind = VhostUserDeviceKind::kBlock, .socketPath = path_, .queues = queues,
            .replyTimeout = kTimeout};
  }

  // connect() + transport + driver attached with BAR 0 programmed.
  void attach(const VhostUserDeviceConfig& config, LazyMemoryFill* lazyFill = nullptr) {
    backend_ = VhostUserBackend::connect(config, memory_, *log_, lazyFill);
    transport_ = std::make_shared<VirtioPciDevice>(backend_, memory_, events_, events_, *log_);
    driver_.attach(transport_, *log_);
    driver_.programBar(0x100000000ull);
    backend_->startWatching("00:01.0");
  }

  // Linux's probe: negotiate everything offered, MSI-X, queue 0 at fixed addresses, DRIVER_OK.
  GuestRing bringUp() {
    EXPECT_TRUE(driver_.negotiate());
    driver_.enableMsix(2);
    GuestRing ring{memory_, 0x100000, 0x101000, 0x102000, 64};
    ring.init();
    driver_.setupQueue(0, {64, ring.desc, ring.avail, ring.used, 1});
    driver_.addStatus(virtio::kStatusDriverOk);
    return ring;
  }

  uint64_t configU64(uint32_t offset) {
    uint64_t low = driver_.mmioRead(transport_->layout().device + offset, 4);
    uint64_t high = driver_.mmioRead(transport_->layout().device + offset + 4, 4);
    return low | high << 32;
  }

  std::string logText() {
    std::string text;
    for (const auto& line : sink_->last_formatted()) text += line;
    return text;
  }

  GuestMemory memory_ = GuestMemory::create(32ull << 20);
  FakeDeviceEvents events_;
  std::shared_ptr<spdlog::sinks::ringbuffer_sink_mt> sink_;
  std::shared_ptr<spdlog::logger> log_;
  std::unique_ptr<ToyDevice> device_;
  std::unique_ptr<vhost::VhostUserBackend> server_;
  std::thread thread_;
  std::string path_;
  std::shared_ptr<VhostUserBackend> backend_;
  std::shared_ptr<VirtioPciDevice> transport_;
  VirtioPciTestDriver driver_;
};

TEST_F(VhostUserBackendTest, NegotiatesAndServesConfigFromTheBackend) {
  startServer(2);
  attach(blkConfig());
  EXPECT_EQ(backend_->deviceType(), virtio::kTypeBlock);
  EXPECT_EQ(backend_->numQueues(), 1);
  uint64_t offered = driver_.deviceFeatures();
  EXPECT_TRUE(offered & virtio::feature(virtio::kFeatureVersion1));
  EXPECT_TRUE(offered & (1ull << 9));                                     // FLUSH passes
  EXPECT_FALSE(offered & vhost::bit(vhost::feature::kProtocolFeatures));  // vhost-user's own
  EXPECT_FALSE(offered & vhost::bit(vhost_user_config::kBlkFeatureMq));   // one queue only
  EXPECT_TRUE(vhost::hasBit(backend_->protocolFeatures(), vhost::protocol::kReplyAck));
  EXPECT_TRUE(vhost::hasBit(backend_->protocolFeatures(), vhost::protocol::kConfig));
  EXPECT_FALSE(vhost::hasBit(backend_->protocolFeatures(), vhost::protocol::kInflightShmfd));
  EXPECT_EQ(transport_->layout().size, VirtioPciDevice::barSizeFor(*backend_));
  EXPECT_EQ(backend_->configSize(), vhost_user_config::kBlkConfigSize);
  EXPECT_EQ(configU64(0), 2048u);  // capacity from GET_CONFIG
  // num_queues is ours (1), not the back-end's (2).
  EXPECT_EQ(driver_.mmioRead(transport_->layout().device + 34, 2), 1u);
}

TEST_F(VhostUserBackendTest, RequestsFlowThroughKickAndCallEventfds) {
  startServer(1);
  attach(blkConfig());
  GuestRing ring = bringUp();
  ASSERT_EQ(driver_.status() & virtio::kStatusNeedsReset, 0) << logText();
  EXPECT_EQ(backend_->activations(), 1u);
  EXPECT_EQ(device_->started.load(), 1);

  const uint8_t out[4] = {1, 2, 3, 4};
  ring.submit(0x200000, out, 0x201000, 4);
  driver_.kick(0);  // the transport signals queue 0's kick eventfd, as KVM's ioeventfd would
  ASSERT_TRUE(waitReadable(transport_->callFd(0))) << logText();
  EXPECT_EQ(ring.usedIndex(), 1);
  uint8_t in[4];
  memory_.read(0x201000, in);
  EXPECT_EQ(in[0], 1 ^ 0x5a);
  EXPECT_EQ(in[3], 4 ^ 0x5a);

  // A driver reset stops the ring in the back-end (GET_VRING_BASE) and resets the device.
  driver_.setCommon(virtio_pci::kDeviceStatus, 0, 1);
  EXPECT_EQ(device_->stopped.load(), 1);
  EXPECT_EQ(device_->resets.load(), 1);
  // And the device comes up again.
  GuestRing again = bringUp();
  ASSERT_EQ(driver_.status() & virtio::kStatusNeedsReset, 0) << logText();
  again.submit(0x200000, out, 0x201000, 4);
  driver_.kick(0);
  ASSERT_TRUE(waitReadable(transport_->callFd(0))) << logText();
  EXPECT_EQ(again.usedIndex(), 1);
}

TEST_F(VhostUserBackendTest, MultiQueue) {
  startServer(2);
  attach(blkConfig(2));
  EXPECT_EQ(backend_->numQueues(), 2);
  EXPECT_TRUE(driver_.deviceFeatures() & vhost::bit(vhost_user_config::kBlkFeatureMq));
  EXPECT_EQ(driver_.mmioRead(transport_->layout().device + 34, 2), 2u);
  EXPECT_TRUE(driver_.negotiate());
  driver_.enableMsix(3);
  GuestRing q0{memory_, 0x100000, 0x101000, 0x102000, 64};
  GuestRing q1{memory_, 0x110000, 0x111000, 0x112000, 64};
  q0.init();
  q1.init();
  driver_.setupQueue(0, {64, q0.desc, q0.avail, q0.used, 1});
  driver_.setupQueue(1, {64, q1.desc, q1.avail, q1.used, 2});
  driver_.addStatus(virtio::kStatusDriverOk);
  const uint8_t out[2] = {7, 8};
  q1.submit(0x200000, out, 0x201000, 2);
  driver_.kick(1);
  ASSERT_TRUE(waitReadable(transport_->callFd(1))) << logText();
  EXPECT_EQ(q1.usedIndex(), 1);
  EXPECT_EQ(device_->started.load(), 2);
}

TEST_F(VhostUserBackendTest, RefusesMoreQueuesThanTheBackendServes) {
  startServer(2);
  try {
    VhostUserBackend::connect(blkConfig(3), memory_, *log_);
    FAIL() << "connected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("the back-end serves at most 2"), std::string::npos)
        << e.what();
    EXPECT_NE(std::string(e.what()).find("--vhost-user-blk " + path_), std::string::npos)
        << e.what();
  }
}

TEST_F(VhostUserBackendTest, BlockNeedsTheConfigProtocolFeature) {
  startServer(1, /*withConfig=*/false);
  try {
    VhostUserBackend::connect(blkConfig(), memory_, *log_);
    FAIL() << "connected";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("VHOST_USER_PROTOCOL_F_CONFIG"), std::string::npos)
        << e.what();
  }
}

TEST_F(VhostUserBackendTest, MissingSocketIsOneLine) {
  VhostUserDeviceConfig config = blkConfig();
  config.socketPath = ::testing::TempDir() + "/no-such-vhost.sock";
  try {
    VhostUserBackend::connect(config, memory_, *log_);
    FAIL() << "connected";
  } catch (const Error& e) {
    std::string what = e.what();
    EXPECT_NE(what.find("--vhost-user-blk " + config.socketPath), std::string::npos) << what;
    EXPECT_NE(what.find("No such file or directory"), std::string::npos) << what;
    EXPECT_EQ(what.find('\n'), std::string::npos) << what;
  }
}

TEST_F(VhostUserBackendTest, FsConfigIsBuiltLocally) {
  startServer(3, /*withConfig=*/false);
  VhostUserDeviceConfig config = parseVhostUserFsOption(path_ + ":myfs,queues=2");
  config.replyTimeout = kTimeout;
  attach(config);
  EXPECT_EQ(backend_->deviceType(), virtio::kTypeFs);
  EXPECT_EQ(backend_->numQueues(), 3);  // hiprio + 2 request queues
  EXPECT_EQ(backend_->configSize(), vhost_user_config::kFsConfigSize);
  uint8_t tag[36];
  backend_->readConfig(0, tag);
  EXPECT_EQ(std::string(reinterpret_cast<char*>(tag), 4), "myfs");
  EXPECT_EQ(tag[4], 0);
  EXPECT_EQ(driver_.mmioRead(transport_->layout().device + 36, 4), 2u);
}

TEST_F(VhostUserBackendTest, ConfigChangeMessageRefreshesTheCacheAndInterrupts) {
  startServer(1);
  attach(blkConfig());
  ASSERT_TRUE(vhost::hasBit(backend_->protocolFeatures(), vhost::protocol::kBackendReq));
  GuestRing ring = bringUp();
  // The back-end grows the disk while serving a request and tells the front-end.
  device_->afterRequest = [this] {
    device_->setCapacity(4096);
    server_->session()->notifyConfigChanged();
  };
  uint8_t generation = static_cast<uint8_t>(driver_.common(virtio_pci::kConfigGeneration, 1));
  const uint8_t out[1] = {0};
  ring.submit(0x200000, out, 0x201000, 1);
  driver_.kick(0);
  ASSERT_TRUE(waitReadable(transport_->configFd())) << logText();
  EXPECT_NE(driver_.common(virtio_pci::kConfigGeneration, 1), generation);
  EXPECT_EQ(configU64(0), 4096u);
}

TEST_F(VhostUserBackendTest, BackendDeathIsLoggedAndTheDeviceNeedsReset) {
  startServer(1);
  attach(blkConfig());
  std::atomic<bool> told{false};
  // startWatching was called by attach(); a second watcher is refused.
  EXPECT_THROW(backend_->startWatching("again"), Error);
  GuestRing ring = bringUp();
  (void)ring;
  stopServer();  // the back-end process goes away
  for (int i = 0; i < 500 && backend_->connected(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  told = !backend_->connected();
  ASSERT_TRUE(told.load());
  // The watcher marks the back-end disconnected first and logs it right after.
  std::string disconnected =
      "vhost-user-blk backend " + path_ + " disconnected; device 00:01.0 is no longer served";
  for (int i = 0; i < 500 && logText().find(disconnected) == std::string::npos; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_NE(logText().find(disconnected), std::string::npos) << logText();
  // The cache still answers config reads; a reset is local; a new activation is refused and
  // the transport marks the device as needing a reset.
  EXPECT_EQ(configU64(0), 2048u);
  driver_.setCommon(virtio_pci::kDeviceStatus, 0, 1);
  EXPECT_TRUE(driver_.negotiate());
  driver_.enableMsix(2);
  GuestRing again{memory_, 0x100000, 0x101000, 0x102000, 64};
  driver_.setupQueue(0, {64, again.desc, again.avail, again.used, 1});
  driver_.addStatus(virtio::kStatusDriverOk);
  EXPECT_TRUE(driver_.status() & virtio::kStatusNeedsReset);
}

bool waitUsed(const GuestRing& ring, uint16_t index) {
  for (int i = 0; i < 500 && ring.usedIndex() != index; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return ring.usedIndex() == index;
}

void kickByHand(int kickFd) {
  uint64_t one = 1;
  ASSERT_EQ(::write(kickFd, &one, sizeof(one)), 8);
}

TEST_F(VhostUserBackendTest, SuspendStopsTheQueuesUntilResumed) {
  startServer(1);
  attach(blkConfig());
  GuestRing ring = bringUp();
  const uint8_t out[4] = {1, 2, 3, 4};
  ring.submit(0x200000, out, 0x201000, 4);
  driver_.kick(0);
  ASSERT_TRUE(waitUsed(ring, 1)) << logText();

  VhostUserDeviceState state = backend_->suspend();
  EXPECT_EQ(state.deviceType, virtio::kTypeBlock);
  EXPECT_EQ(state.numQueues, 1);
  ASSERT_EQ(state.queues.size(), 1u);
  EXPECT_EQ(state.queues[0].index, 0);
  EXPECT_EQ(state.queues[0].size, 64);
  EXPECT_EQ(state.queues[0].availIndex, 1);
  EXPECT_NE(state.ackedFeatures & virtio::feature(virtio::kFeatureVersion1), 0u);
  uint64_t capacity = 0;
  ASSERT_GE(state.config.size(), 8u);
  std::memcpy(&capacity, state.config.data(), 8);
  EXPECT_EQ(capacity, 2048u);
  EXPECT_EQ(device_->stopped.load(), 1);
  EXPECT_THROW(backend_->suspend(), Error) << "suspended twice";

  // A request the guest queues meanwhile waits (the disk stays quiet during a copy).
  ring.submit(0x200000, out, 0x201000, 4);
  driver_.kick(0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_EQ(ring.usedIndex(), 1);
  EXPECT_EQ(device_->processed.load(), 1);

  backend_->resumeAfterSuspend();
  ASSERT_TRUE(waitUsed(ring, 2)) << logText();
  EXPECT_EQ(device_->processed.load(), 2);
  // And the device keeps serving.
  ring.submit(0x200000, out, 0x201000, 4);
  driver_.kick(0);
  ASSERT_TRUE(waitUsed(ring, 3)) << logText();
}

// The fork's path without KVM: the template's device is suspended and saved, a new back-end
// (the fork's clone-block) and a new transport are restored over the same guest memory, and
// the back-end continues at the saved ring position instead of serving old requests again.
TEST_F(VhostUserBackendTest, AForkStartsItsQueuesWhereTheTemplateStopped) {
  startServer(1);
  attach(blkConfig());
  GuestRing ring = bringUp();
  const uint8_t out[4] = {1, 2, 3, 4};
  for (uint16_t i = 1; i <= 2; ++i) {
    ring.submit(0x200000, out, 0x201000, 4);
    driver_.kick(0);
    ASSERT_TRUE(waitUsed(ring, i)) << logText();
  }
  VhostUserDeviceState saved = backend_->suspend();
  VirtioPciState transportState = transport_->saveState();
  ASSERT_EQ(saved.queues.size(), 1u);
  EXPECT_EQ(saved.queues[0].availIndex, 2);

  driver_.detach();
  transport_.reset();
  backend_.reset();
  stopServer();
  startServer(1);
  backend_ = VhostUserBackend::connect(blkConfig(), memory_, *log_);
  backend_->restoreState(saved);
  transport_ = std::make_shared<VirtioPciDevice>(backend_, memory_, events_, events_, *log_);
  transport_->restoreState(transportState);
  EXPECT_EQ(backend_->activations(), 1u);
  EXPECT_EQ(device_->started.load(), 1);

  ring.submit(0x200000, out, 0x201000, 4);
  kickByHand(transport_->kickFd(0));  // what KVM's ioeventfd does on the guest's doorbell write
  ASSERT_TRUE(waitUsed(ring, 3)) << logText();
  EXPECT_EQ(device_->processed.load(), 1) << "the fork's back-end served the template's requests again";
}

// A fork's guest memory, filled lazily from a template image, served by a back-end that does
// postcopy: the pages the back-end touches first (a request's data the driver never wrote in
// this fork, and a reply buffer) come from the template through the core's fill, and what
// the back-end writes lands on the template's page, not on a zero page.
TEST_F(VhostUserBackendTest, PostcopyBackendFaultsAreFilledFromTheTemplate) {
  int probe = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC));
  if (probe < 0) GTEST_SKIP() << "no userfaultfd here: " << std::strerror(errno);
  ::close(probe);
  constexpr uint64_t kData = 0x300000;  // two pages of template data: request and reply
  auto pattern = [](uint64_t offset) { return static_cast<uint8_t>(offset * 13 / 7 + 1); };
  std::string image = fmt::format("{}/postcopy-template-{}", ::testing::TempDir(), ::getpid());
  {
    UniqueFd fd(::open(image.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    ASSERT_TRUE(fd.valid());
    ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(memory_.size())), 0);
    std::vector<uint8_t> bytes(0x2000);
    for (uint64_t i = 0; i < bytes.size(); ++i) bytes[i] = pattern(kData + i);
    ASSERT_EQ(::pwrite(fd.get(), bytes.data(), bytes.size(), kData), 0x2000);
  }
  LazyMemoryFill fill(memory_, image, {{kData, 0x2000}}, *log_);
  fill.start();
  startServer(1, true, true, {.newUserfaultfd = [] {
                                UniqueFd fd = openUserfaultfd();
                                uffdio_api api{.api = UFFD_API};
                                CLONE_SYSCALL(::ioctl(fd.get(), UFFDIO_API, &api), "UFFDIO_API");
                                return fd;
                              }});
  ASSERT_NO_THROW(attach(blkConfig(), &fill)) << logText();
  EXPECT_TRUE(backend_->postcopy());
  EXPECT_TRUE(vhost::hasBit(backend_->protocolFeatures(), vhost::protocol::kPagefault));
  GuestRing ring = bringUp();
  ring.submitChain(kData + 16, 8, kData + 0x1000 + 100, 8);
  driver_.kick(0);
  ASSERT_TRUE(waitUsed(ring, 1)) << logText();
  EXPECT_GE(fill.stats().deviceFaults, 2u) << logText();
  for (uint64_t i = 0; i < 8; ++i) {
    EXPECT_EQ(memory_.readObject<uint8_t>(kData + 0x1000 + 100 + i), pattern(kData + 16 + i) ^ 0x5a) << i;
  }
  // The rest of the reply page is the template's.
  EXPECT_EQ(memory_.readObject<uint8_t>(kData + 0x1000 + 99), pattern(kData + 0x1000 + 99));
  EXPECT_EQ(memory_.readObject<uint8_t>(kData + 0x1fff), pattern(kData + 0x1fff));
  driver_.detach();
  transport_.reset();
  backend_.reset();
  stopServer();
  ::unlink(image.c_str());
}

// A back-end without PAGEFAULT (QEMU's storage daemon, an old clone-block): no postcopy, and
// the fork falls back to filling its memory before the queues start (Machine).
TEST_F(VhostUserBackendTest, WithoutPagefaultThereIsNoPostcopy) {
  int probe = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC));
  if (probe < 0) GTEST_SKIP() << "no userfaultfd here: " << std::strerror(errno);
  ::close(probe);
  std::string image = fmt::format("{}/postcopy-none-{}", ::testing::TempDir(), ::getpid());
  {
    UniqueFd fd(::open(image.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    ASSERT_EQ(::ftruncate(fd.get(), static_cast<off_t>(memory_.size())), 0);
  }
  LazyMemoryFill fill(memory_, image, {}, *log_);
  fill.start();
  startServer(1);
  attach(blkConfig(), &fill);
  EXPECT_FALSE(backend_->postcopy());
  EXPECT_FALSE(vhost::hasBit(backend_->protocolFeatures(), vhost::protocol::kPagefault));
  driver_.detach();
  transport_.reset();
  backend_.reset();
  stopServer();
  ::unlink(image.c_str());
}

TEST_F(VhostUserBackendTest, RestoreRefusesADeviceThatDiffersFromTheTemplates) {
  startServer(1);
  attach(blkConfig());
  bringUp();
  VhostUserDeviceState saved = backend_->suspend();
  driver_.detach();
  transport_.reset();
  backend_.reset();
  stopServer();

  startServer(2);
  device_->setCapacity(4096);  // another disk size
  auto other = VhostUserBackend::connect(blkConfig(), memory_, *log_);
  try {
    other->restoreState(saved);
    FAIL() << "a disk of another size was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("4096 sectors, the template's had 2048"), std::string::npos)
        << e.what();
  }
  other.reset();
  auto twoQueues = VhostUserBackend::connect(blkConfig(2), memory_, *log_);
  EXPECT_THROW(twoQueues->restoreState(saved), Error);
}

TEST(VhostUserOptionTest, ParsesBlk) {
  auto config = parseVhostUserBlkOption("/run/blk.sock");
  EXPECT_EQ(config.kind, VhostUserDeviceKind::kBlock);
  EXPECT_EQ(config.socketPath, "/run/blk.sock");
  EXPECT_EQ(config.queues, 0);
  config = parseVhostUserBlkOption("/run/blk.sock,queues=4");
  EXPECT_EQ(config.socketPath, "/run/blk.sock");
  EXPECT_EQ(config.queues, 4);
  EXPECT_THROW(parseVhostUserBlkOption(""), Error);
  EXPECT_THROW(parseVhostUserBlkOption("/s,queues=0"), Error);
  EXPECT_THROW(parseVhostUserBlkOption("/s,queues=x"), Error);
  EXPECT_THROW(parseVhostUserBlkOption("/s,queues=65"), Error);
  EXPECT_THROW(parseVhostUserBlkOption("/s,queue=2"), Error);
  EXPECT_THROW(parseVhostUserBlkOption("/s,queues"), Error);
}

TEST(VhostUserOptionTest, ParsesAnInheritedSocketAndTheImage) {
  auto config = parseVhostUserBlkOption("fd=7,image=/run/f/disk0.qcow2,format=qcow2,queues=2");
  EXPECT_EQ(config.socketFd, 7);
  EXPECT_EQ(config.socketPath, "fd=7");
  EXPECT_EQ(config.imagePath, "/run/f/disk0.qcow2");
  EXPECT_EQ(config.imageFormat, "qcow2");
  EXPECT_EQ(config.queues, 2);
  config = parseVhostUserBlkOption("/run/blk.sock,image=/img.raw");
  EXPECT_EQ(config.socketFd, -1);
  EXPECT_EQ(config.imagePath, "/img.raw");
  EXPECT_EQ(config.imageFormat, "");
  for (const char* bad : {"fd=2", "fd=x", "fd=", "fd=-4", "/s,format=raw", "/s,image=",
                          "/s,image=/i,format=vmdk"}) {
    EXPECT_THROW(parseVhostUserBlkOption(bad), Error) << bad;
  }
  EXPECT_THROW(parseVhostUserFsOption("/s:tag,image=/i"), Error);
}

TEST(VhostUserOptionTest, ParsesFsAndChecksTheTag) {
  auto config = parseVhostUserFsOption("/run/fs.sock:share");
  EXPECT_EQ(config.kind, VhostUserDeviceKind::kFs);
  EXPECT_EQ(config.socketPath, "/run/fs.sock");
  EXPECT_EQ(config.tag, "share");
  config = parseVhostUserFsOption("/a:b/fs.sock:t,queues=2");
  EXPECT_EQ(config.socketPath, "/a:b/fs.sock");
  EXPECT_EQ(config.tag, "t");
  EXPECT_EQ(config.queues, 2);
  EXPECT_THROW(parseVhostUserFsOption("/run/fs.sock"), Error);
  EXPECT_THROW(parseVhostUserFsOption("/run/fs.sock:"), Error);
  EXPECT_THROW(parseVhostUserFsOption(":tag"), Error);
  EXPECT_THROW(parseVhostUserFsOption("/s:" + std::string(37, 'a')), Error);
  EXPECT_NO_THROW(parseVhostUserFsOption("/s:" + std::string(36, 'a')));
  EXPECT_THROW(parseVhostUserFsOption("/s:a b"), Error);
  try {
    parseVhostUserFsOption("/s:" + std::string(40, 'x'));
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must be 1 to 36 bytes"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace clonevm::vmm
