#include "dev-block/image/qcow2_refcounts.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include "common/error.h"
#include "common/unique_fd.h"
#include "dev-block/image/image_test_util.h"
#include "dev-block/image/qcow2_create.h"
#include "dev-block/image/qcow2_header.h"

namespace clonevm::block {
namespace {

struct Opened {
  UniqueFd fd;
  Qcow2Header header;
  std::unique_ptr<Qcow2Refcounts> refcounts;
};

Opened openRefcounts(const std::string& path) {
  Opened o;
  o.fd = UniqueFd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  auto bytes = test::readFile(path);
  bytes.resize(std::max<size_t>(bytes.size(), 1 << 21));
  o.header = Qcow2Header::parse(bytes, path);
  o.refcounts = std::make_unique<Qcow2Refcounts>(
      o.fd.get(), path, o.header.clusterBits, o.header.refcountOrder, o.header.refcountTableOffset,
      o.header.refcountTableClusters, fileSizeOf(o.fd.get(), path));
  o.refcounts->load();
  return o;
}

class RefcountWidth : public testing::TestWithParam<uint32_t> {};

TEST_P(RefcountWidth, AllocateFreeAndLimits) {
  test::ScratchDir dir;
  std::string path = dir.file("r.qcow2");
  const uint32_t order = GetParam();
  createQcow2(path, {.size = 1 << 20, .clusterBits = 9, .refcountOrder = order});
  auto o = openRefcounts(path);
  auto& rc = *o.refcounts;
  // Header, table, block(s), L1: all referenced once; nothing after.
  uint64_t used = 0;
  while (rc.refcount(used) == 1) ++used;
  EXPECT_GE(used, 4u);
  EXPECT_EQ(rc.refcount(used), 0u);

  auto a = rc.allocate();
  EXPECT_EQ(a.offset, used * 512);
  EXPECT_TRUE(a.readsZero);
  EXPECT_EQ(rc.refcount(used), 1u);
  EXPECT_EQ(rc.refcount(used + 1), 0u);
  EXPECT_EQ(rc.refcount(used - 1), 1u);

  // A fresh reader sees what was written through.
  EXPECT_EQ(openRefcounts(path).refcounts->refcount(used), 1u);

  const uint64_t max = rc.maxRefcount();
  EXPECT_EQ(max, order == 6 ? ~0ull : (1ull << (1u << order)) - 1);
  if (order < 6) {
    rc.update(used, static_cast<int64_t>(max - 1));
    EXPECT_EQ(rc.refcount(used), max);
    try {
      rc.update(used, 1);
      ADD_FAILURE() << "overflow accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("overflow"), std::string::npos) << e.what();
    }
    rc.update(used, -static_cast<int64_t>(max - 1));
  }
  rc.release(used);
  EXPECT_EQ(rc.refcount(used), 0u);
  EXPECT_THROW(rc.update(used, -1), Error);
  EXPECT_EQ(rc.allocate().offset, used * 512);  // freed clusters are reused
}

INSTANTIATE_TEST_SUITE_P(Orders, RefcountWidth, testing::Values(0u, 1u, 2u, 3u, 4u, 5u, 6u));

TEST(Qcow2Refcounts, SubByteEntriesArePackedFromTheLowBit) {
  test::ScratchDir dir;
  std::string path = dir.file("r.qcow2");
  createQcow2(path, {.size = 1 << 20, .clusterBits = 9, .refcountOrder = 1});
  auto o = openRefcounts(path);
  uint64_t used = 0;
  while (o.refcounts->refcount(used)) ++used;
  o.refcounts->update(0, 2);  // cluster 0: 1 + 2 = 3 in bits 0-1 of the first byte
  auto bytes = test::readFile(path);
  uint64_t block = loadBe64(&bytes[o.header.refcountTableOffset]);
  EXPECT_EQ(bytes[block] & 0x3, 3);
  EXPECT_EQ((bytes[block] >> 2) & 0x3, 1);
}

TEST(Qcow2Refcounts, TableGrowsAndMoves) {
  test::ScratchDir dir;
  std::string path = dir.file("r.qcow2");
  createQcow2(path, {.size = 64 << 20, .clusterBits = 9, .refcountOrder = 6});
  auto o = openRefcounts(path);
  std::vector<uint64_t> offsets;
  for (int i = 0; i < 20000; ++i) offsets.push_back(o.refcounts->allocate().offset);
  auto reread = openRefcounts(path);
  EXPECT_NE(reread.header.refcountTableOffset, o.header.refcountTableOffset);
  EXPECT_GT(reread.header.refcountTableClusters, 1u);
  for (uint64_t offset : offsets) ASSERT_EQ(reread.refcounts->refcount(offset / 512), 1u);
  std::sort(offsets.begin(), offsets.end());
  EXPECT_TRUE(std::adjacent_find(offsets.begin(), offsets.end()) == offsets.end());
  // No allocation handed out refcount metadata; the new table is in use.
  for (uint64_t offset : offsets) ASSERT_FALSE(reread.refcounts->isRefcountMetadata(offset / 512));
  EXPECT_EQ(reread.refcounts->refcount(reread.header.refcountTableOffset / 512), 1u);
  EXPECT_TRUE(reread.refcounts->isRefcountMetadata(reread.header.refcountTableOffset / 512));
}

}  // namespace
}  // namespace clonevm::block
