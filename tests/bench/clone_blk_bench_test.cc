// clone-blk-bench against qemu-storage-daemon on a small raw file, on the host (vhost-user needs
// no KVM): --verify runs pass, the image file then holds exactly the driver's pattern (checked
// here, not by the driver), and a wrong pattern seed makes the driver fail instead of printing
// a number.
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/bench/clone_blk_bench_pattern.h"
#include "tests/support/socket_daemon.h"

namespace clonevm::bench {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

using e2e::kQemuStorageDaemon;
constexpr uint64_t kImageBytes = 8 << 20;

struct RunResult {
  int exitCode = -1;
  std::string output;
};

RunResult runDriver(const std::string& args) {
  std::string command = fmt::format("{} {} 2>&1", CLONE_BLK_BENCH_PATH, args);
  RunResult result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char buffer[4096];
  size_t n;
  while ((n = std::fread(buffer, 1, sizeof(buffer), pipe)) > 0) result.output.append(buffer, n);
  int status = ::pclose(pipe);
  result.exitCode = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

// qemu-storage-daemon exporting `image` as vhost-user-blk with `queues` queues. stop() is a
// SIGTERM, so the daemon flushes and closes the image before the test reads it.
class StorageDaemon : public e2e::SocketDaemon {
 public:
  StorageDaemon(const fs::path& image, const std::string& socket, const fs::path& log, int queues)
      : SocketDaemon(e2e::kQemuStorageDaemon, e2e::storageDaemonArgs(image, socket, queues), log,
                     socket) {}
  void stop() { SocketDaemon::stop(SIGTERM); }
};

class BlkBenchTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access(kQemuStorageDaemon, X_OK) != 0) {
      GTEST_SKIP() << kQemuStorageDaemon << " is missing (Debian: qemu-system-common)";
    }
    dir_ = fs::path(CLONE_BLK_BENCH_SCRATCH) /
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    image_ = dir_ / "disk.raw";
    { std::ofstream(image_, std::ios::binary); }
    fs::resize_file(image_, kImageBytes);
    socket_ = fmt::format("/tmp/clone-blk-bench-test-{}.sock", ::getpid());
  }

  fs::path dir_, image_;
  std::string socket_;
};

TEST_F(BlkBenchTest, VerifyAgainstQemuStorageDaemonLeavesThePatternInTheImage) {
  StorageDaemon qsd(image_, socket_, dir_ / "qsd.log", 2);
  ASSERT_TRUE(qsd.waitReady()) << qsd.log();
  constexpr uint64_t kSeed = 0x1234abcd;
  RunResult run = runDriver(fmt::format(
      "--socket {} --verify --rw randwrite --queues 2 --iodepth 8 --seconds 1 --seed {}", socket_,
      kSeed));
  ASSERT_EQ(run.exitCode, 0) << run.output << qsd.log();
  EXPECT_NE(run.output.find("verify=ok"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("queues=2"), std::string::npos) << run.output;
  EXPECT_EQ(run.output.find(" ios=0 "), std::string::npos) << run.output;

  // The random reads of a read workload check every byte against the same pattern.
  run = runDriver(fmt::format(
      "--socket {} --rw randread --iodepth 4 --seconds 0.5 --check-all --seed {}", socket_, kSeed));
  ASSERT_EQ(run.exitCode, 0) << run.output << qsd.log();
  EXPECT_NE(run.output.find("iops="), std::string::npos) << run.output;

  qsd.stop();
  std::ifstream in(image_, std::ios::binary);
  std::vector<uint64_t> sector(kWordsPerSector);
  uint64_t bad = 0, first = ~uint64_t{0};
  for (uint64_t s = 0; s < kImageBytes / kSectorBytes; ++s) {
    in.read(reinterpret_cast<char*>(sector.data()), kSectorBytes);
    ASSERT_TRUE(in) << "short image at sector " << s;
    if (!fullSectorMatches(sector.data(), s, kSeed)) {
      if (bad++ == 0) first = s;
    }
  }
  EXPECT_EQ(bad, 0u) << "first bad sector " << first;
}

TEST_F(BlkBenchTest, ReadsOfDataItDidNotWriteFailInsteadOfGivingANumber) {
  StorageDaemon qsd(image_, socket_, dir_ / "qsd.log", 1);
  ASSERT_TRUE(qsd.waitReady()) << qsd.log();
  RunResult run = runDriver(fmt::format(
      "--socket {} --fill --rw read --bs 64K --iodepth 2 --seconds 0.2 --seed 1", socket_));
  ASSERT_EQ(run.exitCode, 0) << run.output << qsd.log();

  run = runDriver(fmt::format("--socket {} --rw randread --seconds 0.2 --seed 2", socket_));
  EXPECT_EQ(run.exitCode, 1) << run.output;
  EXPECT_NE(run.output.find("does not hold the pattern"), std::string::npos) << run.output;
  EXPECT_EQ(run.output.find("iops="), std::string::npos) << run.output;

  // A zeroed disk (never filled) fails the same way; --no-data-check measures it anyway.
  qsd.stop();
  fs::resize_file(image_, 0);
  fs::resize_file(image_, kImageBytes);
  StorageDaemon again(image_, socket_, dir_ / "qsd2.log", 1);
  ASSERT_TRUE(again.waitReady()) << again.log();
  run = runDriver(fmt::format("--socket {} --rw randread --seconds 0.2", socket_));
  EXPECT_EQ(run.exitCode, 1) << run.output;
  run = runDriver(fmt::format("--socket {} --rw randread --seconds 0.2 --no-data-check", socket_));
  EXPECT_EQ(run.exitCode, 0) << run.output;
}

TEST_F(BlkBenchTest, RefusesMoreQueuesThanTheBackendHas) {
  StorageDaemon qsd(image_, socket_, dir_ / "qsd.log", 1);
  ASSERT_TRUE(qsd.waitReady()) << qsd.log();
  RunResult run = runDriver(fmt::format("--socket {} --queues 4 --seconds 0.2 --no-data-check", socket_));
  EXPECT_EQ(run.exitCode, 1) << run.output;
  EXPECT_NE(run.output.find("the back-end has 1 queue(s)"), std::string::npos) << run.output;
}

}  // namespace
}  // namespace clonevm::bench
