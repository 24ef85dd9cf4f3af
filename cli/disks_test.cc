// --disk parsing, and DiskProcesses starting and stopping real clone-block processes.

#include "cli/disks.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "cli/direct_launcher.h"
#include "common/error.h"
#include "dev-block/image/block_image.h"

namespace clonevm::cli {
namespace {

TEST(DiskOptionTest, ParsesFlagsAndFormat) {
  auto disk = parseDiskOption("/images/a.qcow2,overlay,format=qcow2");
  EXPECT_EQ(disk.path, "/images/a.qcow2");
  EXPECT_TRUE(disk.overlay);
  EXPECT_FALSE(disk.readOnly);
  EXPECT_EQ(disk.format, "qcow2");
  disk = parseDiskOption("disk.img,readonly");
  EXPECT_TRUE(disk.readOnly);
  EXPECT_EQ(disk.format, "auto");
  EXPECT_THROW(parseDiskOption("disk.img,format=vmdk"), Error);
  EXPECT_THROW(parseDiskOption("disk.img,bogus"), Error);
  EXPECT_THROW(parseDiskOption(",readonly"), Error);
  EXPECT_THROW(parseDiskOption("disk.img,readonly,overlay"), Error);
}

// Records the spec and starts the program directly.
class RecordingLauncher : public ProcessLauncher {
 public:
  pid_t launch(const ProcessSpec& spec) override {
    specs.push_back(spec);
    return direct.launch(spec);
  }
  std::vector<ProcessSpec> specs;
  DirectLauncher direct;
};

class DiskProcessesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(fmt::format("{}/disks-test-{}", ::testing::TempDir(), ::getpid()))
               .lexically_normal()
               .string();
    std::filesystem::create_directories(dir_);
    image_ = dir_ + "/base.img";
    std::ofstream(image_).close();
    std::filesystem::resize_file(image_, 1 << 20);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string dir_;
  std::string image_;
  RecordingLauncher launcher_;
};

TEST_F(DiskProcessesTest, StartsCloneBlockThatListensAndStopsIt) {
  std::string runtime;
  std::string socket;
  {
    DiskProcesses disks(launcher_, CLONE_BLOCK_PROGRAM, "vm-test", {"--log-level", "error"});
    runtime = disks.runtimeDir();
    socket = disks.start(parseDiskOption(image_ + ",format=raw"));
    EXPECT_EQ(socket.rfind(runtime, 0), 0u) << "the socket is in the runtime dir";
    struct stat st {};
    ASSERT_EQ(::stat(runtime.c_str(), &st), 0);
    EXPECT_EQ(st.st_mode & 0777, 0700u) << "the runtime dir is private";
    ASSERT_EQ(launcher_.specs.size(), 1u);
    const ProcessSpec& spec = launcher_.specs[0];
    EXPECT_EQ(spec.kind, "block");
    EXPECT_EQ(spec.id, "vm-test-block0");
    EXPECT_EQ(spec.writePaths, (std::vector<std::string>{runtime, image_}));
    EXPECT_TRUE(spec.readPaths.empty());
  }
  EXPECT_FALSE(std::filesystem::exists(socket));
  EXPECT_FALSE(std::filesystem::exists(runtime)) << "removed with the VM";
}

TEST_F(DiskProcessesTest, ReadOnlyAndOverlayGrantOnlyReadingTheBase) {
  DiskProcesses disks(launcher_, CLONE_BLOCK_PROGRAM, "vm-test", {"--log-level", "error"});
  disks.start(parseDiskOption(image_ + ",readonly,format=raw"));
  EXPECT_EQ(launcher_.specs[0].readPaths, std::vector<std::string>{image_});
  EXPECT_NE(std::find(launcher_.specs[0].args.begin(), launcher_.specs[0].args.end(),
                      "--readonly"),
            launcher_.specs[0].args.end());
  EXPECT_EQ(disks.lastServed().path, image_);
  EXPECT_EQ(disks.lastServed().format, "raw");
  disks.start(parseDiskOption(image_ + ",overlay,format=raw"));
  const ProcessSpec& overlay = launcher_.specs[1];
  EXPECT_EQ(overlay.readPaths[0], image_);
  EXPECT_EQ(overlay.writePaths, std::vector<std::string>{disks.runtimeDir()});
  auto it = std::find(overlay.args.begin(), overlay.args.end(), "--image");
  ASSERT_NE(it, overlay.args.end());
  std::string overlayPath = *(it + 1);
  EXPECT_EQ(overlayPath.rfind(disks.runtimeDir(), 0), 0u);
  EXPECT_TRUE(std::filesystem::exists(overlayPath));
  EXPECT_EQ(disks.lastServed().path, overlayPath) << "a snapshot copies what the guest sees";
  EXPECT_EQ(disks.lastServed().format, "qcow2");
  disks.stopAll();
  EXPECT_FALSE(std::filesystem::exists(overlayPath)) << "the overlay goes with the VM";
  EXPECT_TRUE(std::filesystem::exists(image_));
}

TEST_F(DiskProcessesTest, GrantsReadingEveryBackingFileOfAQcow2Chain) {
  // base.img <- other/middle.qcow2 <- top.qcow2: the middle lives in another directory, which
  // a jail would not show unless the spec names it.
  std::filesystem::create_directories(dir_ + "/other");
  std::string middle = dir_ + "/other/middle.qcow2";
  std::string top = dir_ + "/top.qcow2";
  block::createQcow2Overlay(middle, image_, block::ImageFormat::kRaw);
  block::createQcow2Overlay(top, middle, block::ImageFormat::kQcow2);
  DiskProcesses disks(launcher_, CLONE_BLOCK_PROGRAM, "vm-test", {"--log-level", "error"});
  disks.start(parseDiskOption(top));
  const ProcessSpec& spec = launcher_.specs[0];
  EXPECT_EQ(spec.writePaths, (std::vector<std::string>{disks.runtimeDir(), top}));
  EXPECT_EQ(spec.readPaths, (std::vector<std::string>{middle, image_}));
  disks.start(parseDiskOption(top + ",overlay"));
  EXPECT_EQ(launcher_.specs[1].readPaths, (std::vector<std::string>{top, middle, image_}));
}

TEST_F(DiskProcessesTest, AnImageThatCannotBeOpenedFailsTheStart) {
  DiskProcesses disks(launcher_, CLONE_BLOCK_PROGRAM, "vm-test", {"--log-level", "off"});
  try {
    disks.start(parseDiskOption(dir_ + "/missing.img"));
    FAIL() << "a missing image started";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exited with code 1"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace clonevm::cli
