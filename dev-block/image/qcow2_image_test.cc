// qcow2 images made by hand (createQcow2 plus patched bytes): mapping, and refusal of bad input.

#include "dev-block/image/qcow2_image.h"

#include <gtest/gtest.h>

#include <random>

#include "common/error.h"
#include "dev-block/image/image_test_util.h"
#include "dev-block/image/open_image.h"
#include "dev-block/image/qcow2_create.h"

namespace clonevm::block {
namespace {

std::string errorOf(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::unique_ptr<BlockImage> open(const std::string& path, bool readOnly = false) {
  return openImage({path, ImageFormat::kQcow2, readOnly});
}

// An image with 64 KiB clusters whose first guest cluster is allocated; returns the L1 and
// first L2 table offsets.
struct Layout {
  uint64_t l1;
  uint64_t l2;
  uint64_t data;
};
Layout makeImage(const std::string& path, uint64_t size = 8 << 20) {
  createQcow2(path, {.size = size});
  {
    auto image = open(path);
    test::writeImage(*image, 0, std::vector<uint8_t>(100, 0xaa));
  }
  auto bytes = test::readFile(path);
  Layout l;
  l.l1 = loadBe64(&bytes[40]);
  l.l2 = loadBe64(&bytes[l.l1]) & 0x00fffffffffffe00ull;
  l.data = loadBe64(&bytes[l.l2]) & 0x00fffffffffffe00ull;
  return l;
}

void patch64(const std::string& path, uint64_t at, uint64_t value) {
  auto bytes = test::readFile(path);
  storeBe64(&bytes[at], value);
  test::writeFile(path, bytes);
}

TEST(Qcow2Image, ContiguousClustersMapToOneExtent) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  createQcow2(path, {.size = 8 << 20});
  auto image = open(path);
  std::vector<ImageExtent> extents;
  image->mapWrite(0, 1 << 20, extents);  // 16 clusters allocated one after another
  ASSERT_EQ(extents.size(), 1u);
  EXPECT_EQ(extents[0].length, 1u << 20);
  const uint64_t written = extents[0].fileOffset;
  extents.clear();
  image->mapRead(4096, 900000, extents);
  ASSERT_EQ(extents.size(), 1u);
  EXPECT_EQ(extents[0].kind, ImageExtent::Kind::kFile);
  extents.clear();
  image->mapRead(2 << 20, 1 << 20, extents);  // unallocated, no backing
  ASSERT_EQ(extents.size(), 1u);
  EXPECT_EQ(extents[0].kind, ImageExtent::Kind::kZero);
  // Rewriting allocated clusters maps to the same place and changes no metadata.
  auto before = test::readFile(path);
  std::vector<ImageExtent> again;
  image->mapWrite(0, 1 << 20, again);
  ASSERT_EQ(again.size(), 1u);
  EXPECT_EQ(again[0].fileOffset, written);
  EXPECT_EQ(test::readFile(path), before);
}

TEST(Qcow2Image, L2EntryOutsideTheFileFailsTheRequest) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  Layout l = makeImage(path);
  patch64(path, l.l2 + 8, (1ull << 63) | (1ull << 40));  // guest cluster 1 -> 1 TiB
  auto image = open(path);
  std::vector<ImageExtent> extents;
  EXPECT_NO_THROW(image->mapRead(0, 65536, extents));  // other clusters still work
  std::string error = errorOf([&] { image->mapRead(65536, 512, extents); });
  EXPECT_NE(error.find("outside the file"), std::string::npos) << error;
  error = errorOf([&] { image->mapWrite(65536, 512, extents); });
  EXPECT_NE(error.find("outside the file"), std::string::npos) << error;
}

TEST(Qcow2Image, L2EntryIntoMetadataFailsTheRequest) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  Layout l = makeImage(path);
  for (uint64_t target : {uint64_t{0}, l.l1, l.l2, uint64_t{65536} /* refcount table */}) {
    patch64(path, l.l2 + 16, (1ull << 63) | target | (target == 0 ? 0 : 0));
    if (target == 0) continue;  // host offset 0 means unallocated, which is fine
    auto image = open(path);
    std::vector<ImageExtent> extents;
    std::string error = errorOf([&] { image->mapWrite(2 * 65536, 512, extents); });
    EXPECT_NE(error.find("overlaps image metadata"), std::string::npos) << error;
    EXPECT_TRUE(extents.empty());
  }
  patch64(path, l.l2 + 24, (1ull << 63) | l.data | 0x100);  // reserved bit
  auto image = open(path);
  std::vector<ImageExtent> extents;
  EXPECT_NE(errorOf([&] { image->mapRead(3 * 65536, 1, extents); }).find("reserved"), std::string::npos);
}

TEST(Qcow2Image, BadL1EntryFailsTheRequest) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  Layout l = makeImage(path, 2ull << 30);  // 4 L1 entries
  patch64(path, l.l1 + 8, 1ull << 45);
  patch64(path, l.l1 + 16, l.l1);
  auto image = open(path);
  std::vector<ImageExtent> extents;
  EXPECT_NO_THROW(image->mapRead(0, 4096, extents));
  EXPECT_NE(errorOf([&] { image->mapRead(512 << 20, 1, extents); }).find("outside the file"), std::string::npos);
  EXPECT_NE(errorOf([&] { image->mapWrite(1024ull << 20, 1, extents); }).find("overlaps"), std::string::npos);
}

TEST(Qcow2Image, RefusedAtOpen) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  Layout l = makeImage(path);
  auto original = test::readFile(path);
  auto refused = [&](uint64_t at, uint64_t value, int width, const std::string& expected, bool readOnly) {
    auto bytes = original;
    if (width == 8) storeBe64(&bytes[at], value); else storeBe32(&bytes[at], static_cast<uint32_t>(value));
    test::writeFile(path, bytes);
    std::string error = errorOf([&] { open(path, readOnly); });
    if (expected.empty()) {
      EXPECT_EQ(error, "");  // opens
    } else {
      EXPECT_NE(error.find(expected), std::string::npos) << "expected '" << expected << "', got '" << error << "'";
    }
  };
  refused(40, l.l1 + 512, 8, "L1 table offset", true);           // unaligned
  refused(40, 1ull << 40, 8, "L1 table", true);                   // outside the file
  refused(36, 0, 4, "too small", true);                           // l1_size 0 for 8 MiB
  refused(48, 1ull << 40, 8, "refcount table", true);
  refused(56, 1u << 30, 4, "refcount table size", true);
  refused(20, 30, 4, "cluster_bits 30", true);
  refused(96, 9, 4, "refcount_order 9", true);
  refused(72, 1ull << 9, 8, "unknown incompatible features: bit 9", true);
  refused(72, kQcow2IncompatDirty, 8, "qemu-img check -r all", false);
  refused(72, kQcow2IncompatCorrupt, 8, "marked corrupt", false);
  storeBe64(&original[64], l.data);  // internal snapshots (a table offset, then the count)
  refused(60, 1, 4, "read-only", false);
  refused(60, 1, 4, "", true);
  storeBe64(&original[64], 0);
  refused(l.l1 + 0, 0, 8, "", true);      // an empty L1 entry is fine
  // Unknown autoclear bits are cleared by a read-write open.
  auto bytes = original;
  storeBe64(&bytes[kQcow2AutoclearFeaturesField], 0x8001);
  test::writeFile(path, bytes);
  open(path, true);
  EXPECT_EQ(loadBe64(&test::readFile(path)[kQcow2AutoclearFeaturesField]), 0x8001u);
  open(path, false);
  EXPECT_EQ(loadBe64(&test::readFile(path)[kQcow2AutoclearFeaturesField]), 0u);
}

TEST(Qcow2Image, NeverAllocatesAMetadataCluster) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  createQcow2(path, {.size = 8 << 20});  // header, refcount table, refcount block, L1
  auto bytes = test::readFile(path);
  const uint64_t block = loadBe64(&bytes[65536]);
  const uint64_t l1Cluster = loadBe64(&bytes[40]) / 65536;
  storeBe16(&bytes[block + l1Cluster * 2], 0);  // the L1 table's refcount, corrupted to 0
  test::writeFile(path, bytes);
  auto image = open(path);
  std::vector<ImageExtent> extents;
  std::string error = errorOf([&] { image->mapWrite(0, 4096, extents); });
  EXPECT_NE(error.find("holds metadata"), std::string::npos) << error;
  EXPECT_EQ(test::readFile(path).size(), bytes.size());
  EXPECT_EQ(loadBe64(&test::readFile(path)[l1Cluster * 65536]), 0u);  // L1 untouched
}

TEST(Qcow2Image, ReadOnlyRefusesChanges) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  makeImage(path);
  auto image = open(path, true);
  std::vector<ImageExtent> extents;
  EXPECT_THROW(image->mapWrite(0, 1, extents), Error);
  EXPECT_THROW(image->discard(0, 65536), Error);
  EXPECT_THROW(image->writeZeroes(0, 65536, true), Error);
}

TEST(Qcow2Image, ZeroesAndDiscardWithoutBacking) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2");
  createQcow2(path, {.size = 1 << 20, .clusterBits = 12});
  auto image = open(path);
  test::writeImage(*image, 0, std::vector<uint8_t>(1 << 20, 0x5c));
  image->writeZeroes(1000, 10000, false);   // partial + whole clusters, kept allocated
  image->writeZeroes(100000, 20000, true);  // unmapped
  image->discard(500000, 100000);
  auto data = test::readImage(*image);
  for (uint64_t i = 0; i < data.size(); ++i) {
    bool zero = (i >= 1000 && i < 11000) || (i >= 100000 && i < 120000) ||
                (i >= 503808 && i < 598016);  // discard: whole 4 KiB clusters only
    ASSERT_EQ(data[i], zero ? 0 : 0x5c) << "byte " << i;
  }
}

}  // namespace
}  // namespace clonevm::block

namespace clonevm::block {
namespace {

// Random corruption of the metadata of a small image: opening, reading and writing must either
// work or fail with clonevm::Error, never crash (run it under CLONE_SANITIZE too).
TEST(Qcow2Image, SurvivesRandomMetadataCorruption) {
  test::ScratchDir dir;
  std::string path = dir.file("a.qcow2"), base = dir.file("base.raw");
  test::writeFile(base, std::vector<uint8_t>(256 << 10, 0x11));
  createQcow2(path, {.size = 1 << 20, .clusterBits = 12, .backingFile = "base.raw", .backingFormat = "raw"});
  {
    auto image = openImage({path, ImageFormat::kQcow2, false});
    for (uint64_t off = 0; off < (1 << 20); off += 12288) test::writeImage(*image, off, std::vector<uint8_t>(5000, 0x22));
    image->writeZeroes(500000, 40000, false);
  }
  const auto pristine = test::readFile(path);
  const size_t metadataBytes = 8 * 4096;  // header, refcount table and block, L1, first L2s
  std::mt19937_64 rng(99);
  int opened = 0, refused = 0;
  for (int i = 0; i < 400; ++i) {
    auto bytes = pristine;
    int flips = 1 + static_cast<int>(rng() % 6);
    for (int f = 0; f < flips; ++f) bytes[rng() % std::min(metadataBytes, bytes.size())] = static_cast<uint8_t>(rng());
    test::writeFile(path, bytes);
    try {
      auto image = openImage({path, ImageFormat::kQcow2, (i % 2) == 0});
      ++opened;
      uint64_t length = std::min<uint64_t>(image->virtualSize(), 1 << 20);
      try { test::readImage(*image, 0, length); } catch (const Error&) {}
      if (!image->readOnly() && length > 70000) {
        try { test::writeImage(*image, 4000, std::vector<uint8_t>(9000, 0x33)); } catch (const Error&) {}
        try { image->discard(0, length); } catch (const Error&) {}
        try { image->writeZeroes(60000, 10000, true); } catch (const Error&) {}
      }
    } catch (const Error&) {
      ++refused;
    }
  }
  EXPECT_GT(opened, 0);
  EXPECT_GT(refused, 0);
}

}  // namespace
}  // namespace clonevm::block
