#include "cli/disk_record.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm::cli {
namespace {

TEST(DiskRecordTest, WrittenBesideTheSocketReadBackAndReplaced) {
  std::string dir = ::testing::TempDir() + "/disk-record-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::string socket = dir + "/vm.sock";
  EXPECT_EQ(diskRecordPath(socket), dir + "/vm.disks");
  EXPECT_EQ(diskRecordPath(dir + "/other"), dir + "/other.disks");
  EXPECT_THROW(readDiskRecord(socket), Error) << "no record";

  writeDiskRecord(socket, {{"/srv/a.qcow2", "qcow2"}, {"/srv/b.raw", "raw"}});
  auto back = readDiskRecord(socket);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[1].image, "/srv/b.raw");
  EXPECT_EQ(back[1].format, "raw");
  EXPECT_EQ(std::filesystem::status(diskRecordPath(socket)).permissions(),
            std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);

  writeDiskRecord(socket, {{"/srv/c.raw", "raw"}});  // a stale record is replaced
  EXPECT_EQ(readDiskRecord(socket).size(), 1u);

  { std::ofstream(diskRecordPath(socket)) << "[{\"image\": 3}]"; }
  try {
    readDiskRecord(socket);
    ADD_FAILURE() << "a damaged record was read";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("damaged disk record"), std::string::npos) << e.what();
  }
  removeDiskRecord(socket);
  EXPECT_FALSE(std::filesystem::exists(diskRecordPath(socket)));
  std::filesystem::remove_all(dir);
}

// A fork server's fork: the core names its overlay by the spare's path, and `clone fork`
// moved the file to the fork's own name. The manifest must name the core's; only that passes.
TEST(DiskRecordTest, ACoreImageIsTheNameTheManifestMustGive) {
  std::string dir = ::testing::TempDir() + "/disk-record-core-" + std::to_string(::getpid());
  std::filesystem::create_directories(dir);
  std::string socket = dir + "/vm.sock";
  writeDiskRecord(socket, {{"/run/fork-1.disk0.qcow2", "qcow2", "/run/s.overlays/spare-7.disk0.qcow2"},
                           {"/srv/b.raw", "raw"}});
  auto back = readDiskRecord(socket);
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[0].coreImage, "/run/s.overlays/spare-7.disk0.qcow2");
  EXPECT_EQ(back[1].coreImage, "");
  vmm::snapshot::Manifest manifest;
  manifest.disks.resize(2);
  manifest.disks[0].source = "/run/s.overlays/spare-7.disk0.qcow2";
  manifest.disks[0].sourceFormat = "qcow2";
  manifest.disks[1].source = "/srv/b.raw";
  manifest.disks[1].sourceFormat = "raw";
  EXPECT_NO_THROW(requireRecordedDisks(manifest, back, "r"));
  manifest.disks[0].source = "/run/fork-1.disk0.qcow2";  // the file's name, not the core's
  EXPECT_THROW(requireRecordedDisks(manifest, back, "r"), Error);
  manifest.disks[0].source = "/home/u/.ssh/id_rsa";
  EXPECT_THROW(requireRecordedDisks(manifest, back, "r"), Error);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace clonevm::cli
