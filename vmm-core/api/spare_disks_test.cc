// A fork server's spare starts its disks' clone-blocks itself (spare_disks.h): the real
// program, each on its socket pair, a writable disk over its own new overlay, a read-only one
// over the template's file.

#include "vmm-core/api/spare_disks.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include <gtest/gtest.h>

#include "common/log.h"
#include "ipc/vhost-user/frontend.h"

namespace clonevm::vmm {
namespace {

namespace fs = std::filesystem;
constexpr uint64_t kVirtioBlkFRo = 1ull << 5;

class SpareDisksTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::path(::testing::TempDir()) / ("spare-disks-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_ / "template");
    fs::create_directories(dir_ / "overlays");
    for (const char* name : {"disk0.raw", "disk1.raw"}) {
      std::ofstream out(dir_ / "template" / name, std::ios::binary);
      out << std::string(1 << 20, 'd');
    }
    disks_.resize(2);
    disks_[0].file = "disk0.raw";
    disks_[0].queues = 2;
    disks_[1].file = "disk1.raw";
    disks_[1].readOnly = true;
  }
  void TearDown() override { fs::remove_all(dir_); }

  fs::path dir_;
  std::vector<snapshot::TemplateDisk> disks_;
  std::shared_ptr<spdlog::logger> log_ = makeLogger("test", {spdlog::level::warn, LogFormat::kText});
};

// The pids of this process's children (/proc/PID/stat: "pid (comm) state ppid ...").
std::vector<pid_t> children() {
  std::vector<pid_t> pids;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    std::ifstream stat(entry.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    char state;
    pid_t parent = 0;
    rest >> state >> parent;
    if (parent == ::getpid()) pids.push_back(std::stoi(entry.path().filename().string()));
  }
  return pids;
}

TEST_F(SpareDisksTest, EachDiskIsServedOnItsSocketAndAWritableOneOverItsOwnOverlay) {
  SpareDiskOptions options{CLONE_BLOCK_PROGRAM, (dir_ / "overlays").string()};
  // Not close-on-exec, as a careless fd would be; above 3, which the disk's socket takes.
  std::string marker = (dir_ / "leak-marker").string();
  int opened = ::open(marker.c_str(), O_RDWR | O_CREAT, 0600);
  int leaked = ::fcntl(opened, F_DUPFD, 40);
  ::close(opened);
  auto devices = startSpareDisks(options, (dir_ / "template").string(), disks_, *log_);
  ::close(leaked);
  ASSERT_EQ(devices.size(), 2u);
  auto pids = children();
  ASSERT_EQ(pids.size(), 2u);
  for (pid_t pid : pids) {
    std::set<std::string> fds;
    for (const auto& fd : fs::directory_iterator(fmt::format("/proc/{}/fd", pid))) {
      fds.insert(fd.path().filename().string());
    }
    EXPECT_TRUE(fds.contains("3"));
    for (const auto& fd : fds) {
      std::error_code gone;  // an fd closed meanwhile
      EXPECT_NE(fs::read_symlink(fmt::format("/proc/{}/fd/{}", pid, fd), gone).string(), marker)
          << "the spare's fd " << leaked << " reached clone-block " << pid << " as fd " << fd;
    }
  }
  std::string overlay = ipc::spareOverlayPath(options.overlayDir, ::getpid(), 0);
  EXPECT_EQ(devices[0].imagePath, overlay);
  EXPECT_EQ(devices[0].imageFormat, "qcow2");
  EXPECT_EQ(devices[0].queues, 2);
  EXPECT_EQ(devices[1].imagePath, (dir_ / "template" / "disk1.raw").string());
  EXPECT_EQ(devices[1].imageFormat, "raw");
  std::vector<uint64_t> features;
  for (const auto& device : devices) {
    ASSERT_GE(device.socketFd, 3);
    EXPECT_EQ(device.socketPath, "fd=" + std::to_string(device.socketFd));
    ipc::vhost::Frontend frontend(UniqueFd(device.socketFd), "clone-block");
    features.push_back(frontend.getFeatures());  // answered: the process serves this socket
    // By default the spare's memory stays lazy: each disk offers postcopy.
    EXPECT_NE(frontend.getProtocolFeatures() & (1ull << ipc::vhost::protocol::kPagefault), 0u);
  }  // the sockets close: both processes end
  EXPECT_EQ(features[0] & kVirtioBlkFRo, 0u);
  EXPECT_NE(features[1] & kVirtioBlkFRo, 0u) << "the template's read-only disk is served read-only";
  EXPECT_TRUE(fs::exists(overlay));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir_ / "overlays"), fs::directory_iterator{}), 1)
      << "only the writable disk has an overlay";
  for (int i = 0; i < 2; ++i) {
    int status = 0;
    EXPECT_GT(::waitpid(-1, &status, 0), 0);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  }
  removeSpareOverlays(options.overlayDir, ::getpid(), disks_.size());
  EXPECT_FALSE(fs::exists(overlay));
}

TEST_F(SpareDisksTest, WithoutPostcopyNoDiskOffersIt) {
  SpareDiskOptions options{CLONE_BLOCK_PROGRAM, (dir_ / "overlays").string(), /*postcopy=*/false};
  auto devices = startSpareDisks(options, (dir_ / "template").string(), disks_, *log_);
  ASSERT_EQ(devices.size(), 2u);
  for (const auto& device : devices) {
    ipc::vhost::Frontend frontend(UniqueFd(device.socketFd), "clone-block");
    frontend.getFeatures();
    EXPECT_EQ(frontend.getProtocolFeatures() & (1ull << ipc::vhost::protocol::kPagefault), 0u);
  }
  for (int i = 0; i < 2; ++i) {
    int status = 0;
    EXPECT_GT(::waitpid(-1, &status, 0), 0);
  }
  removeSpareOverlays(options.overlayDir, ::getpid(), disks_.size());
}

TEST_F(SpareDisksTest, AMissingProgramOrDirectoryIsRefusedAndLeavesNothing) {
  EXPECT_THROW(startSpareDisks({}, (dir_ / "template").string(), disks_, *log_), Error);
  SpareDiskOptions missing{(dir_ / "no-such-program").string(), (dir_ / "overlays").string()};
  EXPECT_THROW(startSpareDisks(missing, (dir_ / "template").string(), disks_, *log_), Error);
  EXPECT_TRUE(fs::is_empty(dir_ / "overlays"));
}

}  // namespace
}  // namespace clonevm::vmm
