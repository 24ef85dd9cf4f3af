#include "vmm-core/virtio/test_devices/virtio_rng.h"

#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "vmm-core/virtio/split_queue.h"
#include "vmm-core/virtio/testing/fake_device_events.h"
#include "vmm-core/virtio/testing/virtio_pci_test_driver.h"
#include "vmm-core/virtio/virtio_pci_device.h"

namespace clonevm::vmm {
namespace {

using namespace virtio_pci;

constexpr uint64_t kBar = 0x40'0000'0000;
constexpr uint16_t kQueueSize = 16;
constexpr uint64_t kDesc = 0x10000;
constexpr uint64_t kAvail = 0x11000;
constexpr uint64_t kUsed = 0x12000;
constexpr uint64_t kBuffers = 0x20000;

bool waitReadable(int fd, int timeoutMs = 5000) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, timeoutMs) == 1;
}

uint64_t drain(int fd) {
  uint64_t count = 0;
  return ::read(fd, &count, sizeof(count)) == sizeof(count) ? count : 0;
}

// The guest half of a split ring, as Linux's virtio_ring lays it out.
class GuestRing {
 public:
  explicit GuestRing(const GuestMemory& memory) : memory_(memory) {}

  void setDescriptor(uint16_t index, uint64_t address, uint32_t length, uint16_t flags,
                     uint16_t next = 0) {
    struct {
      uint64_t address;
      uint32_t length;
      uint16_t flags;
      uint16_t next;
    } raw{address, length, flags, next};
    memory_.writeObject(kDesc + 16ull * index, raw);
  }
  // Makes the chain at `head` available (the ring slot, then the index with release).
  void offer(uint16_t head) {
    memory_.writeObject<uint16_t>(kAvail + 4 + 2ull * (availIdx_ % kQueueSize), head);
    ++availIdx_;
    auto* idx = reinterpret_cast<uint16_t*>(memory_.slice(kAvail + 2, 2).data());
    std::atomic_ref<uint16_t>(*idx).store(availIdx_, std::memory_order_release);
  }
  void setAvailFlags(uint16_t flags) { memory_.writeObject<uint16_t>(kAvail, flags); }
  void setAvailIndex(uint16_t value) {
    availIdx_ = value;
    memory_.writeObject<uint16_t>(kAvail + 2, value);
  }
  uint16_t usedIdx() const {
    auto* idx = reinterpret_cast<uint16_t*>(memory_.slice(kUsed + 2, 2).data());
    return std::atomic_ref<uint16_t>(*idx).load(std::memory_order_acquire);
  }
  std::pair<uint32_t, uint32_t> used(uint16_t slot) const {
    uint64_t at = kUsed + 4 + 8ull * (slot % kQueueSize);
    return {memory_.readObject<uint32_t>(at), memory_.readObject<uint32_t>(at + 4)};
  }
  bool waitUsed(uint16_t idx) const {
    for (int i = 0; i < 5000; ++i) {
      if (usedIdx() == idx) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return false;
  }

 private:
  const GuestMemory& memory_;
  uint16_t availIdx_ = 0;
};

class VirtioRngTest : public ::testing::Test, protected virtio_testing::VirtioPciTestDriver {
 protected:
  VirtioRngTest()
      : log_("test", std::make_shared<spdlog::sinks::null_sink_mt>()),
        memory_(GuestMemory::create(16 << 20)),
        rng_(std::make_shared<VirtioRng>(log_,
                                         [this](std::span<uint8_t> bytes) {
                                           for (auto& b : bytes) b = next_++;
                                         })),
        ring_(memory_) {
    attach(std::make_shared<VirtioPciDevice>(rng_, memory_, events_, events_, log_, kBar), log_);
  }
  void TearDown() override {
    detach();
    for (const auto& violation : events_.violations) ADD_FAILURE() << violation;
  }

  // Linux's virtio_rng probe: one queue on vector 1, config on vector 0.
  void bringUp() {
    programBar(kBar);
    enableMsix(2);
    ASSERT_TRUE(negotiate());
    setCommon(kMsixConfig, 0, 2);
    setupQueue(0, {kQueueSize, kDesc, kAvail, kUsed, 1});
    addStatus(virtio::kStatusDriverOk);
    ASSERT_EQ(status() & virtio::kStatusNeedsReset, 0);
  }

  spdlog::logger log_;
  GuestMemory memory_;
  virtio_testing::FakeDeviceEvents events_;
  std::atomic<uint8_t> next_{1};
  std::shared_ptr<VirtioRng> rng_;
  GuestRing ring_;
};

TEST_F(VirtioRngTest, IdentifiesAsVirtioRng) {
  EXPECT_EQ(cfgRead(pci::kDeviceId, 2), 0x1044u);
  EXPECT_EQ(caps_.device, 0);  // no device config
  programBar(kBar);
  EXPECT_EQ(deviceFeatures(), virtio::feature(virtio::kFeatureVersion1));
}

TEST_F(VirtioRngTest, FillsPostedBuffersAndInterrupts) {
  bringUp();
  ring_.setDescriptor(0, kBuffers, 64, SplitQueue::kDescWrite);
  ring_.offer(0);
  kick(0);
  ASSERT_TRUE(waitReadable(device_->callFd(0)));  // the irqfd would inject vector 1
  ASSERT_EQ(ring_.usedIdx(), 1);
  EXPECT_EQ(ring_.used(0), (std::pair<uint32_t, uint32_t>{0, 64}));
  std::vector<uint8_t> got(64);
  memory_.read(kBuffers, got);
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], static_cast<uint8_t>(i + 1));
  EXPECT_EQ(rng_->bytesServed(), 64u);
  drain(device_->callFd(0));

  // A chain: a read-only descriptor is skipped, two writable ones are filled in order.
  ring_.setDescriptor(1, kBuffers + 0x1000, 8, SplitQueue::kDescNext, 2);
  ring_.setDescriptor(2, kBuffers + 0x2000, 4, SplitQueue::kDescWrite | SplitQueue::kDescNext, 3);
  ring_.setDescriptor(3, kBuffers + 0x3000, 4, SplitQueue::kDescWrite);
  ring_.offer(1);
  kick(0);
  ASSERT_TRUE(ring_.waitUsed(2));
  EXPECT_EQ(ring_.used(1), (std::pair<uint32_t, uint32_t>{1, 8}));
  EXPECT_EQ(memory_.readObject<uint32_t>(kBuffers + 0x1000), 0u);
  EXPECT_EQ(memory_.readObject<uint32_t>(kBuffers + 0x2000), 0x44434241u);
  EXPECT_EQ(memory_.readObject<uint32_t>(kBuffers + 0x3000), 0x48474645u);
  EXPECT_TRUE(waitReadable(device_->callFd(0)));
}

TEST_F(VirtioRngTest, HonoursNoInterrupt) {
  bringUp();
  ring_.setAvailFlags(SplitQueue::kAvailNoInterrupt);
  ring_.setDescriptor(0, kBuffers, 16, SplitQueue::kDescWrite);
  ring_.offer(0);
  kick(0);
  ASSERT_TRUE(ring_.waitUsed(1));
  EXPECT_FALSE(waitReadable(device_->callFd(0), 50));
}

TEST_F(VirtioRngTest, ABrokenRingStopsTheDeviceNotTheProcess) {
  bringUp();
  ring_.setDescriptor(0, kBuffers, 16, SplitQueue::kDescWrite | SplitQueue::kDescNext, 0);
  ring_.offer(0);  // a chain that loops onto itself
  kick(0);
  for (int i = 0; i < 5000 && !rng_->broken(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(rng_->broken());
  EXPECT_EQ(ring_.usedIdx(), 0);
  kick(0);  // further kicks are consumed without touching the ring

  // A reset and a new driver bring it back; buffers outside RAM break it again.
  ring_.setAvailIndex(0);
  bringUp();
  EXPECT_FALSE(rng_->broken());
  ring_.setDescriptor(0, 0xd0000000, 16, SplitQueue::kDescWrite);  // the PCI hole
  ring_.offer(0);
  kick(0);
  for (int i = 0; i < 5000 && !rng_->broken(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(rng_->broken());

  ring_.setAvailIndex(0);
  memory_.writeObject<uint16_t>(kUsed + 2, 0);
  bringUp();
  ring_.setAvailIndex(40);  // more than the queue size ahead
  kick(0);
  for (int i = 0; i < 5000 && !rng_->broken(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(rng_->broken());
}

TEST_F(VirtioRngTest, ResetStopsTheWorker) {
  bringUp();
  setCommon(kDeviceStatus, 0, 1);
  // Nothing serves the queue now: a posted buffer stays unused.
  ring_.setDescriptor(0, kBuffers, 16, SplitQueue::kDescWrite);
  ring_.offer(0);
  uint64_t one = 1;
  ASSERT_EQ(::write(device_->kickFd(0), &one, sizeof(one)), 8);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(ring_.usedIdx(), 0);
  EXPECT_EQ(rng_->bytesServed(), 0u);
}

}  // namespace
}  // namespace clonevm::vmm
