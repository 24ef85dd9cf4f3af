// The request parser against every layout a driver can send, valid or hostile.

#include "dev-block/virtio_blk_request.h"

#include <sys/eventfd.h>

#include <gtest/gtest.h>
#include <spdlog/sinks/null_sink.h>

#include "dev-block/test_block.h"

namespace clonevm::block {
namespace {

using ipc::vhost::Virtqueue;
using ipc::vhost::testing::TestGuestMemory;
using ipc::vhost::testing::TestRing;
using testing::blkHeader;
using testing::blkSegment;
using testing::ChainBuffer;
using testing::publishChain;

spdlog::logger& nullLogger() {
  static auto logger =
      std::make_shared<spdlog::logger>("test", std::make_shared<spdlog::sinks::null_sink_mt>());
  return *logger;
}

class BlkRequestTest : public ::testing::Test {
 protected:
  BlkRequestTest() : ring_(guest_, 64), map_(guest_.mapForBackend()), queue_(0, nullLogger()) {
    queue_.setSize(64);
    queue_.setAddresses(ring_.address(0));
    queue_.setFeatures(ipc::vhost::bit(ipc::vhost::feature::kVersion1));
    queue_.setKickFd(UniqueFd(::eventfd(0, EFD_CLOEXEC)));
    queue_.start(map_);
    limits_.capacitySectors = 2048;  // 1 MiB
    limits_.discard = limits_.writeZeroes = true;
    limits_.maxDiscardSectors = limits_.maxWriteZeroesSectors = 256;
    limits_.maxDiscardSegments = limits_.maxWriteZeroesSegments = 2;
  }

  ParsedBlkRequest parse(const std::vector<ChainBuffer>& buffers) {
    publishChain(ring_, next_, buffers);
    next_ = static_cast<uint16_t>(next_ + buffers.size());
    auto request = queue_.pop();
    EXPECT_TRUE(request.has_value());
    request_ = *request;
    return parseBlkRequest(request_, limits_);
  }
  ChainBuffer readable(const std::vector<uint8_t>& bytes) {
    return {guest_.put(bytes), static_cast<uint32_t>(bytes.size()), false};
  }
  ChainBuffer writable(uint32_t length) { return {guest_.allocate(length), length, true}; }

  TestGuestMemory guest_{1 << 22, 0x100000};
  TestRing ring_;
  ipc::vhost::GuestMemoryMap map_;
  Virtqueue queue_;
  BlkLimits limits_;
  uint16_t next_ = 0;
  ipc::vhost::VirtqueueRequest request_;
};

TEST_F(BlkRequestTest, ReadWithDataSplitAcrossBuffers) {
  auto status = writable(1);
  auto parsed = parse({readable(blkHeader(blk::kTypeIn, 8)), writable(512), writable(1024), status});
  ASSERT_EQ(parsed.op, BlkOp::kRead) << parsed.failReason;
  EXPECT_EQ(parsed.offset, 8 * 512u);
  EXPECT_EQ(parsed.length, 1536u);
  ASSERT_EQ(parsed.data.size(), 2u);
  EXPECT_EQ(parsed.data[1].size(), 1024u);
  ASSERT_EQ(parsed.status.size(), 1u);
  parsed.status[0] = 0x77;  // the back-end's mapping of the same memfd
  EXPECT_EQ(guest_.get(status.guestAddress, 1)[0], 0x77);
}

TEST_F(BlkRequestTest, StatusByteSharesTheLastDataBuffer) {
  // Data and status in one writable buffer of 513 bytes; the header split over two buffers.
  auto header = blkHeader(blk::kTypeIn, 0);
  ChainBuffer data = writable(513);
  auto parsed = parse({readable({header.begin(), header.begin() + 5}),
                       readable({header.begin() + 5, header.end()}), data});
  ASSERT_EQ(parsed.op, BlkOp::kRead) << parsed.failReason;
  EXPECT_EQ(parsed.length, 512u);
  parsed.status[0] = 0x77;
  EXPECT_EQ(guest_.get(data.guestAddress + 512, 1)[0], 0x77);
  parsed.data[0][511] = 0x66;
  EXPECT_EQ(guest_.get(data.guestAddress + 511, 1)[0], 0x66);
}

TEST_F(BlkRequestTest, WriteTakesTheBytesAfterTheHeader) {
  auto header = blkHeader(blk::kTypeOut, 2047);
  std::vector<uint8_t> first(header);
  first.resize(16 + 100, 0xaa);  // header and the first 100 data bytes in one buffer
  auto parsed = parse({readable(first), readable(std::vector<uint8_t>(412, 0xbb)), writable(1)});
  ASSERT_EQ(parsed.op, BlkOp::kWrite) << parsed.failReason;
  EXPECT_EQ(parsed.offset, 2047 * 512u);
  EXPECT_EQ(parsed.length, 512u);
  ASSERT_EQ(parsed.data.size(), 2u);
  EXPECT_EQ(parsed.data[0].size(), 100u);
  EXPECT_EQ(parsed.data[0][0], 0xaa);
}

TEST_F(BlkRequestTest, RangesBeyondTheCapacityAndOverflowAreIoErrors) {
  for (uint64_t sector : {uint64_t{2048}, uint64_t{2047} + 1, ~uint64_t{0}, ~uint64_t{0} / 512,
                          uint64_t{1} << 63}) {
    auto parsed = parse({readable(blkHeader(blk::kTypeIn, sector)), writable(513)});
    EXPECT_EQ(parsed.op, BlkOp::kFailed) << sector;
    EXPECT_EQ(parsed.failStatus, blk::kStatusIoErr);
    EXPECT_EQ(parsed.status.size(), 1u) << "the status can still be reported";
  }
  // Two sectors at the last sector: one too many.
  auto parsed = parse({readable(blkHeader(blk::kTypeOut, 2047)),
                       readable(std::vector<uint8_t>(1024)), writable(1)});
  EXPECT_EQ(parsed.op, BlkOp::kFailed);
}

TEST_F(BlkRequestTest, PartialSectorsShortHeaderAndMissingStatus) {
  auto parsed = parse({readable(blkHeader(blk::kTypeIn, 0)), writable(100), writable(1)});
  EXPECT_EQ(parsed.op, BlkOp::kFailed);
  EXPECT_EQ(parsed.failStatus, blk::kStatusIoErr);

  parsed = parse({readable({1, 2, 3}), writable(1)});
  EXPECT_EQ(parsed.op, BlkOp::kFailed);
  EXPECT_EQ(parsed.failStatus, blk::kStatusIoErr);
  EXPECT_EQ(parsed.status.size(), 1u);

  parsed = parse({readable(blkHeader(blk::kTypeFlush, 0))});  // nowhere to put a status
  EXPECT_EQ(parsed.op, BlkOp::kFailed);
  EXPECT_TRUE(parsed.status.empty());
}

TEST_F(BlkRequestTest, UnknownTypeIsUnsupported) {
  auto parsed = parse({readable(blkHeader(99, 0)), writable(1)});
  EXPECT_EQ(parsed.op, BlkOp::kFailed);
  EXPECT_EQ(parsed.failStatus, blk::kStatusUnsupported);
}

TEST_F(BlkRequestTest, ReadOnlyRefusesWritesDiscardAndWriteZeroesButNotReadsOrFlush) {
  limits_.readOnly = true;
  auto write = parse({readable(blkHeader(blk::kTypeOut, 0)), readable(std::vector<uint8_t>(512)),
                      writable(1)});
  EXPECT_EQ(write.op, BlkOp::kFailed);
  EXPECT_EQ(write.failStatus, blk::kStatusIoErr);
  auto discard = parse({readable(blkHeader(blk::kTypeDiscard, 0)), readable(blkSegment(0, 8, 0)),
                        writable(1)});
  EXPECT_EQ(discard.failStatus, blk::kStatusIoErr);
  EXPECT_EQ(discard.op, BlkOp::kFailed);
  EXPECT_EQ(parse({readable(blkHeader(blk::kTypeIn, 0)), writable(513)}).op, BlkOp::kRead);
  EXPECT_EQ(parse({readable(blkHeader(blk::kTypeFlush, 0)), writable(1)}).op, BlkOp::kFlush);
}

TEST_F(BlkRequestTest, DiscardAndWriteZeroesSegmentsAreChecked) {
  auto header = blkHeader(blk::kTypeWriteZeroes, 0);
  auto segments = blkSegment(8, 16, blk::kWriteZeroesFlagUnmap);
  auto second = blkSegment(100, 256, 0);
  segments.insert(segments.end(), second.begin(), second.end());
  auto parsed = parse({readable(header), readable(segments), writable(1)});
  ASSERT_EQ(parsed.op, BlkOp::kWriteZeroes) << parsed.failReason;
  ASSERT_EQ(parsed.ranges.size(), 2u);
  EXPECT_EQ(parsed.ranges[0].offset, 8 * 512u);
  EXPECT_EQ(parsed.ranges[0].length, 16 * 512u);
  EXPECT_TRUE(parsed.ranges[0].unmap);
  EXPECT_FALSE(parsed.ranges[1].unmap);

  struct Case {
    uint32_t type;
    std::vector<uint8_t> payload;
    uint8_t status;
  };
  auto three = blkSegment(0, 1, 0);
  three.insert(three.end(), three.begin(), three.end());
  three.insert(three.end(), three.begin(), three.begin() + 16);
  std::vector<Case> cases = {
      {blk::kTypeDiscard, blkSegment(0, 8, blk::kWriteZeroesFlagUnmap), blk::kStatusUnsupported},
      {blk::kTypeWriteZeroes, blkSegment(0, 8, 2), blk::kStatusUnsupported},  // reserved flag
      {blk::kTypeDiscard, blkSegment(0, 257, 0), blk::kStatusIoErr},          // over the max
      {blk::kTypeDiscard, blkSegment(2040, 9, 0), blk::kStatusIoErr},         // past the end
      {blk::kTypeDiscard, blkSegment(~uint64_t{0} - 3, 8, 0), blk::kStatusIoErr},  // wraps
      {blk::kTypeDiscard, three, blk::kStatusUnsupported},                    // 3 > 2 segments
      {blk::kTypeDiscard, {1, 2, 3}, blk::kStatusUnsupported},                // not whole
      {blk::kTypeDiscard, {}, blk::kStatusUnsupported},                       // none
  };
  for (const auto& c : cases) {
    std::vector<ChainBuffer> chain = {readable(blkHeader(c.type, 0))};
    if (!c.payload.empty()) chain.push_back(readable(c.payload));
    chain.push_back(writable(1));
    auto result = parse(chain);
    EXPECT_EQ(result.op, BlkOp::kFailed) << result.failReason;
    EXPECT_EQ(result.failStatus, c.status) << result.failReason;
  }
  limits_.discard = false;  // not negotiated
  auto refused = parse({readable(blkHeader(blk::kTypeDiscard, 0)), readable(blkSegment(0, 8, 0)),
                        writable(1)});
  EXPECT_EQ(refused.failStatus, blk::kStatusUnsupported);
}

TEST_F(BlkRequestTest, TooManyDataBuffersAreRefused) {
  limits_.maxDataSegments = 4;
  std::vector<ChainBuffer> chain = {readable(blkHeader(blk::kTypeIn, 0))};
  for (int i = 0; i < 5; ++i) chain.push_back(writable(512));
  chain.push_back(writable(1));
  auto parsed = parse(chain);
  EXPECT_EQ(parsed.op, BlkOp::kFailed);
}

TEST_F(BlkRequestTest, GetIdTakesAtMostTwentyBytes) {
  auto parsed = parse({readable(blkHeader(blk::kTypeGetId, 0)), writable(64), writable(1)});
  ASSERT_EQ(parsed.op, BlkOp::kGetId);
  EXPECT_EQ(parsed.length, 20u);
}

}  // namespace
}  // namespace clonevm::block
