#include "dev-block/image/qcow2_header.h"

#include <gtest/gtest.h>

#include "common/error.h"
#include "dev-block/image/image_io.h"

namespace clonevm::block {
namespace {

Qcow2Header sample() {
  Qcow2Header h;
  h.clusterBits = 16;
  h.size = 1 << 30;
  h.l1Size = 2;
  h.l1TableOffset = 3 << 16;
  h.refcountTableOffset = 1 << 16;
  h.refcountTableClusters = 1;
  h.backingFile = "base.raw";
  h.setBackingFormat("raw");
  h.extensions.push_back({0x12345678, {1, 2, 3}});  // unknown: kept as is
  return h;
}

std::vector<uint8_t> cluster(Qcow2Header h) {
  auto bytes = h.serialize();
  bytes.resize(h.clusterSize(), 0);
  return bytes;
}

std::string parseError(const std::vector<uint8_t>& bytes) {
  try {
    Qcow2Header::parse(bytes, "t.qcow2");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Qcow2Header, RoundTripKeepsExtensions) {
  Qcow2Header parsed = Qcow2Header::parse(cluster(sample()), "t.qcow2");
  EXPECT_EQ(parsed.version, 3u);
  EXPECT_EQ(parsed.size, 1u << 30);
  EXPECT_EQ(parsed.backingFile, "base.raw");
  EXPECT_EQ(parsed.backingFormat(), "raw");
  ASSERT_EQ(parsed.extensions.size(), 2u);
  EXPECT_EQ(parsed.extensions[1].type, 0x12345678u);
  EXPECT_EQ(parsed.extensions[1].data, (std::vector<uint8_t>{1, 2, 3}));
  EXPECT_EQ(cluster(parsed), cluster(sample()));
}

TEST(Qcow2Header, Version2) {
  Qcow2Header h = sample();
  h.version = 2;
  Qcow2Header parsed = Qcow2Header::parse(cluster(h), "t.qcow2");
  EXPECT_EQ(parsed.version, 2u);
  EXPECT_EQ(parsed.refcountOrder, 4u);
  EXPECT_EQ(parsed.headerLength, 72u);
  EXPECT_EQ(parsed.backingFile, "base.raw");
}

TEST(Qcow2Header, RefusesBadFields) {
  auto patch32 = [](uint64_t at, uint32_t value) {
    auto bytes = cluster(sample());
    storeBe32(&bytes[at], value);
    return bytes;
  };
  EXPECT_NE(parseError(patch32(0, 0x12345678)).find("not a qcow2"), std::string::npos);
  EXPECT_NE(parseError(patch32(4, 4)).find("version 4"), std::string::npos);
  EXPECT_NE(parseError(patch32(20, 8)).find("cluster_bits 8"), std::string::npos);
  EXPECT_NE(parseError(patch32(20, 22)).find("cluster_bits 22"), std::string::npos);
  EXPECT_NE(parseError(patch32(32, 1)).find("encrypted"), std::string::npos);
  EXPECT_NE(parseError(patch32(96, 7)).find("refcount_order 7"), std::string::npos);
  EXPECT_NE(parseError(patch32(100, 96)).find("header_length"), std::string::npos);
  EXPECT_NE(parseError(patch32(100, 108)).find("header_length"), std::string::npos);
  EXPECT_NE(parseError(patch32(100, 1 << 17)).find("header_length"), std::string::npos);
  EXPECT_NE(parseError(patch32(16, 2000)).find("too long"), std::string::npos);
  auto offset = cluster(sample());
  storeBe64(&offset[8], (1 << 16) - 4);
  EXPECT_NE(parseError(offset).find("outside the header cluster"), std::string::npos);
  auto extension = cluster(sample());
  storeBe32(&extension[112 + 4], 1 << 20);  // first extension claims 1 MiB
  EXPECT_NE(parseError(extension).find("runs past the header cluster"), std::string::npos);
  EXPECT_NE(parseError(std::vector<uint8_t>(100, 0)).find("too short"), std::string::npos);
}

TEST(Qcow2Header, NamesUnknownIncompatibleFeatures) {
  Qcow2Header h = sample();
  h.incompatibleFeatures = (1ull << 5) | (1ull << 40);
  std::vector<uint8_t> table(48, 0);
  table[0] = 0;  // incompatible
  table[1] = 5;
  std::string name = "teleport";
  std::copy(name.begin(), name.end(), table.begin() + 2);
  h.extensions.push_back({kQcow2ExtFeatureTable, table});
  std::string error = parseError(cluster(h));
  EXPECT_NE(error.find("bit 5 (teleport), bit 40"), std::string::npos) << error;

  h = sample();
  h.incompatibleFeatures = kQcow2IncompatDataFile;
  EXPECT_NE(parseError(cluster(h)).find("external data file"), std::string::npos);
  h = sample();
  h.headerTail[0] = 1;  // zstd without the feature bit
  EXPECT_NE(parseError(cluster(h)).find("disagrees"), std::string::npos);
  h.incompatibleFeatures = kQcow2IncompatCompressionType;
  EXPECT_EQ(Qcow2Header::parse(cluster(h), "t").compressionType(), Qcow2Compression::kZstd);
  h.headerTail[0] = 2;
  EXPECT_NE(parseError(cluster(h)).find("unknown compression type 2"), std::string::npos);
}

TEST(Qcow2Header, ValidatesLayoutAgainstTheFile) {
  const uint64_t fileSize = 4 << 16;
  auto layoutError = [&](Qcow2Header h) -> std::string {
    try {
      h.validateLayout(fileSize, "t.qcow2");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  EXPECT_EQ(layoutError(sample()), "");
  Qcow2Header h = sample();
  h.l1TableOffset += 8;
  EXPECT_NE(layoutError(h).find("not cluster-aligned"), std::string::npos);
  h = sample();
  h.l1TableOffset = 100 << 16;
  EXPECT_NE(layoutError(h).find("outside the file"), std::string::npos);
  h = sample();
  h.l1Size = 1;  // 1 GiB needs two 512 MiB L2 tables
  EXPECT_NE(layoutError(h).find("too small"), std::string::npos);
  h = sample();
  h.l1Size = 0x10000000;
  EXPECT_NE(layoutError(h).find("too large"), std::string::npos);
  h = sample();
  h.refcountTableOffset = 12345;
  EXPECT_NE(layoutError(h).find("refcount table offset"), std::string::npos);
  h = sample();
  h.refcountTableClusters = 10;
  EXPECT_NE(layoutError(h).find("outside the file"), std::string::npos);
  h = sample();
  h.refcountTableClusters = 0;
  EXPECT_NE(layoutError(h).find("refcount table size"), std::string::npos);
}

}  // namespace
}  // namespace clonevm::block
