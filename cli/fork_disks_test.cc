// A fork's disks: overlays over the template's disk files and real clone-block processes on
// socket pairs (started directly, as --no-jail would).

#include "cli/fork_disks.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include <gtest/gtest.h>

#include "cli/direct_launcher.h"
#include "common/error.h"
#include "dev-block/image/block_image.h"
#include "dev-block/image/open_image.h"
#include "ipc/vhost-user/frontend.h"

namespace clonevm::cli {
namespace {

namespace snapshot = vmm::snapshot;

class RecordingLauncher : public ProcessLauncher {
 public:
  pid_t launch(const ProcessSpec& spec) override {
    specs.push_back(spec);
    pids.push_back(direct.launch(spec));
    return pids.back();
  }
  std::vector<ProcessSpec> specs;
  std::vector<pid_t> pids;
  DirectLauncher direct;
};

bool has(const std::vector<std::string>& args, const std::string& arg) {
  return std::find(args.begin(), args.end(), arg) != args.end();
}

std::string after(const std::vector<std::string>& args, const std::string& arg) {
  auto it = std::find(args.begin(), args.end(), arg);
  return it == args.end() || it + 1 == args.end() ? "" : *(it + 1);
}

// Waits up to 5 s for `pid` to exit; returns its exit code or -1.
int waitExit(pid_t pid) {
  for (int i = 0; i < 500; ++i) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return -1;
}

class ForkDisksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(fmt::format("{}/fork-disks-test-{}", ::testing::TempDir(), ::getpid()))
               .lexically_normal()
               .string();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_ + "/template");
    std::filesystem::create_directories(dir_ + "/run");
    for (const char* name : {"disk0.raw", "disk1.raw"}) {
      std::string path = dir_ + "/template/" + name;
      std::ofstream(path).close();
      std::filesystem::resize_file(path, 1 << 20);
    }
    manifest_.disks = {
        {.file = "disk0.raw", .source = "/x", .sourceFormat = "raw", .bytes = 1 << 20, .readOnly = false,
         .queues = 2, .sha256 = "s"},
        {.file = "disk1.raw", .source = "/y", .sourceFormat = "raw", .bytes = 1 << 20, .readOnly = true,
         .queues = 1, .sha256 = "s"}};
    socket_ = dir_ + "/run/fork-1234abcd.sock";
  }
  void TearDown() override {
    for (pid_t pid : launcher_.pids) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, WNOHANG);
    }
    std::filesystem::remove_all(dir_);
  }

  ForkDisks start(const std::vector<ForkDiskOption>& options = {}, unsigned number = 1, unsigned count = 1,
                  bool postcopy = true) {
    return startForkDisks(launcher_, CLONE_BLOCK_PROGRAM, "fork-1234abcd", dir_ + "/template", manifest_,
                          socket_, options, number, count, postcopy);
  }

  std::string dir_;
  std::string socket_;
  snapshot::Manifest manifest_;
  RecordingLauncher launcher_;
};

TEST_F(ForkDisksTest, PostcopyGivesEachCloneBlockAUserfaultfdSource) {
  ForkDisks disks = start();
  ASSERT_EQ(launcher_.specs.size(), 2u);
  for (const auto& spec : launcher_.specs) {
    EXPECT_TRUE(has(spec.args, "--userfaultfd")) << spec.id << ": postcopy is the default";
    EXPECT_EQ(spec.devices, std::vector<std::string>{"/dev/userfaultfd"}) << spec.id;
  }
}

TEST_F(ForkDisksTest, FilledUpFrontTheCloneBlocksGetNoUserfaultfd) {
  ForkDisks disks = start({}, 1, 1, /*postcopy=*/false);
  ASSERT_EQ(launcher_.specs.size(), 2u);
  for (const auto& spec : launcher_.specs) {
    EXPECT_FALSE(has(spec.args, "--userfaultfd")) << spec.id;
    EXPECT_TRUE(spec.devices.empty()) << spec.id;
  }
}

TEST(ForkDiskOptionTest, Parses) {
  auto option = parseForkDiskOption("1,overlay=/srv/keep.qcow2");
  EXPECT_EQ(option.index, 1u);
  EXPECT_EQ(option.overlay, "/srv/keep.qcow2");
  for (const char* bad : {"", "x,overlay=/a", "1", "1,overlay=", "1,readonly", "-1,overlay=/a", "64,overlay=/a"}) {
    EXPECT_THROW(parseForkDiskOption(bad), Error) << bad;
  }
  EXPECT_EQ(forkDiskOverlayPath("/run/clone/fork-1.sock", 2), "/run/clone/fork-1.disk2.qcow2");
  EXPECT_EQ(forkDiskLogPath("/tmp/p.1", 0), "/tmp/p.1.disk0.log");
}

TEST_F(ForkDisksTest, EachDiskGetsAnOverlayAndACloneBlockOnASocketPair) {
  ForkDisks disks = start();
  ASSERT_EQ(launcher_.specs.size(), 2u);
  ASSERT_EQ(disks.coreEnds.size(), 2u);
  std::string overlay = dir_ + "/run/fork-1234abcd.disk0.qcow2";
  std::string base = dir_ + "/template/disk0.raw";

  const ProcessSpec& writable = launcher_.specs[0];
  EXPECT_EQ(writable.kind, "block");
  EXPECT_EQ(writable.id, "fork-1234abcd-block0");
  EXPECT_EQ(after(writable.args, "--image"), overlay);
  EXPECT_EQ(after(writable.args, "--format"), "qcow2");
  EXPECT_EQ(after(writable.args, "--queues"), "2");
  EXPECT_EQ(after(writable.args, "--serial"), "clone-disk0");
  EXPECT_FALSE(has(writable.args, "--readonly"));
  EXPECT_EQ(writable.devices, std::vector<std::string>{"/dev/userfaultfd"});
  EXPECT_EQ(writable.readPaths, std::vector<std::string>{base});
  EXPECT_EQ(writable.writePaths, std::vector<std::string>{overlay});
  ASSERT_EQ(writable.keepFds.size(), 1u);
  EXPECT_EQ(after(writable.args, "--fd"), std::to_string(writable.keepFds[0]));
  EXPECT_EQ(writable.detachedOutput, dir_ + "/run/fork-1234abcd.disk0.log");
  // The overlay reads through to the template's file, which it names.
  auto chain = block::imageChainPaths(overlay, block::ImageFormat::kQcow2);
  EXPECT_EQ(chain, (std::vector<std::string>{overlay, base}));
  EXPECT_EQ(disks.createdOverlays, std::vector<std::string>{overlay});

  // A disk the template had read-only is served as it is, read-only: no overlay.
  const ProcessSpec& readOnly = launcher_.specs[1];
  EXPECT_EQ(after(readOnly.args, "--image"), dir_ + "/template/disk1.raw");
  EXPECT_TRUE(has(readOnly.args, "--readonly"));
  EXPECT_TRUE(readOnly.writePaths.empty());
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/run/fork-1234abcd.disk1.qcow2"));

  // The core's options, in the template's order, name its ends of the pairs.
  ASSERT_EQ(disks.vmmArgs.size(), 4u);
  EXPECT_EQ(disks.vmmArgs[0], "--vhost-user-blk");
  EXPECT_EQ(disks.vmmArgs[1], fmt::format("fd={},image={},format=qcow2", disks.coreEnds[0].get(), overlay));
  EXPECT_EQ(disks.vmmArgs[3], fmt::format("fd={},image={}/template/disk1.raw,format=raw",
                                          disks.coreEnds[1].get(), dir_));
  EXPECT_EQ(disks.keepFds(), (std::vector<int>{disks.coreEnds[0].get(), disks.coreEnds[1].get()}));

  // clone-block answers on the core's end, and ends when that end closes (the core exits).
  ipc::vhost::Frontend frontend(std::move(disks.coreEnds[0]), "disk0", {.replyTimeout = std::chrono::seconds(5)});
  uint64_t features = frontend.getFeatures();
  EXPECT_NE(features & (1ull << 32), 0u) << "VIRTIO_F_VERSION_1";
  { ipc::vhost::Frontend gone = std::move(frontend); }
  EXPECT_EQ(waitExit(launcher_.pids[0]), 0);
  disks.closeCoreEnds();
  EXPECT_EQ(waitExit(launcher_.pids[1]), 0);

  removeForkDiskFiles(socket_);
  EXPECT_FALSE(std::filesystem::exists(overlay));
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/run/fork-1234abcd.disk0.log"));
  EXPECT_TRUE(std::filesystem::exists(base));
}

TEST_F(ForkDisksTest, AnOverlayPathOfTheUsersIsNumberedPerForkAndKept) {
  std::string keep = dir_ + "/keep.qcow2";
  ForkDisks disks = start({{0, keep}}, 2, 3);
  EXPECT_EQ(after(launcher_.specs[0].args, "--image"), keep + ".2");
  EXPECT_TRUE(disks.createdOverlays.empty()) << "the user's overlay is not ours to remove";
  disks.closeCoreEnds();
  for (pid_t pid : launcher_.pids) waitExit(pid);
  removeForkDiskFiles(socket_);
  EXPECT_TRUE(std::filesystem::exists(keep + ".2"));
}

TEST_F(ForkDisksTest, AnOverlayThatExistsFailsTheForkAndLeavesNothingBehind) {
  std::string keep = dir_ + "/keep.qcow2";
  std::ofstream(keep).close();
  manifest_.disks[1].readOnly = false;  // disk 0 gets its overlay first, then disk 1 fails
  EXPECT_THROW(start({{1, keep}}), Error);
  EXPECT_FALSE(std::filesystem::exists(dir_ + "/run/fork-1234abcd.disk0.qcow2"));
  ASSERT_EQ(launcher_.pids.size(), 1u);
  // Disk 0's clone-block ends: its socket closed (or its overlay went before it opened it).
  EXPECT_NE(waitExit(launcher_.pids[0]), -1);
  EXPECT_THROW(start({{2, keep}}), Error) << "the template has two disks";
}

}  // namespace
}  // namespace clonevm::cli
