// The vhost-vsock backend against a recording stand-in for /dev/vhost-vsock: the ioctl
// sequence for setup, activation, reset, CID changes and state save/restore, and the event
// queue it serves itself in (real, memfd-backed) guest memory.
#include "vmm-core/virtio/vhost_vsock_backend.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <set>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "common/error.h"
#include "common/log.h"

namespace clonevm::vmm {
namespace {

class FakeKernel : public VhostVsockKernel {
 public:
  struct Shared {
    std::vector<std::string> calls;
    std::set<uint64_t> takenCids;
    uint64_t features = (1ull << 32) | (1ull << 29) | (1ull << 28) | (1ull << 1) | (1ull << 30);
    uint16_t bases[2] = {0, 0};
    bool running = false;
  };
  explicit FakeKernel(Shared& shared) : s_(shared) {}

  void setOwner() override { s_.calls.push_back("SET_OWNER"); }
  uint64_t getFeatures() override {
    s_.calls.push_back("GET_FEATURES");
    return s_.features;
  }
  void setFeatures(uint64_t features) override {
    s_.calls.push_back(fmt::format("SET_FEATURES {:#x}", features));
  }
  void setMemTable(const std::vector<MemoryRegion>& regions) override {
    s_.calls.push_back(fmt::format("SET_MEM_TABLE {}", regions.size()));
  }
  void setVringNum(uint16_t queue, uint16_t size) override {
    s_.calls.push_back(fmt::format("SET_VRING_NUM {} {}", queue, size));
  }
  void setVringBase(uint16_t queue, uint16_t base) override {
    // The kernel refuses to move the base of a running ring (EBUSY).
    if (s_.running) throw Error("SET_VRING_BASE while running");
    s_.bases[queue] = base;
    s_.calls.push_back(fmt::format("SET_VRING_BASE {} {}", queue, base));
  }
  uint16_t getVringBase(uint16_t queue) override {
    s_.calls.push_back(fmt::format("GET_VRING_BASE {}", queue));
    return s_.bases[queue];
  }
  void setVringAddr(uint16_t queue, const VringAddresses&) override {
    s_.calls.push_back(fmt::format("SET_VRING_ADDR {}", queue));
  }
  void setVringKick(uint16_t queue, int fd) override {
    s_.calls.push_back(fmt::format("SET_VRING_KICK {} {}", queue, fd < 0 ? "-1" : "fd"));
  }
  void setVringCall(uint16_t queue, int fd) override {
    s_.calls.push_back(fmt::format("SET_VRING_CALL {} {}", queue, fd < 0 ? "-1" : "fd"));
  }
  int setGuestCid(uint64_t cid) override {
    s_.calls.push_back(fmt::format("SET_GUEST_CID {}", cid));
    if (s_.takenCids.count(cid)) return EADDRINUSE;
    return 0;
  }
  void setRunning(bool running) override {
    s_.running = running;
    s_.calls.push_back(fmt::format("SET_RUNNING {}", running ? 1 : 0));
  }

 private:
  Shared& s_;
};

// Guest-side layout of the three queues, inside the first MiB of guest RAM.
constexpr uint16_t kSize = 8;
constexpr uint64_t kEventDesc = 0x10000, kEventAvail = 0x11000, kEventUsed = 0x12000;
constexpr uint64_t kEventBuffers = 0x20000;

class VhostVsockTest : public ::testing::Test {
 protected:
  VhostVsockTest() : memory_(GuestMemory::create(2ull << 20)), log_(makeLogger("vsock-test", {})) {}

  std::shared_ptr<VhostVsockBackend> make(uint64_t cid, uint64_t autoStart = 0) {
    return std::make_shared<VhostVsockBackend>(std::make_unique<FakeKernel>(kernel_), cid,
                                               memory_, *log_, autoStart);
  }

  VirtioActivationInfo activation() {
    VirtioActivationInfo info;
    info.memory = &memory_;
    info.features = (1ull << 32) | (1ull << 1);
    for (uint16_t q = 0; q < 3; ++q) {
      VirtioQueueInfo queue;
      queue.index = q;
      queue.size = kSize;
      queue.descTable = q == 2 ? kEventDesc : 0x1000 + q * 0x3000ull;
      queue.availRing = q == 2 ? kEventAvail : 0x2000 + q * 0x3000ull;
      queue.usedRing = q == 2 ? kEventUsed : 0x3000 + q * 0x3000ull;
      queue.kickFd = kicks_[q];
      queue.callFd = calls_[q];
      info.queues.push_back(queue);
    }
    info.configChanged = [this] { ++configChanges_; };
    return info;
  }

  // The driver posts `count` 4-byte (or `length`) writable buffers on the event queue.
  void postEventBuffers(uint16_t count, uint32_t length = 4) {
    for (uint16_t i = 0; i < count; ++i) {
      uint16_t slot = static_cast<uint16_t>(availIdx_ % kSize);
      struct {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
      } desc{kEventBuffers + 0x100ull * slot, length, 2, 0};
      memory_.writeObject(kEventDesc + 16ull * slot, desc);
      memory_.writeObject<uint16_t>(kEventAvail + 4 + 2ull * slot, slot);
      memory_.writeObject<uint32_t>(kEventBuffers + 0x100ull * slot, 0xdeadbeef);
      ++availIdx_;
    }
    memory_.writeObject<uint16_t>(kEventAvail + 2, availIdx_);
  }
  uint16_t usedIdx() { return memory_.readObject<uint16_t>(kEventUsed + 2); }
  uint64_t drainCall(int q) {
    uint64_t value = 0;
    return ::read(calls_[q], &value, sizeof value) == sizeof value ? value : 0;
  }
  uint64_t configCid(VhostVsockBackend& backend) {
    uint8_t bytes[8];
    backend.readConfig(0, bytes);
    uint64_t cid = 0;
    for (int i = 7; i >= 0; --i) cid = cid << 8 | bytes[i];
    return cid;
  }
  std::vector<std::string> takeCalls() { return std::exchange(kernel_.calls, {}); }

  void SetUp() override {
    for (int q = 0; q < 3; ++q) {
      kicks_[q] = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
      calls_[q] = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    }
  }
  void TearDown() override {
    for (int q = 0; q < 3; ++q) {
      ::close(kicks_[q]);
      ::close(calls_[q]);
    }
  }

  GuestMemory memory_;
  std::shared_ptr<spdlog::logger> log_;
  FakeKernel::Shared kernel_;
  int kicks_[3] = {-1, -1, -1};
  int calls_[3] = {-1, -1, -1};
  int configChanges_ = 0;
  uint16_t availIdx_ = 0;
};

TEST_F(VhostVsockTest, SetupTakesOwnershipMemoryAndTheCid) {
  auto backend = make(42);
  EXPECT_EQ(takeCalls(), (std::vector<std::string>{"SET_OWNER", "GET_FEATURES", "SET_MEM_TABLE 1",
                                                   "SET_GUEST_CID 42"}));
  EXPECT_EQ(backend->guestCid(), 42u);
  EXPECT_EQ(configCid(*backend), 42u);
  EXPECT_EQ(backend->deviceType(), 19u);
  EXPECT_EQ(backend->numQueues(), 3);
  // Offered: VERSION_1, EVENT_IDX, SEQPACKET of the kernel's set; not INDIRECT_DESC (the
  // core's event queue takes no indirect descriptors) nor anything else.
  EXPECT_EQ(backend->deviceFeatures(), (1ull << 32) | (1ull << 29) | (1ull << 1));
}

TEST_F(VhostVsockTest, ATakenCidIsAClearErrorWhenAskedFor) {
  kernel_.takenCids = {42};
  try {
    make(42);
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_STREQ(error.what(), "--vsock-cid 42: CID already in use by another VM");
  }
  EXPECT_THROW(make(2), Error);
  EXPECT_THROW(make(1ull << 32), Error);
}

TEST_F(VhostVsockTest, AutomaticCidSkipsTakenOnes) {
  // autoStart 0 maps to CID 3; 3 and 4 are taken.
  kernel_.takenCids = {3, 4};
  auto backend = make(0, 0);
  EXPECT_EQ(backend->guestCid(), 5u);
  // A wrap-around start stays in range.
  auto other = make(0, 0xfffffffbull);
  EXPECT_GE(other->guestCid(), 3u);
  EXPECT_LE(other->guestCid(), 0xfffffffeull);
}

TEST_F(VhostVsockTest, ActivateProgramsTheKernelQueuesOnly) {
  auto backend = make(42);
  takeCalls();
  backend->activate(activation());
  EXPECT_EQ(takeCalls(),
            (std::vector<std::string>{
                "GET_FEATURES", "SET_FEATURES 0x100000002", "SET_VRING_NUM 0 8",
                "SET_VRING_BASE 0 0", "SET_VRING_ADDR 0", "SET_VRING_KICK 0 fd",
                "SET_VRING_CALL 0 fd", "SET_VRING_NUM 1 8", "SET_VRING_BASE 1 0",
                "SET_VRING_ADDR 1", "SET_VRING_KICK 1 fd", "SET_VRING_CALL 1 fd", "SET_RUNNING 1"}));
  EXPECT_TRUE(backend->active());
  backend->reset();
  EXPECT_EQ(takeCalls(),
            (std::vector<std::string>{"SET_RUNNING 0", "SET_VRING_KICK 0 -1", "SET_VRING_CALL 0 -1",
                                      "SET_VRING_KICK 1 -1", "SET_VRING_CALL 1 -1"}));
  EXPECT_FALSE(backend->active());
}

TEST_F(VhostVsockTest, ActivationWithoutRxTxIsRefused) {
  auto backend = make(42);
  auto info = activation();
  info.queues.erase(info.queues.begin());
  EXPECT_THROW(backend->activate(info), Error);
  EXPECT_FALSE(backend->active());
}

TEST_F(VhostVsockTest, TransportResetUsesAPostedEventBuffer) {
  auto backend = make(42);
  // Not active: nothing to send on.
  EXPECT_FALSE(backend->sendTransportReset());
  backend->activate(activation());
  // No buffer posted yet.
  EXPECT_FALSE(backend->sendTransportReset());
  EXPECT_EQ(usedIdx(), 0);
  postEventBuffers(2);
  ASSERT_TRUE(backend->sendTransportReset());
  EXPECT_EQ(usedIdx(), 1);
  EXPECT_EQ(memory_.readObject<uint32_t>(kEventBuffers), vsock::kEventTransportReset);
  EXPECT_EQ(memory_.readObject<uint32_t>(kEventUsed + 4), 0u);      // head
  EXPECT_EQ(memory_.readObject<uint32_t>(kEventUsed + 8), 4u);      // written
  EXPECT_EQ(drainCall(2), 1u);
  // The second buffer is kept for the next event.
  EXPECT_EQ(memory_.readObject<uint32_t>(kEventBuffers + 0x100), 0xdeadbeefu);
}

TEST_F(VhostVsockTest, HostileEventRingsAreRefusedWithoutCrashing) {
  auto backend = make(42);
  backend->activate(activation());
  // A descriptor pointing outside guest RAM.
  postEventBuffers(1);
  struct {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
  } bad{1ull << 40, 4, 2, 0};
  memory_.writeObject(kEventDesc, bad);
  EXPECT_FALSE(backend->sendTransportReset());
  // An avail index far ahead of what the ring holds.
  memory_.writeObject<uint16_t>(kEventAvail + 2, 1000);
  EXPECT_FALSE(backend->sendTransportReset());
  // A too-small buffer is returned but reported. (One fake kernel serves both devices.)
  backend->reset();
  auto fresh = make(43);
  memory_.writeObject<uint16_t>(kEventAvail + 2, 0);
  memory_.writeObject<uint16_t>(kEventUsed + 2, 0);
  availIdx_ = 0;
  fresh->activate(activation());
  postEventBuffers(1, 2);
  EXPECT_FALSE(fresh->sendTransportReset());
  EXPECT_EQ(usedIdx(), 1);
}

TEST_F(VhostVsockTest, SetGuestCidStopsRetakesNotifiesAndResets) {
  auto backend = make(42);
  backend->activate(activation());
  postEventBuffers(1);
  takeCalls();
  backend->setGuestCid(77);
  EXPECT_EQ(takeCalls(), (std::vector<std::string>{"SET_RUNNING 0", "SET_GUEST_CID 77", "SET_RUNNING 1"}));
  EXPECT_EQ(backend->guestCid(), 77u);
  EXPECT_EQ(configCid(*backend), 77u);
  EXPECT_EQ(configChanges_, 1);
  EXPECT_EQ(usedIdx(), 1);  // the transport reset event
  EXPECT_EQ(memory_.readObject<uint32_t>(kEventBuffers), vsock::kEventTransportReset);

  // A taken CID leaves the old one in place, and the device running.
  kernel_.takenCids = {99};
  EXPECT_THROW(backend->setGuestCid(99), Error);
  EXPECT_EQ(backend->guestCid(), 77u);
  EXPECT_TRUE(kernel_.running);
  EXPECT_THROW(backend->setGuestCid(0xffffffffull), Error);
}

TEST_F(VhostVsockTest, SaveAndRestoreRingPositions) {
  auto backend = make(42);
  backend->activate(activation());
  postEventBuffers(3);
  ASSERT_TRUE(backend->sendTransportReset());
  kernel_.bases[0] = 17;
  kernel_.bases[1] = 9;
  EXPECT_THROW(backend->saveState(), Error);  // still running
  backend->stop();
  VhostVsockState state = backend->saveState();
  EXPECT_EQ(state.guestCid, 42u);
  EXPECT_EQ(state.rxBase, 17);
  EXPECT_EQ(state.txBase, 9);
  EXPECT_EQ(state.eventNextAvail, 1);
  EXPECT_EQ(state.eventNextUsed, 1);
  backend->start();
  EXPECT_TRUE(kernel_.running);

  // A restored device: the transport re-activates it, with the saved positions. (One fake
  // kernel serves both devices.)
  backend->reset();
  auto restored = make(43);
  restored->restoreState(state);
  takeCalls();
  restored->activate(activation());
  auto calls = takeCalls();
  EXPECT_NE(std::find(calls.begin(), calls.end(), "SET_VRING_BASE 0 17"), calls.end());
  EXPECT_NE(std::find(calls.begin(), calls.end(), "SET_VRING_BASE 1 9"), calls.end());
  // The event queue continues after the entry already used: the next event takes the
  // second buffer.
  ASSERT_TRUE(restored->sendTransportReset());
  EXPECT_EQ(usedIdx(), 2);
  EXPECT_EQ(memory_.readObject<uint32_t>(kEventBuffers + 0x100), vsock::kEventTransportReset);

  // Restoring on an active device stops it around SET_VRING_BASE.
  takeCalls();
  restored->restoreState(state);
  EXPECT_EQ(takeCalls(), (std::vector<std::string>{"SET_RUNNING 0", "SET_VRING_BASE 0 17",
                                                   "SET_VRING_BASE 1 9", "SET_RUNNING 1"}));
}

}  // namespace
}  // namespace clonevm::vmm
