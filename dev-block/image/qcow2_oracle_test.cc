// Oracle tests: images made by qemu-img/qemu-io are read through the library and compared with
// `qemu-img convert -O raw`; images written through the library must pass `qemu-img check` and
// `qemu-img compare` against the raw file the test expects.

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "common/error.h"
#include "dev-block/image/image_test_util.h"
#include "dev-block/image/open_image.h"
#include "dev-block/image/qcow2_header.h"
#include "dev-block/image/qcow2_image.h"

namespace clonevm::block {
namespace {

using test::readFile;
using test::readImage;
using test::ScratchDir;
using test::shell;
using test::writeImage;

void run(const std::string& command) {
  std::string output;
  int status = shell(command, &output);
  ASSERT_EQ(status, 0) << command << "\n" << output;
}

// Reads `path` through the library and compares it with qemu-img's raw conversion.
void expectSameAsQemu(const std::string& path, const ScratchDir& dir) {
  std::string raw = dir.file("oracle.raw");
  run(fmt::format("rm -f {0} && qemu-img convert -O raw {1} {0}", raw, path));
  std::vector<uint8_t> expected = readFile(raw);
  auto image = openImage({path, ImageFormat::kAuto, true});
  ASSERT_EQ(image->virtualSize(), expected.size());
  std::vector<uint8_t> actual = readImage(*image);
  auto mismatch = std::mismatch(actual.begin(), actual.end(), expected.begin());
  EXPECT_TRUE(mismatch.first == actual.end())
      << path << ": first difference at byte " << (mismatch.first - actual.begin()) << " ("
      << image->describe() << ")";
}

void expectCheckClean(const std::string& path) {
  std::string output;
  int status = shell("qemu-img check " + path, &output);
  EXPECT_EQ(status, 0) << "qemu-img check " << path << ":\n" << output;
}

void expectEqualsRaw(const std::string& path, const std::string& raw) {
  std::string output;
  int status = shell(fmt::format("qemu-img compare -f qcow2 -F raw {} {}", path, raw), &output);
  EXPECT_EQ(status, 0) << output;
}

struct Geometry {
  std::string compat;  // "0.10" (v2) or "1.1" (v3)
  int clusterSize;
  int refcountBits;
  bool extendedL2 = false;
  bool lazyRefcounts = false;
};

void PrintTo(const Geometry& g, std::ostream* os) {
  *os << "compat=" << g.compat << " cluster=" << g.clusterSize << " refcount_bits=" << g.refcountBits
      << (g.extendedL2 ? " extended_l2" : "") << (g.lazyRefcounts ? " lazy_refcounts" : "");
}

std::string createOptions(const Geometry& g) {
  std::string o = fmt::format("compat={},cluster_size={},refcount_bits={}", g.compat,
                              g.clusterSize, g.refcountBits);
  if (g.extendedL2) o += ",extended_l2=on";
  if (g.lazyRefcounts) o += ",lazy_refcounts=on";
  return o;
}

std::string name(const testing::TestParamInfo<Geometry>& info) {
  const Geometry& g = info.param;
  return fmt::format("v{}_{}b_rc{}{}{}", g.compat == "0.10" ? 2 : 3, g.clusterSize, g.refcountBits,
                     g.extendedL2 ? "_ext" : "", g.lazyRefcounts ? "_lazy" : "");
}

class QemuImageTest : public testing::TestWithParam<Geometry> {};

TEST_P(QemuImageTest, ReadsWhatQemuWrote) {
  ScratchDir dir;
  const Geometry& g = GetParam();
  std::string img = dir.file("img.qcow2");
  run(fmt::format("qemu-img create -q -f qcow2 -o {} {} 8M", createOptions(g), img));
  std::string zeroes = g.compat == "0.10" ? "" : R"( -c "write -z 64k 8k" -c "write -z -u 2M 1M")";
  run(fmt::format(R"(qemu-io -f qcow2 -c "write -P 0xab 0 300k" -c "write -P 0x11 1000 3000" )"
                  R"(-c "write -P 0x5a 2M 1536k" -c "write -P 0x77 7M 5000" {} {})",
                  zeroes, img));
  expectSameAsQemu(img, dir);
}

TEST_P(QemuImageTest, WritesThatQemuAccepts) {
  ScratchDir dir;
  const Geometry& g = GetParam();
  std::string img = dir.file("img.qcow2");
  const uint64_t size = 8 << 20;
  run(fmt::format("qemu-img create -q -f qcow2 -o {} {} {}", createOptions(g), img, size));
  std::vector<uint8_t> expected(size, 0);
  std::mt19937_64 rng(g.clusterSize + g.refcountBits);
  {
    auto image = openImage({img, ImageFormat::kAuto, false});
    for (int i = 0; i < 200; ++i) {
      uint64_t length = 1 + rng() % 20000;
      uint64_t offset = rng() % (size - length);
      auto data = test::randomBytes(rng, length);
      writeImage(*image, offset, data);
      std::copy(data.begin(), data.end(), expected.begin() + offset);
      if (i % 40 == 39) {
        uint64_t zlen = rng() % 300000, zoff = rng() % (size - zlen);
        bool unmap = rng() % 2;
        image->writeZeroes(zoff, zlen, unmap);
        std::fill(expected.begin() + zoff, expected.begin() + zoff + zlen, 0);
      }
      if (i % 50 == 49) {
        // Discard without a backing file reads zeros here (whole clusters only).
        uint64_t dlen = rng() % 300000, doff = rng() % (size - dlen);
        image->discard(doff, dlen);
        uint64_t cs = image->clusterSize();
        uint64_t first = (doff + cs - 1) / cs * cs, end = (doff + dlen) / cs * cs;
        if (first < end) std::fill(expected.begin() + first, expected.begin() + end, 0);
      }
    }
    EXPECT_EQ(readImage(*image), expected);
    image->flush();
  }
  std::string raw = dir.file("expected.raw");
  test::writeFile(raw, expected);
  expectCheckClean(img);
  expectEqualsRaw(img, raw);
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, QemuImageTest,
    testing::Values(Geometry{"0.10", 65536, 16}, Geometry{"1.1", 512, 16},
                    Geometry{"1.1", 4096, 16}, Geometry{"1.1", 65536, 16},
                    Geometry{"1.1", 2 << 20, 16}, Geometry{"1.1", 4096, 1},
                    Geometry{"1.1", 4096, 2}, Geometry{"1.1", 4096, 4},
                    Geometry{"1.1", 4096, 8}, Geometry{"1.1", 4096, 32},
                    Geometry{"1.1", 4096, 64}, Geometry{"1.1", 65536, 16, true},
                    Geometry{"1.1", 32768, 16, true}, Geometry{"1.1", 65536, 16, false, true},
                    Geometry{"0.10", 512, 16}),
    name);

TEST(QemuOracle, BackingChainsOfDepthThree) {
  for (const char* baseFormat : {"raw", "qcow2"}) {
    ScratchDir dir;
    std::string base = dir.file("base.img"), mid = dir.file("mid.qcow2"), top = dir.file("top.qcow2");
    run(fmt::format("qemu-img create -q -f {} {} 6M", baseFormat, base));
    run(fmt::format(R"(qemu-io -f {} -c "write -P 0x01 0 6M" {})", baseFormat, base));
    // Relative backing names: resolved against the image's own directory.
    run(fmt::format("cd {} && qemu-img create -q -f qcow2 -b base.img -F {} mid.qcow2 8M", dir.path(), baseFormat));
    run(fmt::format(R"(qemu-io -f qcow2 -c "write -P 0x02 100k 200k" -c "write -z 1M 128k" {})", mid));
    run(fmt::format("cd {} && qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 -o cluster_size=4096 top.qcow2 8M", dir.path()));
    run(fmt::format(R"(qemu-io -f qcow2 -c "write -P 0x03 150k 10k" -c "write -z 4M 4k" -c "write -P 0x04 7M 64k" {})", top));
    expectSameAsQemu(top, dir);
    auto image = openImage({top, ImageFormat::kAuto, true});
    EXPECT_NE(image->describe().find("backing (qcow2"), std::string::npos) << image->describe();
  }
}

TEST(QemuOracle, CompressedClusters) {
  for (const char* type : {"zlib", "zstd"}) {
    ScratchDir dir;
    std::string raw = dir.file("src.raw"), img = dir.file("c.qcow2");
    run(fmt::format("qemu-img create -q -f raw {} 4M", raw));
    // Compressible text, random data (stored uncompressed) and zeros.
    run(fmt::format("(for i in $(seq 1 20000); do echo line $i of the image; done) | dd of={} conv=notrunc status=none", raw));
    run(fmt::format("dd if=/dev/urandom of={} bs=64k seek=40 count=3 conv=notrunc status=none", raw));
    run(fmt::format("qemu-img convert -c -O qcow2 -o compression_type={} {} {}", type, raw, img));
    expectSameAsQemu(img, dir);
    std::string original = dir.file("src.raw");
    auto image = openImage({img, ImageFormat::kAuto, true});
    EXPECT_EQ(readImage(*image), readFile(original));
    // Writing over a compressed cluster rewrites it uncompressed.
    {
      auto rw = openImage({img, ImageFormat::kAuto, false});
      std::vector<uint8_t> data(1000, 0xee);
      writeImage(*rw, 5000, data);
      auto expected = readFile(original);
      std::copy(data.begin(), data.end(), expected.begin() + 5000);
      test::writeFile(original, expected);
      rw->discard(1 << 20, 1 << 20);  // compressed clusters freed; v3 reads zeros
      std::fill(expected.begin() + (1 << 20), expected.begin() + (2 << 20), 0);
      test::writeFile(original, expected);
    }
    expectCheckClean(img);
    expectEqualsRaw(img, original);
  }
}

TEST(QemuOracle, SubclustersOverBacking) {
  ScratchDir dir;
  std::string base = dir.file("base.raw"), img = dir.file("ext.qcow2");
  run(fmt::format("qemu-img create -q -f raw {} 4M && qemu-io -f raw -c 'write -P 0x33 0 4M' {}", base, base));
  run(fmt::format("qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b {} -F raw {}", base, img));
  run(fmt::format(R"(qemu-io -f qcow2 -c "write -P 0x44 4k 2k" -c "write -z 16k 2k" -c "write -P 0x45 130k 70k" {})", img));
  expectSameAsQemu(img, dir);
  // Our writes into partly allocated clusters keep the other subclusters' backing data.
  std::vector<uint8_t> expected;
  {
    auto image = openImage({img, ImageFormat::kAuto, false});
    expected = readImage(*image);
    std::vector<uint8_t> data(3000, 0x99);
    for (uint64_t off : {uint64_t{1000}, uint64_t{17000}, uint64_t{300000}, uint64_t{(64 << 10) - 500}}) {
      writeImage(*image, off, data);
      std::copy(data.begin(), data.end(), expected.begin() + off);
    }
    image->writeZeroes(1 << 20, 64 << 10, false);
    std::fill(expected.begin() + (1 << 20), expected.begin() + (1 << 20) + (64 << 10), 0);
    EXPECT_EQ(readImage(*image), expected);
  }
  std::string raw = dir.file("expected.raw");
  test::writeFile(raw, expected);
  expectCheckClean(img);
  expectEqualsRaw(img, raw);
}

TEST(QemuOracle, OverlayCopyOnWrite) {
  ScratchDir dir;
  std::string base = dir.file("base.raw"), img = dir.file("overlay.qcow2");
  run(fmt::format("head -c 3M /dev/urandom > {}", base));
  createQcow2Overlay(img, base, ImageFormat::kAuto);
  std::string info;
  ASSERT_EQ(shell("qemu-img info " + img, &info), 0);
  EXPECT_NE(info.find("backing file format: raw"), std::string::npos) << info;
  EXPECT_NE(info.find("virtual size: 3 MiB"), std::string::npos) << info;
  expectCheckClean(img);
  auto expected = readFile(base);
  std::mt19937_64 rng(7);
  {
    auto image = openImage({img, ImageFormat::kAuto, false});
    EXPECT_EQ(readImage(*image), expected);
    for (int i = 0; i < 100; ++i) {
      uint64_t length = 1 + rng() % 9000;
      uint64_t offset = rng() % (expected.size() - length);
      auto data = test::randomBytes(rng, length);
      writeImage(*image, offset, data);
      std::copy(data.begin(), data.end(), expected.begin() + offset);
    }
    image->discard(0, 200 << 10);  // v3 with backing: whole clusters become zero clusters
    std::fill(expected.begin(), expected.begin() + (192 << 10), 0);
    image->writeZeroes(1000000, 300000, true);
    std::fill(expected.begin() + 1000000, expected.begin() + 1300000, 0);
    EXPECT_EQ(readImage(*image), expected);
  }
  std::string raw = dir.file("expected.raw");
  test::writeFile(raw, expected);
  expectCheckClean(img);
  expectEqualsRaw(img, raw);
}

// 512-byte clusters with 64-bit refcounts: one refcount block covers 32 KiB and the first
// table 2 MiB, so filling 24 MiB needs new blocks and several table moves.
TEST(QemuOracle, RefcountTableGrowth) {
  ScratchDir dir;
  std::string img = dir.file("small.qcow2");
  const uint64_t size = 24 << 20;
  run(fmt::format("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 {} {}", img, size));
  std::vector<uint8_t> expected(size, 0);
  std::mt19937_64 rng(3);
  {
    auto image = openImage({img, ImageFormat::kAuto, false});
    for (uint64_t off = 0; off < size; off += 256 << 10) {
      auto data = test::randomBytes(rng, 100 << 10);
      writeImage(*image, off + 7, data);
      std::copy(data.begin(), data.end(), expected.begin() + off + 7);
    }
    image->flush();
  }
  auto header = readFile(img);
  EXPECT_NE(loadBe64(&header[kQcow2RefcountTableOffsetField]), 512u) << "the table never moved";
  std::string raw = dir.file("expected.raw");
  test::writeFile(raw, expected);
  expectCheckClean(img);
  expectEqualsRaw(img, raw);
}

TEST(QemuOracle, DirtyBitAndLazyRefcounts) {
  ScratchDir dir;
  std::string img = dir.file("lazy.qcow2");
  run(fmt::format("qemu-img create -q -f qcow2 -o lazy_refcounts=on {} 4M", img));
  {
    auto image = openImage({img, ImageFormat::kAuto, false});
    writeImage(*image, 0, std::vector<uint8_t>(4096, 1));
    EXPECT_TRUE(loadBe64(&readFile(img)[kQcow2IncompatibleFeaturesField]) & kQcow2IncompatDirty);
  }
  EXPECT_FALSE(loadBe64(&readFile(img)[kQcow2IncompatibleFeaturesField]) & kQcow2IncompatDirty);
  expectCheckClean(img);

  // An image left dirty: read-only is fine, read-write asks for a repair.
  auto bytes = readFile(img);
  bytes[kQcow2IncompatibleFeaturesField + 7] |= kQcow2IncompatDirty;
  test::writeFile(img, bytes);
  EXPECT_NO_THROW(openImage({img, ImageFormat::kAuto, true}));
  try {
    openImage({img, ImageFormat::kAuto, false});
    ADD_FAILURE() << "a dirty image opened read-write";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("qemu-img check -r all"), std::string::npos) << e.what();
  }
  run("qemu-img check -q -r all " + img);
  EXPECT_NO_THROW(openImage({img, ImageFormat::kAuto, false}));
}

TEST(QemuOracle, HeaderExtensionsSurviveWrites) {
  ScratchDir dir;
  std::string img = dir.file("ext.qcow2"), base = dir.file("b.raw");
  run(fmt::format("qemu-img create -q -f raw {} 1M", base));
  run(fmt::format("qemu-img create -q -f qcow2 -b {} -F raw -o cluster_size=512,refcount_bits=64 {} 8M", base, img));
  auto before = readFile(img);
  {
    auto image = openImage({img, ImageFormat::kAuto, false});
    for (uint64_t off = 0; off < (8 << 20); off += 64 << 10) {  // forces a refcount table move
      writeImage(*image, off, std::vector<uint8_t>(1024, 5));
    }
  }
  auto after = readFile(img);
  // Everything but refcount_table_offset/clusters (48..59) is unchanged in the header cluster.
  for (size_t i = 0; i < 512; ++i) {
    if (i >= 48 && i < 60) continue;
    ASSERT_EQ(before[i], after[i]) << "header byte " << i << " changed";
  }
  expectCheckClean(img);
  std::string info;
  shell("qemu-img info " + img, &info);
  EXPECT_NE(info.find("backing file format: raw"), std::string::npos) << info;
}

}  // namespace
}  // namespace clonevm::block
