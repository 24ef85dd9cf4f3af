// Copying a VM's disk into a template: raw and qcow2 chains flattened into a sparse raw file,
// and the manifest's digests filled in.

#include "cli/template_disks.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/unique_fd.h"
#include "dev-block/image/block_image.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::cli {
namespace {

namespace snapshot = vmm::snapshot;

constexpr uint64_t kDiskBytes = 4 << 20;

class TemplateDisksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fmt::format("{}/template-disks-test-{}", ::testing::TempDir(), ::getpid());
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
    base_ = dir_ + "/base.raw";
    UniqueFd fd(::open(base_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
    ASSERT_EQ(::ftruncate(fd.get(), kDiskBytes), 0);
    put(fd.get(), 0, "BASE-AT-0");
    put(fd.get(), 3 << 20, "BASE-AT-3M");
    // Allocated but zero: must not be written into the copy.
    std::vector<uint8_t> zeros(64 << 10, 0);
    ASSERT_EQ(::pwrite(fd.get(), zeros.data(), zeros.size(), 2 << 20), static_cast<ssize_t>(zeros.size()));
  }
  void TearDown() override {
    std::error_code ignored;
    for (auto& entry : std::filesystem::directory_iterator(dir_, ignored)) {
      std::filesystem::permissions(entry.path(), std::filesystem::perms::owner_all, ignored);
    }
    std::filesystem::remove_all(dir_, ignored);
  }

  static void put(int fd, off_t offset, const std::string& text) {
    ASSERT_EQ(::pwrite(fd, text.data(), text.size(), offset), static_cast<ssize_t>(text.size()));
  }
  static std::string read(const std::string& path, off_t offset, size_t size) {
    std::string bytes(size, '\0');
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    EXPECT_EQ(::pread(fd.get(), bytes.data(), size, offset), static_cast<ssize_t>(size));
    return bytes;
  }
  static uint64_t allocatedBytes(const std::string& path) {
    struct stat st {};
    EXPECT_EQ(::stat(path.c_str(), &st), 0);
    return static_cast<uint64_t>(st.st_blocks) * 512;
  }
  // Every byte of `path` is `expected`'s, whose other bytes are zero.
  static void expectContent(const std::string& path, const std::map<uint64_t, std::string>& expected) {
    std::ifstream in(path, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), {});
    ASSERT_EQ(bytes.size(), kDiskBytes);
    std::string want(kDiskBytes, '\0');
    for (const auto& [offset, text] : expected) want.replace(offset, text.size(), text);
    EXPECT_TRUE(bytes == want) << path << " differs from what the guest saw";
  }

  std::string dir_;
  std::string base_;

  // A template manifest (one 4 KiB page of memory) whose one disk, of `bytes`, is base_ to copy.
  void writeManifestWithOneDisk(uint64_t bytes) {
    snapshot::Manifest manifest;
    manifest.createdUtc = snapshot::currentUtcTime();
    manifest.memoryBytes = manifest.memorySize = 4096;
    manifest.vcpus = 1;
    manifest.regions = {{0, 4096, 0}};
    manifest.disks = {{.file = "disk0.raw", .source = base_, .sourceFormat = "raw",
                       .bytes = bytes, .readOnly = false, .queues = 1, .sha256 = {}}};
    snapshot::rewriteManifest(dir_, manifest);
  }
  // What `clone run` recorded for that VM.
  std::vector<RecordedDisk> recorded() const { return {{base_, "raw"}}; }
};

TEST_F(TemplateDisksTest, RawCopyIsSparseAndReadOnly) {
  std::string target = dir_ + "/disk0.raw";
  uint64_t written = copyDiskImage(base_, "raw", target, kDiskBytes);
  EXPECT_EQ(written, 2 * 4096u) << "only the two blocks that hold data";
  expectContent(target, {{0, "BASE-AT-0"}, {3 << 20, "BASE-AT-3M"}});
  EXPECT_LE(allocatedBytes(target), 64u << 10) << "zeros were written";
  struct stat st {};
  ASSERT_EQ(::stat(target.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0444u);
  // Never over an existing file.
  EXPECT_THROW(copyDiskImage(base_, "raw", target, kDiskBytes), Error);
  // The VM's disk had another size: the image changed under it.
  try {
    copyDiskImage(base_, "raw", dir_ + "/other.raw", kDiskBytes * 2);
    FAIL() << "a size mismatch was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("but the VM's disk had"), std::string::npos) << e.what();
  }
}

TEST_F(TemplateDisksTest, Qcow2OverlayIsFlattenedWithItsBackingFile) {
  std::string overlay = dir_ + "/overlay.qcow2";
  block::createQcow2Overlay(overlay, base_, block::ImageFormat::kRaw);
  {
    // The guest wrote through the overlay: over the base's first bytes (the cluster's rest is
    // copied from the base) and into a hole.
    auto image = block::openImage({overlay, block::ImageFormat::kQcow2, false});
    for (auto [offset, text] : {std::pair<uint64_t, std::string>{0, "TOP"},
                                {(1 << 20) + 512, "TOP-AT-1M"}}) {
      std::vector<block::ImageExtent> extents;
      image->mapWrite(offset, text.size(), extents);
      ASSERT_EQ(extents.size(), 1u);
      ASSERT_EQ(::pwrite(extents[0].fd, text.data(), text.size(), static_cast<off_t>(extents[0].fileOffset)),
                static_cast<ssize_t>(text.size()));
    }
    image->flush();
  }
  std::string target = dir_ + "/disk0.raw";
  copyDiskImage(overlay, "auto", target, kDiskBytes);
  // The overlay's cluster holds the rest of the base's block at 0 (copy on write).
  expectContent(target, {{0, "TOPE-AT-0"}, {(1 << 20) + 512, "TOP-AT-1M"}, {3 << 20, "BASE-AT-3M"}});
  EXPECT_EQ(read(base_, 0, 9), "BASE-AT-0") << "the base was written";
}

TEST_F(TemplateDisksTest, FillsTheManifestDigests) {
  writeManifestWithOneDisk(kDiskBytes);
  auto copies = copyTemplateDisks(dir_, recorded(), "test record");
  EXPECT_EQ(copies.disks, 1u);
  EXPECT_EQ(copies.dataBytes, 2 * 4096u);
  std::ifstream in(dir_ + "/manifest.json");
  std::string text((std::istreambuf_iterator<char>(in)), {});
  auto back = snapshot::manifestFromJson(text, "manifest");
  ASSERT_EQ(back.disks.size(), 1u);
  UniqueFd fd(::open((dir_ + "/disk0.raw").c_str(), O_RDONLY | O_CLOEXEC));
  EXPECT_EQ(back.disks[0].sha256, snapshot::templateDiskDigest(fd.get(), kDiskBytes, "disk0.raw"));
  // Done once: a second call finds nothing left to copy.
  EXPECT_EQ(copyTemplateDisks(dir_, recorded(), "test record").disks, 0u);
}

TEST_F(TemplateDisksTest, AFailedCopyLeavesNoDiskBehind) {
  writeManifestWithOneDisk(kDiskBytes + 4096);
  try {
    copyTemplateDisks(dir_, recorded(), "test record");
    FAIL() << "a disk of another size was copied";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("but the VM's disk had"), std::string::npos) << e.what();
  }
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/disk0.raw"));
}

// A core that names another file than the disk it was given (a secret of the user running
// `clone snapshot`) gets nothing copied.
TEST_F(TemplateDisksTest, AnImageTheVmWasNotStartedWithIsNotCopied) {
  writeManifestWithOneDisk(kDiskBytes);
  std::string secret = dir_ + "/../secret-" + std::to_string(::getpid());
  for (const auto& record : {std::vector<RecordedDisk>{{secret, "raw"}},
                             std::vector<RecordedDisk>{{base_, "qcow2"}},
                             std::vector<RecordedDisk>{},
                             std::vector<RecordedDisk>{{base_, "raw"}, {base_, "raw"}}}) {
    try {
      copyTemplateDisks(dir_, record, "test record");
      ADD_FAILURE() << "copied although the record differs";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("refusing to copy"), std::string::npos) << e.what();
    }
    EXPECT_FALSE(std::filesystem::exists(dir_ + "/disk0.raw"));
  }
}

}  // namespace
}  // namespace clonevm::cli
