#include "ipc/vhost-user/virtqueue.h"

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>
#include <spdlog/spdlog.h>

#include "ipc/vhost-user/test_guest.h"

namespace clonevm::ipc::vhost {
namespace {

using testing::TestGuestMemory;
using testing::TestRing;

spdlog::logger& nullLogger() {
  static auto logger = std::make_shared<spdlog::logger>("test", std::make_shared<spdlog::sinks::null_sink_mt>());
  return *logger;
}

// Reads an eventfd without blocking; returns its count (0 when nothing was signalled).
uint64_t drain(int fd) {
  uint64_t count = 0;
  if (::read(fd, &count, sizeof(count)) != sizeof(count)) return 0;
  return count;
}

class VirtqueueTest : public ::testing::Test {
 protected:
  static constexpr uint16_t kSize = 8;

  VirtqueueTest() : ring_(guest_, kSize), map_(guest_.mapForBackend()), queue_(0, nullLogger()) {
    call_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    err_ = UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  }

  void start(uint64_t features = bit(feature::kVersion1) | bit(feature::kRingIndirectDesc)) {
    queue_.setSize(kSize);
    queue_.setAddresses(ring_.address(0));
    queue_.setFeatures(features);
    queue_.setCallFd(UniqueFd(::dup(call_.get())));
    queue_.setErrFd(UniqueFd(::dup(err_.get())));
    queue_.setKickFd(UniqueFd(::eventfd(0, EFD_CLOEXEC)));
    queue_.start(map_);
  }

  // Pops and expects the queue to break with a message containing `fragment`.
  void expectBroken(const std::string& fragment) {
    EXPECT_FALSE(queue_.pop().has_value());
    EXPECT_TRUE(queue_.broken());
    EXPECT_NE(queue_.brokenReason().find(fragment), std::string::npos) << queue_.brokenReason();
    EXPECT_EQ(drain(err_.get()), 1u) << "the error eventfd was not signalled";
    // A broken queue hands out nothing more, even valid requests.
    EXPECT_FALSE(queue_.pop().has_value());
  }

  TestGuestMemory guest_{1 << 20, 0x100000};
  TestRing ring_;
  GuestMemoryMap map_;
  Virtqueue queue_;
  UniqueFd call_;
  UniqueFd err_;
};

TEST_F(VirtqueueTest, DirectDescriptor) {
  start();
  uint64_t data = guest_.put({1, 2, 3, 4});
  ring_.setDescriptor(0, data, 4, 0);
  ring_.publish(0);
  auto request = queue_.pop();
  ASSERT_TRUE(request.has_value());
  EXPECT_EQ(request->head(), 0);
  EXPECT_EQ(request->readableBytes(), 4u);
  EXPECT_EQ(request->writableBytes(), 0u);
  std::vector<uint8_t> bytes(4);
  EXPECT_EQ(request->read(0, bytes), 4u);
  EXPECT_EQ(bytes, (std::vector<uint8_t>{1, 2, 3, 4}));
  EXPECT_FALSE(queue_.pop().has_value());
  queue_.complete(*request, 0);
  EXPECT_EQ(ring_.usedIndex(), 1);
  EXPECT_EQ(ring_.usedElement(0), std::make_pair(0u, 0u));
  EXPECT_TRUE(queue_.notifyIfNeeded());
  EXPECT_EQ(drain(call_.get()), 1u);
  EXPECT_EQ(queue_.lastAvailIndex(), 1);
}

TEST_F(VirtqueueTest, ChainedReadableThenWritable) {
  start();
  uint64_t header = guest_.put({9, 9});
  uint64_t out = guest_.allocate(6);
  uint64_t status = guest_.allocate(1);
  ring_.setDescriptor(3, header, 2, kDescFlagNext, 5);
  ring_.setDescriptor(5, out, 6, kDescFlagNext | kDescFlagWrite, 1);
  ring_.setDescriptor(1, status, 1, kDescFlagWrite);
  ring_.publish(3);
  auto request = queue_.pop();
  ASSERT_TRUE(request.has_value());
  EXPECT_EQ(request->head(), 3);
  EXPECT_EQ(request->readableBytes(), 2u);
  EXPECT_EQ(request->writableBytes(), 7u);
  std::vector<uint8_t> reply = {10, 20, 30, 40, 50, 60, 70};
  EXPECT_EQ(request->write(0, reply), 7u);
  EXPECT_EQ(guest_.get(out, 6), (std::vector<uint8_t>{10, 20, 30, 40, 50, 60}));
  EXPECT_EQ(guest_.get(status, 1), (std::vector<uint8_t>{70}));
  // Writes past the end are cut short, never out of bounds.
  EXPECT_EQ(request->write(5, reply), 2u);
  queue_.complete(*request, 7);
  EXPECT_EQ(ring_.usedElement(0), std::make_pair(3u, 7u));
  EXPECT_THROW(queue_.complete(*request, 8), Error);  // more than it could have written
}

TEST_F(VirtqueueTest, IndirectTable) {
  start();
  uint64_t table = guest_.allocate(3 * 16);
  uint64_t a = guest_.put({1, 1});
  uint64_t b = guest_.put({2, 2, 2});
  uint64_t c = guest_.allocate(4);
  ring_.setIndirect(table, 0, a, 2, kDescFlagNext, 2);
  ring_.setIndirect(table, 2, b, 3, kDescFlagNext, 1);
  ring_.setIndirect(table, 1, c, 4, kDescFlagWrite);
  ring_.setDescriptor(4, table, 3 * 16, kDescFlagIndirect);
  ring_.publish(4);
  auto request = queue_.pop();
  ASSERT_TRUE(request.has_value());
  EXPECT_EQ(request->head(), 4);
  EXPECT_EQ(request->readableBytes(), 5u);
  EXPECT_EQ(request->writableBytes(), 4u);
  std::vector<uint8_t> bytes(5);
  request->read(0, bytes);
  EXPECT_EQ(bytes, (std::vector<uint8_t>{1, 1, 2, 2, 2}));
}

TEST_F(VirtqueueTest, DescriptorLoopBreaksTheQueue) {
  start();
  uint64_t data = guest_.allocate(4);
  ring_.setDescriptor(0, data, 4, kDescFlagNext, 1);
  ring_.setDescriptor(1, data, 4, kDescFlagNext, 0);
  ring_.publish(0);
  expectBroken("loops");
}

TEST_F(VirtqueueTest, SelfLoopBreaksTheQueue) {
  start();
  ring_.setDescriptor(2, guest_.allocate(4), 4, kDescFlagNext, 2);
  ring_.publish(2);
  expectBroken("loops");
}

TEST_F(VirtqueueTest, OutOfRangeHeadBreaksTheQueue) {
  start();
  ring_.publish(kSize);
  expectBroken("head descriptor index 8 is outside the 8-entry table");
}

TEST_F(VirtqueueTest, OutOfRangeNextBreaksTheQueue) {
  start();
  ring_.setDescriptor(0, guest_.allocate(4), 4, kDescFlagNext, 200);
  ring_.publish(0);
  expectBroken("links to 200");
}

TEST_F(VirtqueueTest, BufferOutsideMemoryBreaksTheQueue) {
  start();
  ring_.setDescriptor(0, 0x100000 + (1 << 20) - 2, 4, 0);
  ring_.publish(0);
  expectBroken("outside guest memory");
}

TEST_F(VirtqueueTest, ZeroLengthIndirectTableBreaksTheQueue) {
  start();
  ring_.setDescriptor(0, guest_.allocate(16), 0, kDescFlagIndirect);
  ring_.publish(0);
  expectBroken("not a non-zero multiple of 16");
}

TEST_F(VirtqueueTest, RaggedIndirectTableBreaksTheQueue) {
  start();
  ring_.setDescriptor(0, guest_.allocate(32), 20, kDescFlagIndirect);
  ring_.publish(0);
  expectBroken("not a non-zero multiple of 16");
}

TEST_F(VirtqueueTest, IndirectTableTooBigBreaksTheQueue) {
  start();
  uint32_t entries = kMaxIndirectDescriptors + 1;
  ring_.setDescriptor(0, guest_.allocate(16ull * entries), 16 * entries, kDescFlagIndirect);
  ring_.publish(0);
  expectBroken("1025 entries, at most 1024");
}

TEST_F(VirtqueueTest, NestedIndirectBreaksTheQueue) {
  start();
  uint64_t table = guest_.allocate(32);
  uint64_t inner = guest_.allocate(16);
  ring_.setIndirect(table, 0, inner, 16, kDescFlagIndirect);
  ring_.setDescriptor(0, table, 32, kDescFlagIndirect);
  ring_.publish(0);
  expectBroken("itself indirect");
}

TEST_F(VirtqueueTest, IndirectWithNextBreaksTheQueue) {
  start();
  ring_.setDescriptor(0, guest_.allocate(16), 16, kDescFlagIndirect | kDescFlagNext, 1);
  ring_.publish(0);
  expectBroken("both INDIRECT and NEXT");
}

TEST_F(VirtqueueTest, IndirectLoopBreaksTheQueue) {
  start();
  uint64_t table = guest_.allocate(2 * 16);
  uint64_t data = guest_.allocate(4);
  ring_.setIndirect(table, 0, data, 4, kDescFlagNext, 1);
  ring_.setIndirect(table, 1, data, 4, kDescFlagNext, 0);
  ring_.setDescriptor(0, table, 32, kDescFlagIndirect);
  ring_.publish(0);
  expectBroken("loops");
}

TEST_F(VirtqueueTest, IndirectWithoutTheFeatureBreaksTheQueue) {
  start(bit(feature::kVersion1));
  ring_.setDescriptor(0, guest_.allocate(16), 16, kDescFlagIndirect);
  ring_.publish(0);
  expectBroken("RING_INDIRECT_DESC was not negotiated");
}

TEST_F(VirtqueueTest, ReadableAfterWritableBreaksTheQueue) {
  start();
  ring_.setDescriptor(0, guest_.allocate(4), 4, kDescFlagWrite | kDescFlagNext, 1);
  ring_.setDescriptor(1, guest_.allocate(4), 4, 0);
  ring_.publish(0);
  expectBroken("follows a device-writable one");
}

TEST_F(VirtqueueTest, AvailIndexTooFarAheadBreaksTheQueue) {
  start();
  ring_.setAvailIndex(kSize + 1);
  expectBroken("more than the queue size");
}

TEST_F(VirtqueueTest, NotificationsWithoutEventIdx) {
  start();
  uint64_t data = guest_.allocate(4);
  ring_.setDescriptor(0, data, 4, 0);
  ring_.setDescriptor(1, data, 4, 0);
  ring_.publish(0);
  ring_.publish(1);
  auto first = queue_.pop();
  ASSERT_TRUE(first.has_value());
  // While we work, the driver is told not to kick.
  EXPECT_EQ(ring_.usedFlags(), kUsedFlagNoNotify);
  auto second = queue_.pop();
  ASSERT_TRUE(second.has_value());
  EXPECT_FALSE(queue_.pop().has_value());
  EXPECT_EQ(ring_.usedFlags(), 0) << "kicks were not re-armed when the queue ran empty";

  // The driver asks for no interrupts: none is sent.
  ring_.setAvailFlags(kAvailFlagNoInterrupt);
  queue_.complete(*first, 0);
  EXPECT_FALSE(queue_.notifyIfNeeded());
  EXPECT_EQ(drain(call_.get()), 0u);
  ring_.setAvailFlags(0);
  queue_.complete(*second, 0);
  EXPECT_TRUE(queue_.notifyIfNeeded());
  EXPECT_EQ(drain(call_.get()), 1u);
  // Nothing new completed: no interrupt.
  EXPECT_FALSE(queue_.notifyIfNeeded());
}

TEST_F(VirtqueueTest, EventIdxSuppressesKicksAndInterrupts) {
  start(bit(feature::kVersion1) | bit(feature::kRingEventIdx));
  uint64_t data = guest_.allocate(4);
  for (uint16_t i = 0; i < 4; ++i) ring_.setDescriptor(i, data, 4, 0);

  ring_.publish(0);
  ring_.publish(1);
  auto r0 = queue_.pop();
  auto r1 = queue_.pop();
  ASSERT_TRUE(r0 && r1);
  EXPECT_FALSE(queue_.pop().has_value());
  // Empty: the device asks to be kicked when entry 2 is published.
  EXPECT_EQ(ring_.availEvent(), 2);
  EXPECT_EQ(ring_.usedFlags(), 0) << "EVENT_IDX must not use VRING_USED_F_NO_NOTIFY";

  // The first interrupt is always sent (nothing signalled before).
  queue_.complete(*r0, 0);
  EXPECT_TRUE(queue_.notifyIfNeeded());
  EXPECT_EQ(drain(call_.get()), 1u);

  // The driver wants an interrupt only once used index passes 5 (used_event = 4).
  ring_.setUsedEvent(4);
  queue_.complete(*r1, 0);  // used index 1 -> 2
  EXPECT_FALSE(queue_.notifyIfNeeded());
  EXPECT_EQ(drain(call_.get()), 0u);

  ring_.publish(2);
  ring_.publish(3);
  auto r2 = queue_.pop();
  auto r3 = queue_.pop();
  ASSERT_TRUE(r2 && r3);
  // Busy: avail_event stays where it was, so the driver does not kick for entry 3.
  EXPECT_EQ(ring_.availEvent(), 2);
  EXPECT_FALSE(queue_.pop().has_value());
  EXPECT_EQ(ring_.availEvent(), 4);
  queue_.complete(*r2, 0);  // used 3
  queue_.complete(*r3, 0);  // used 4
  EXPECT_FALSE(queue_.notifyIfNeeded()) << "used index 4 has not passed used_event 4 yet";
  // One more completion crosses used_event.
  ring_.publish(0);
  auto r4 = queue_.pop();
  ASSERT_TRUE(r4);
  queue_.complete(*r4, 0);  // used 5: crossed 4
  EXPECT_TRUE(queue_.notifyIfNeeded());
  EXPECT_EQ(drain(call_.get()), 1u);
}

TEST_F(VirtqueueTest, AFullBlockingCallFdDoesNotHang) {
  start();
  int pipeFds[2];
  ASSERT_EQ(::pipe(pipeFds), 0);
  UniqueFd readEnd(pipeFds[0]);
  // Fill the pipe, then make it blocking again: a write to it would now block forever.
  ASSERT_EQ(::fcntl(pipeFds[1], F_SETFL, O_NONBLOCK), 0);
  std::vector<char> junk(4096, 'x');
  while (::write(pipeFds[1], junk.data(), junk.size()) > 0) {
  }
  ASSERT_EQ(::fcntl(pipeFds[1], F_SETFL, 0), 0);
  queue_.setCallFd(UniqueFd(pipeFds[1]));
  ring_.setDescriptor(0, guest_.allocate(4), 4, 0);
  ring_.publish(0);
  auto request = queue_.pop();
  ASSERT_TRUE(request);
  queue_.complete(*request, 0);
  EXPECT_TRUE(queue_.notifyIfNeeded());  // decided to notify, skipped the write, returned
}

TEST_F(VirtqueueTest, StopReturnsTheBaseAndARestartContinues) {
  start();
  uint64_t data = guest_.allocate(4);
  ring_.setDescriptor(0, data, 4, 0);
  for (int i = 0; i < 3; ++i) ring_.publish(0);
  for (int i = 0; i < 3; ++i) {
    auto r = queue_.pop();
    ASSERT_TRUE(r);
    queue_.complete(*r, 0);
  }
  EXPECT_EQ(queue_.stop(), 3);
  EXPECT_FALSE(queue_.started());
  EXPECT_FALSE(queue_.pop().has_value());

  Virtqueue restarted(0, nullLogger());
  restarted.setSize(kSize);
  restarted.setAddresses(ring_.address(0));
  restarted.setBase(3);
  restarted.start(map_);
  EXPECT_FALSE(restarted.pop().has_value());
  ring_.publish(0);
  auto r = restarted.pop();
  ASSERT_TRUE(r);
  restarted.complete(*r, 0);
  EXPECT_EQ(ring_.usedIndex(), 4);
}

TEST_F(VirtqueueTest, BadSizesAreRejected) {
  EXPECT_THROW(queue_.setSize(0), Error);
  EXPECT_THROW(queue_.setSize(3), Error);
  EXPECT_THROW(queue_.setSize(65536), Error);
  EXPECT_NO_THROW(queue_.setSize(32768));
  EXPECT_THROW(queue_.setBase(0x10000), Error);
}

TEST_F(VirtqueueTest, RingsOutsideMemoryAreRejectedAtStart) {
  queue_.setSize(kSize);
  VringAddress address = ring_.address(0);
  address.used = guest_.userBase() + guest_.size() - 8;  // the used ring would run off the end
  queue_.setAddresses(address);
  EXPECT_THROW(queue_.start(map_), Error);
  address = ring_.address(0);
  address.descriptor += 1;  // misaligned
  queue_.setAddresses(address);
  EXPECT_THROW(queue_.start(map_), Error);
}

TEST_F(VirtqueueTest, AMemoryTableWithoutTheRingsBreaksTheQueue) {
  start();
  UniqueFd other(::memfd_create("other", MFD_CLOEXEC));
  ASSERT_EQ(::ftruncate(other.get(), 0x1000), 0);
  std::vector<UniqueFd> files;
  files.push_back(std::move(other));
  MemoryRegion region{0x100000, 0x1000, 0x1000, 0};
  map_.setTable(std::span<const MemoryRegion>(&region, 1), std::move(files));
  expectBroken("memory table change");
}

TEST(InflightTest, RequestsInFlightAreResubmittedAfterARestart) {
  constexpr uint16_t kSize = 8;
  TestGuestMemory guest(1 << 20, 0x100000);
  TestRing ring(guest, kSize);
  GuestMemoryMap map = guest.mapForBackend();
  std::vector<uint8_t> area(inflightQueueBytes(kSize), 0);
  auto* region = reinterpret_cast<uint8_t*>(::mmap(nullptr, area.size(), PROT_READ | PROT_WRITE,
                                                   MAP_SHARED | MAP_ANONYMOUS, -1, 0));
  ASSERT_NE(region, MAP_FAILED);
  std::span<uint8_t> inflight(region, area.size());

  uint64_t data = guest.allocate(4);
  for (uint16_t i = 0; i < 4; ++i) ring.setDescriptor(i, data, 4, 0);
  {
    Virtqueue queue(0, nullLogger());
    queue.setSize(kSize);
    queue.setAddresses(ring.address(0));
    queue.setInflightRegion(inflight);
    queue.start(map);
    ring.publish(2);
    ring.publish(0);
    ring.publish(3);
    auto a = queue.pop();
    auto b = queue.pop();
    auto c = queue.pop();
    ASSERT_TRUE(a && b && c);
    queue.complete(*b, 0);  // head 0 done; heads 2 and 3 still in flight
    // The back-end "crashes" here.
  }
  Virtqueue queue(0, nullLogger());
  queue.setSize(kSize);
  queue.setAddresses(ring.address(0));
  queue.setBase(1);  // what a front-end that lost the back-end sends: the used index
  queue.setInflightRegion(inflight);
  queue.start(map);
  EXPECT_EQ(queue.pendingResubmissions(), 2u);
  EXPECT_EQ(queue.lastAvailIndex(), 3) << "used (1) + in flight (2)";
  auto first = queue.pop();
  auto second = queue.pop();
  ASSERT_TRUE(first && second);
  EXPECT_EQ(first->head(), 2);  // in the order they were first taken
  EXPECT_EQ(second->head(), 3);
  EXPECT_FALSE(queue.pop().has_value());
  queue.complete(*first, 0);
  queue.complete(*second, 0);
  EXPECT_EQ(ring.usedIndex(), 3);
  ::munmap(region, area.size());
}

TEST(InflightTest, APublishedButUnretiredBatchIsNotResubmitted) {
  constexpr uint16_t kSize = 4;
  TestGuestMemory guest(1 << 20, 0x100000);
  TestRing ring(guest, kSize);
  GuestMemoryMap map = guest.mapForBackend();
  std::vector<uint8_t> region(inflightQueueBytes(kSize) + 64, 0);
  // 8-byte alignment for the header.
  auto* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(region.data()) + 63) & ~uintptr_t{63});
  std::span<uint8_t> inflight(base, inflightQueueBytes(kSize));
  uint64_t data = guest.allocate(4);
  ring.setDescriptor(1, data, 4, 0);
  {
    Virtqueue queue(0, nullLogger());
    queue.setSize(kSize);
    queue.setAddresses(ring.address(0));
    queue.setInflightRegion(inflight);
    queue.start(map);
    ring.publish(1);
    auto r = queue.pop();
    ASSERT_TRUE(r);
    queue.complete(*r, 0);
  }
  // Simulate a crash between publishing the used index and retiring the batch: the
  // descriptor still says in flight and used_idx lags behind the ring.
  InflightQueueHeader header;
  std::memcpy(&header, inflight.data(), sizeof(header));
  header.usedIndex = 0;
  std::memcpy(inflight.data(), &header, sizeof(header));
  InflightDescriptorState state;
  std::memcpy(&state, inflight.data() + 16 + 16 * 1, sizeof(state));
  state.inflight = 1;
  std::memcpy(inflight.data() + 16 + 16 * 1, &state, sizeof(state));

  Virtqueue queue(0, nullLogger());
  queue.setSize(kSize);
  queue.setAddresses(ring.address(0));
  queue.setInflightRegion(inflight);
  queue.start(map);
  EXPECT_EQ(queue.pendingResubmissions(), 0u);
  EXPECT_EQ(queue.lastAvailIndex(), 1);
}

}  // namespace
}  // namespace clonevm::ipc::vhost
