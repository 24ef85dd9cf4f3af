#include "dev-block/image/raw_image.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include "common/error.h"
#include "dev-block/image/image_test_util.h"

namespace clonevm::block {
namespace {

TEST(RawImage, MapsOntoTheFile) {
  test::ScratchDir dir;
  std::string path = dir.file("disk.raw");
  test::writeFile(path, std::vector<uint8_t>(1 << 20, 7));
  auto image = RawImage::open(path, false);
  EXPECT_EQ(image->virtualSize(), 1u << 20);
  std::vector<ImageExtent> extents;
  image->mapRead(4096, 8192, extents);
  ASSERT_EQ(extents.size(), 1u);
  EXPECT_EQ(extents[0].kind, ImageExtent::Kind::kFile);
  EXPECT_EQ(extents[0].fileOffset, 4096u);
  EXPECT_EQ(extents[0].length, 8192u);

  test::writeImage(*image, 100, std::vector<uint8_t>(50, 9));
  image->writeZeroes(65536, 65536, false);
  image->discard(262144, 65536);  // may or may not read zeros: virtio allows both
  image->writeZeroes(524288, 4096, true);
  image->flush();
  auto data = test::readImage(*image);
  EXPECT_EQ(data[99], 7);
  EXPECT_EQ(data[100], 9);
  EXPECT_EQ(data[149], 9);
  EXPECT_EQ(data[150], 7);
  EXPECT_EQ(data[65536], 0);
  EXPECT_EQ(data[131071], 0);
  EXPECT_EQ(data[131072], 7);
  EXPECT_EQ(data[524288], 0);
  EXPECT_EQ(test::readFile(path).size(), 1u << 20);  // KEEP_SIZE
}

TEST(RawImage, ReadOnlyRefusesWrites) {
  test::ScratchDir dir;
  std::string path = dir.file("disk.raw");
  test::writeFile(path, std::vector<uint8_t>(4096, 1));
  auto image = RawImage::open(path, true);
  std::vector<ImageExtent> extents;
  EXPECT_THROW(image->mapWrite(0, 512, extents), Error);
  EXPECT_THROW(image->discard(0, 4096), Error);
  EXPECT_THROW(RawImage::open(dir.file("missing"), true), SystemError);
}

}  // namespace
}  // namespace clonevm::block
