#include "dev-block/image/qcow2_compression.h"

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm::block {
namespace {

std::vector<uint8_t> sampleCluster() {
  std::vector<uint8_t> data(65536);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>((i * 7) ^ (i >> 9));
  return data;
}

TEST(Qcow2Compression, RoundTripWithSectorPadding) {
  for (auto type : {Qcow2Compression::kZlib, Qcow2Compression::kZstd}) {
    auto original = sampleCluster();
    auto compressed = compressCluster(type, original);
    EXPECT_LT(compressed.size(), original.size());
    compressed.resize((compressed.size() + 511) / 512 * 512, 0xcc);  // junk up to the sector
    std::vector<uint8_t> out(original.size());
    decompressCluster(type, compressed.data(), compressed.size(), out);
    EXPECT_EQ(out, original);
  }
}

TEST(Qcow2Compression, CorruptOrShortDataIsAnError) {
  for (auto type : {Qcow2Compression::kZlib, Qcow2Compression::kZstd}) {
    auto compressed = compressCluster(type, sampleCluster());
    std::vector<uint8_t> out(65536);
    EXPECT_THROW(decompressCluster(type, compressed.data(), compressed.size() / 2, out), Error);
    std::vector<uint8_t> garbage(600, 0xff);
    EXPECT_THROW(decompressCluster(type, garbage.data(), garbage.size(), out), Error);
  }
}

}  // namespace
}  // namespace clonevm::block
