#include "dev-block/image/open_image.h"

#include <gtest/gtest.h>

#include "common/error.h"
#include "dev-block/image/image_test_util.h"
#include "dev-block/image/qcow2_create.h"

namespace clonevm::block {
namespace {

std::string openError(const std::string& path) {
  try {
    openImage({path, ImageFormat::kAuto, true});
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(OpenImage, ProbesAndNamesFormats) {
  test::ScratchDir dir;
  test::writeFile(dir.file("r"), std::vector<uint8_t>(4096, 0));
  createQcow2(dir.file("q"), {.size = 1 << 20});
  EXPECT_EQ(probeImageFormat(dir.file("r")), ImageFormat::kRaw);
  EXPECT_EQ(probeImageFormat(dir.file("q")), ImageFormat::kQcow2);
  EXPECT_EQ(parseImageFormat("qcow2"), ImageFormat::kQcow2);
  EXPECT_EQ(parseImageFormat(""), ImageFormat::kAuto);
  EXPECT_THROW(parseImageFormat("vmdk"), Error);
  EXPECT_NE(openImage({dir.file("q"), ImageFormat::kAuto, true})->describe().find("qcow2 v3"), std::string::npos);
  EXPECT_EQ(openImage({dir.file("r"), ImageFormat::kAuto, true})->virtualSize(), 4096u);
}

TEST(OpenImage, RelativeBackingAndOverlay) {
  test::ScratchDir dir;
  test::writeFile(dir.file("base.raw"), std::vector<uint8_t>(1 << 20, 0x42));
  createQcow2(dir.file("rel.qcow2"), {.size = 2 << 20, .backingFile = "base.raw", .backingFormat = "raw"});
  auto image = openImage({dir.file("rel.qcow2"), ImageFormat::kAuto, true});
  auto data = test::readImage(*image);
  EXPECT_EQ(data[0], 0x42);
  EXPECT_EQ(data[(1 << 20) - 1], 0x42);
  EXPECT_EQ(data[1 << 20], 0);  // past the smaller backing file: zeros

  createQcow2Overlay(dir.file("ov.qcow2"), dir.file("base.raw"), ImageFormat::kRaw);
  auto overlay = openImage({dir.file("ov.qcow2"), ImageFormat::kAuto, false});
  EXPECT_EQ(overlay->virtualSize(), 1u << 20);
  EXPECT_EQ(test::readImage(*overlay, 12345, 1)[0], 0x42);
  // An existing file is never overwritten.
  EXPECT_THROW(createQcow2Overlay(dir.file("ov.qcow2"), dir.file("base.raw"), ImageFormat::kRaw), Error);
}

TEST(OpenImage, RefusesLoopsDeepChainsAndUnknownBackingFormats) {
  test::ScratchDir dir;
  createQcow2(dir.file("a"), {.size = 1 << 20, .backingFile = "b", .backingFormat = "qcow2"});
  createQcow2(dir.file("b"), {.size = 1 << 20, .backingFile = "a", .backingFormat = "qcow2"});
  EXPECT_NE(openError(dir.file("a")).find("loop"), std::string::npos) << openError(dir.file("a"));
  createQcow2(dir.file("self"), {.size = 1 << 20, .backingFile = "self"});
  EXPECT_NE(openError(dir.file("self")).find("loop"), std::string::npos);

  test::writeFile(dir.file("d0"), std::vector<uint8_t>(1 << 20, 1));
  for (int i = 1; i <= kMaxBackingChainDepth + 1; ++i) {
    createQcow2(dir.file("d" + std::to_string(i)),
                {.size = 1 << 20, .clusterBits = 12, .backingFile = "d" + std::to_string(i - 1)});
  }
  EXPECT_EQ(openError(dir.file("d" + std::to_string(kMaxBackingChainDepth))), "");
  std::string deep = openError(dir.file("d" + std::to_string(kMaxBackingChainDepth + 1)));
  EXPECT_NE(deep.find("deeper than"), std::string::npos) << deep;

  createQcow2(dir.file("v"), {.size = 1 << 20, .backingFile = "d0", .backingFormat = "vmdk"});
  EXPECT_NE(openError(dir.file("v")).find("'vmdk' is not supported"), std::string::npos);
  createQcow2(dir.file("m"), {.size = 1 << 20, .backingFile = "missing"});
  EXPECT_NE(openError(dir.file("m")).find("missing"), std::string::npos);
}

}  // namespace
}  // namespace clonevm::block
