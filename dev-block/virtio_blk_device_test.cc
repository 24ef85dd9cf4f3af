// The virtio-blk device end to end inside one process: our vhost-user front-end drives the
// back-end library serving VirtioBlkDevice over a FakeImage, with the test as the guest
// driver. Reads and writes go through the real io_uring path.

#include "dev-block/virtio_blk_device.h"

#include <poll.h>
#include <sys/eventfd.h>

#include <thread>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "dev-block/test_block.h"
#include "ipc/vhost-user/frontend.h"

namespace clonevm::block {
namespace {

using ipc::vhost::bit;
using ipc::vhost::Frontend;
using ipc::vhost::FrontendOptions;
using ipc::vhost::MemoryRegionSpec;
using ipc::vhost::VhostUserBackend;
using ipc::vhost::testing::TestGuestMemory;
using ipc::vhost::testing::TestRing;
using testing::blkHeader;
using testing::blkSegment;
using testing::ChainBuffer;
using testing::FakeImage;
using testing::publishChain;

constexpr auto kTimeout = std::chrono::milliseconds(5000);
constexpr uint64_t kImageBytes = 1 << 20;

std::vector<uint8_t> pattern(size_t length, uint8_t seed) {
  std::vector<uint8_t> bytes(length);
  for (size_t i = 0; i < length; ++i) bytes[i] = static_cast<uint8_t>(seed + i * 7);
  return bytes;
}

class BlkDeviceTest : public ::testing::Test {
 protected:
  void start(bool readOnlyOption = false, bool readOnlyImage = false, uint64_t features = ~0ull) {
    image_ = std::make_unique<FakeImage>(kImageBytes, readOnlyImage);
    log_ = std::make_shared<spdlog::logger>("blk-test", std::make_shared<spdlog::sinks::null_sink_mt>());
    BlkDeviceOptions options;
    options.readOnly = readOnlyOption;
    options.serial = "disk-serial-1";
    options.queues = 2;
    device_ = std::make_unique<VirtioBlkDevice>(*image_, options, *log_);
    backend_ = std::make_unique<VhostUserBackend>(*device_, *log_);
    auto [ours, theirs] = ipc::vhost::makeSocketPair();
    thread_ = std::thread([this, fd = theirs.release()] { backend_->serveFd(UniqueFd(fd)); });
    frontend_ = std::make_unique<Frontend>(std::move(ours), "clone-block", FrontendOptions{kTimeout});
    offered_ = frontend_->getFeatures();
    frontend_->setFeatures(offered_ & features);
    frontend_->setProtocolFeatures(frontend_->getProtocolFeatures());
    frontend_->setOwner();
    auto spec = guest_.spec();
    frontend_->setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
    frontend_->setVringNum(0, ring_.size());
    frontend_->setVringBase(0, 0);
    frontend_->setVringAddr(0, ring_.addresses());
    frontend_->setVringCall(0, call_.get());
    frontend_->setVringKick(0, kick_.get());
    frontend_->setVringEnable(0, true);
  }

  void TearDown() override {
    frontend_.reset();  // disconnect: the back-end returns from serveFd
    if (thread_.joinable()) thread_.join();
  }

  ChainBuffer readable(const std::vector<uint8_t>& bytes) {
    return {guest_.put(bytes), static_cast<uint32_t>(bytes.size()), false};
  }
  ChainBuffer writable(uint32_t length) { return {guest_.allocate(length), length, true}; }

  // Publishes a request, kicks, and waits until the device has put it on the used ring.
  // Returns the status byte (the last byte of the last writable buffer).
  uint8_t run(const std::vector<ChainBuffer>& chain) {
    uint16_t before = ring_.usedIndex();
    publishChain(ring_, head_, chain);
    head_ = static_cast<uint16_t>((head_ + chain.size()) % ring_.size());
    uint64_t one = 1;
    EXPECT_EQ(::write(kick_.get(), &one, 8), 8);
    for (int i = 0; i < 500 && ring_.usedIndex() == before; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    EXPECT_EQ(ring_.usedIndex(), static_cast<uint16_t>(before + 1)) << "request not completed";
    lastUsed_ = ring_.usedElement(before);
    const ChainBuffer& last = chain.back();
    return last.writable ? guest_.get(last.guestAddress + last.length - 1, 1)[0] : 0xff;
  }

  uint8_t write(uint64_t sector, const std::vector<uint8_t>& data) {
    return run({readable(blkHeader(blk::kTypeOut, sector)), readable(data), writable(1)});
  }
  // Reads into two buffers (to exercise scatter) and returns the bytes.
  std::pair<uint8_t, std::vector<uint8_t>> read(uint64_t sector, uint32_t length) {
    ChainBuffer a = writable(length / 2), b = writable(length - length / 2);
    uint8_t status = run({readable(blkHeader(blk::kTypeIn, sector)), a, b, writable(1)});
    auto bytes = guest_.get(a.guestAddress, a.length);
    auto rest = guest_.get(b.guestAddress, b.length);
    bytes.insert(bytes.end(), rest.begin(), rest.end());
    return {status, bytes};
  }

  TestGuestMemory guest_{8 << 20, 0x100000};
  TestRing ring_{guest_, 64};
  UniqueFd kick_{::eventfd(0, EFD_CLOEXEC)};
  UniqueFd call_{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  std::unique_ptr<FakeImage> image_;
  std::shared_ptr<spdlog::logger> log_;
  std::unique_ptr<VirtioBlkDevice> device_;
  std::unique_ptr<VhostUserBackend> backend_;
  std::unique_ptr<Frontend> frontend_;
  std::thread thread_;
  uint64_t offered_ = 0;
  uint16_t head_ = 0;
  std::pair<uint32_t, uint32_t> lastUsed_;
};

TEST_F(BlkDeviceTest, FeaturesAndConfigSpace) {
  start();
  for (unsigned f : {blkfeature::kSegMax, blkfeature::kBlkSize, blkfeature::kFlush,
                     blkfeature::kMq, blkfeature::kDiscard, blkfeature::kWriteZeroes}) {
    EXPECT_TRUE(ipc::vhost::hasBit(offered_, f)) << f;
  }
  EXPECT_FALSE(ipc::vhost::hasBit(offered_, blkfeature::kReadOnly));
  auto bytes = frontend_->getConfig(0, sizeof(VirtioBlkConfig));
  ASSERT_EQ(bytes.size(), 60u);
  VirtioBlkConfig config;
  std::memcpy(&config, bytes.data(), sizeof(config));
  EXPECT_EQ(config.capacity, kImageBytes / 512);
  EXPECT_EQ(config.blkSize, 512u);
  EXPECT_EQ(config.segMax, VirtioBlkDevice::kSegMax);
  EXPECT_EQ(config.numQueues, 2);
  EXPECT_EQ(config.maxDiscardSectors, VirtioBlkDevice::kMaxDiscardSectors);
  EXPECT_EQ(config.maxDiscardSeg, VirtioBlkDevice::kMaxDiscardSegments);
  EXPECT_EQ(config.discardSectorAlignment, FakeImage::kCluster / 512);
  EXPECT_EQ(config.maxWriteZeroesSectors, VirtioBlkDevice::kMaxDiscardSectors);
  EXPECT_EQ(config.maxWriteZeroesSeg, VirtioBlkDevice::kMaxDiscardSegments);
  EXPECT_EQ(config.writeZeroesMayUnmap, 1);
  EXPECT_EQ(frontend_->getQueueNum(), 2u);
}

TEST_F(BlkDeviceTest, WriteThenReadThroughEveryExtentKind) {
  start();
  // Clusters 1 (zero) and 2 (buffer) are mapped differently by the fake image.
  image_->fill(0, pattern(4 * 4096, 3));
  image_->zeroClusters = {1};
  image_->bufferClusters = {2};
  auto [status, bytes] = read(4, 3 * 4096);  // from byte 2048: file, zero, buffer, file
  EXPECT_EQ(status, blk::kStatusOk);
  auto expected = pattern(4 * 4096, 3);
  std::fill(expected.begin() + 4096, expected.begin() + 8192, 0);
  EXPECT_EQ(bytes, std::vector<uint8_t>(expected.begin() + 2048, expected.begin() + 2048 + 3 * 4096));
  EXPECT_EQ(lastUsed_.second, 3 * 4096u + 1) << "data and status written";

  auto data = pattern(8192, 42);
  EXPECT_EQ(write(100, data), blk::kStatusOk);
  EXPECT_EQ(image_->bytes(100 * 512, 8192), data);
  auto [status2, back] = read(100, 8192);
  EXPECT_EQ(status2, blk::kStatusOk);
  EXPECT_EQ(back, data);
  EXPECT_EQ(device_->stats(0).bytesWritten, 8192u);
  EXPECT_EQ(device_->stats(0).bytesRead, 3 * 4096u + 8192u);
  EXPECT_EQ(device_->stats(0).requests, 3u);
  EXPECT_EQ(device_->stats(0).errors, 0u);
}

TEST_F(BlkDeviceTest, FlushGetIdDiscardAndWriteZeroes) {
  start();
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeFlush, 0)), writable(1)}), blk::kStatusOk);
  EXPECT_EQ(image_->flushes, 1);

  ChainBuffer id = writable(20);
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeGetId, 0)), id, writable(1)}), blk::kStatusOk);
  auto serial = guest_.get(id.guestAddress, 20);
  EXPECT_EQ(std::string(serial.begin(), serial.begin() + 13), "disk-serial-1");
  EXPECT_EQ(serial[13], 0);

  EXPECT_EQ(run({readable(blkHeader(blk::kTypeDiscard, 0)), readable(blkSegment(8, 16, 0)),
                 writable(1)}),
            blk::kStatusOk);
  ASSERT_EQ(image_->discards.size(), 1u);
  EXPECT_EQ(image_->discards[0].offset, 4096u);
  EXPECT_EQ(image_->discards[0].length, 8192u);

  image_->fill(0, pattern(4096, 1));
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeWriteZeroes, 0)),
                 readable(blkSegment(0, 8, blk::kWriteZeroesFlagUnmap)), writable(1)}),
            blk::kStatusOk);
  ASSERT_EQ(image_->zeroWrites.size(), 1u);
  EXPECT_TRUE(image_->zeroWrites[0].unmap);
  EXPECT_EQ(image_->bytes(0, 4096), std::vector<uint8_t>(4096, 0));
}

TEST_F(BlkDeviceTest, DiscardIsUnsupportedUnlessNegotiated) {
  start(false, false, ~bit(blkfeature::kDiscard));
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeDiscard, 0)), readable(blkSegment(0, 8, 0)),
                 writable(1)}),
            blk::kStatusUnsupported);
  EXPECT_TRUE(image_->discards.empty());
}

TEST_F(BlkDeviceTest, ReadOnlyOptionOffersRoAndRefusesWrites) {
  start(true);
  EXPECT_TRUE(ipc::vhost::hasBit(offered_, blkfeature::kReadOnly));
  image_->fill(0, pattern(512, 9));
  EXPECT_EQ(write(0, pattern(512, 1)), blk::kStatusIoErr);
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeWriteZeroes, 0)), readable(blkSegment(0, 1, 0)),
                 writable(1)}),
            blk::kStatusIoErr);
  EXPECT_EQ(image_->bytes(0, 512), pattern(512, 9));
  EXPECT_EQ(read(0, 512).second, pattern(512, 9));
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeFlush, 0)), writable(1)}), blk::kStatusOk);
  EXPECT_EQ(image_->flushes, 0) << "nothing to flush on a read-only disk";
  EXPECT_EQ(device_->stats(0).errors, 2u);
}

TEST_F(BlkDeviceTest, ReadOnlyImageMakesTheDeviceReadOnly) {
  start(false, true);
  EXPECT_TRUE(ipc::vhost::hasBit(offered_, blkfeature::kReadOnly));
  EXPECT_EQ(write(0, pattern(512, 1)), blk::kStatusIoErr);
}

TEST_F(BlkDeviceTest, HostileRequestsGetAStatusAndTheQueueKeepsWorking) {
  start();
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeIn, kImageBytes / 512)), writable(513)}),
            blk::kStatusIoErr);
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeIn, ~uint64_t{0})), writable(513)}),
            blk::kStatusIoErr);
  EXPECT_EQ(run({readable(blkHeader(blk::kTypeOut, 0)), readable(pattern(100, 1)), writable(1)}),
            blk::kStatusIoErr);
  EXPECT_EQ(run({readable(blkHeader(77, 0)), writable(1)}), blk::kStatusUnsupported);
  EXPECT_EQ(run({readable({1, 2}), writable(1)}), blk::kStatusIoErr);
  // No status byte at all: completed with nothing written.
  run({readable(blkHeader(blk::kTypeFlush, 0))});
  EXPECT_EQ(lastUsed_.second, 0u);
  // A failing image is an I/O error, not a crash.
  image_->failMaps = true;
  EXPECT_EQ(read(0, 512).first, blk::kStatusIoErr);
  EXPECT_EQ(write(0, pattern(512, 1)), blk::kStatusIoErr);
  image_->failMaps = false;
  EXPECT_EQ(write(0, pattern(512, 5)), blk::kStatusOk);
  EXPECT_EQ(read(0, 512).second, pattern(512, 5));
  EXPECT_EQ(device_->stats(0).errors, 8u);
}

TEST_F(BlkDeviceTest, GetVringBaseWaitsForRequestsInFlight) {
  start();
  // Many writes at once, then stop the queue at once: every one is on the used ring when
  // GET_VRING_BASE answers, so the front-end can hand the queue on.
  for (int i = 0; i < 16; ++i) {
    publishChain(ring_, head_, {readable(blkHeader(blk::kTypeOut, i * 16)),
                                readable(pattern(8192, static_cast<uint8_t>(i))), writable(1)});
    head_ = static_cast<uint16_t>(head_ + 3);
  }
  uint64_t one = 1;
  ASSERT_EQ(::write(kick_.get(), &one, 8), 8);
  // Taken from the ring (the I/O may still run), then stopped.
  for (int i = 0; i < 1000 && device_->stats(0).requests < 16; ++i) std::this_thread::yield();
  ASSERT_EQ(device_->stats(0).requests, 16u);
  EXPECT_EQ(frontend_->getVringBase(0), 16u);
  EXPECT_EQ(ring_.usedIndex(), 16);
  EXPECT_EQ(device_->inFlight(), 0u);
  for (int i = 0; i < 16; ++i) {
    EXPECT_EQ(image_->bytes(i * 16 * 512, 8192), pattern(8192, static_cast<uint8_t>(i)));
  }
}

}  // namespace
}  // namespace clonevm::block
