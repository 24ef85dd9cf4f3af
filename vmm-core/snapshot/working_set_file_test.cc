// The `workingset` file: written and read back, older formats still read, damaged files and
// sets from a fork that break the rules refused, and a file in place never replaced.
#include "vmm-core/snapshot/working_set_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>

#include "common/error.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::vmm::snapshot {
namespace {

constexpr uint64_t kMemory = 64 << 20;

class WorkingSetFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/working-set-" + std::to_string(::getpid()) + "-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::string file() const { return dir_ + "/" + kWorkingSetFile; }

  // A file of `magic`, `granule` and `entries`, as an older build or a damaged disk left it.
  void writeRaw(const char* magic, uint64_t granule, const std::vector<uint64_t>& entries,
                int64_t countDelta = 0) {
    std::ofstream out(file(), std::ios::binary);
    out.write(magic, 8);
    uint64_t count = entries.size() + countDelta;
    out.write(reinterpret_cast<const char*>(&granule), 8);
    out.write(reinterpret_cast<const char*>(&count), 8);
    out.write(reinterpret_cast<const char*>(entries.data()), static_cast<std::streamsize>(entries.size() * 8));
  }

  std::string dir_;
};

TEST_F(WorkingSetFileTest, WrittenPagesSurviveARoundTripAndTheFileIsReadOnly) {
  WorkingSet set{.pages = {0, 0x1000, 0x5000, 0x3ff000}, .written = {0x1000, 0x3ff000}};
  ASSERT_TRUE(linkWorkingSetFile(AT_FDCWD, dir_, set, "test"));
  auto read = readWorkingSetFile(file(), kMemory);
  EXPECT_EQ(read.pages, set.pages);
  EXPECT_EQ(read.written, set.written);
  struct stat info {};
  ASSERT_EQ(::stat(file().c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0444u);
  EXPECT_EQ(info.st_size, 24 + 4 * 8);
  // The private name is gone: only the file itself is left.
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 1);
}

TEST_F(WorkingSetFileTest, AFileInPlaceIsNeverReplaced) {
  ASSERT_TRUE(linkWorkingSetFile(AT_FDCWD, dir_, {.pages = {0x2000}}, "first"));
  EXPECT_FALSE(linkWorkingSetFile(AT_FDCWD, dir_, {.pages = {0x4000, 0x8000}}, "second"));
  EXPECT_EQ(readWorkingSetFile(file(), kMemory).pages, std::vector<uint64_t>{0x2000});
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir_), {}), 1);
}

TEST_F(WorkingSetFileTest, WritesThroughADirectoryFd) {
  int dirFd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  ASSERT_GE(dirFd, 0);
  EXPECT_TRUE(linkWorkingSetFile(dirFd, "the template", {.pages = {0x7000}, .written = {0x7000}}, "fd"));
  ::close(dirFd);
  EXPECT_EQ(readWorkingSetFile(file(), kMemory).written, std::vector<uint64_t>{0x7000});
}

TEST_F(WorkingSetFileTest, AMissingFileIsAnEmptySet) {
  auto read = readWorkingSetFile(file(), kMemory);
  EXPECT_TRUE(read.pages.empty());
  EXPECT_TRUE(read.written.empty());
}

TEST_F(WorkingSetFileTest, VersionOneFilesAndLargerGranulesAreRead) {
  // Version 1 has no written bit: an odd offset is just not page aligned, and is dropped.
  writeRaw("CLWSET01", 64 << 10, {0, 0x20000, 0x20001});
  auto read = readWorkingSetFile(file(), kMemory);
  ASSERT_EQ(read.pages.size(), 32u);  // two 64 KiB chunks of 16 pages
  EXPECT_EQ(read.pages.front(), 0u);
  EXPECT_EQ(read.pages[16], 0x20000u);
  EXPECT_EQ(read.pages.back(), 0x2f000u);
  EXPECT_TRUE(read.written.empty());
}

TEST_F(WorkingSetFileTest, EntriesOutsideGuestMemoryAreDropped) {
  writeRaw("CLWSET02", 4096, {0x1000 | 1, kMemory, (kMemory + 0x1000) | 1, 0x1234});
  auto read = readWorkingSetFile(file(), kMemory);
  EXPECT_EQ(read.pages, std::vector<uint64_t>{0x1000});
  EXPECT_EQ(read.written, std::vector<uint64_t>{0x1000});
}

TEST_F(WorkingSetFileTest, DamagedFilesAreRefusedWithTheirReason) {
  auto refusal = [&] {
    try {
      readWorkingSetFile(file(), kMemory);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("read without an error");
  };
  writeRaw("CLWSET09", 4096, {0});
  EXPECT_NE(refusal().find("not a working set file"), std::string::npos) << refusal();
  writeRaw("CLWSET02", 3000, {0});
  EXPECT_NE(refusal().find("granularity 3000"), std::string::npos) << refusal();
  writeRaw("CLWSET02", 4096, {0, 0x1000}, 1);
  EXPECT_NE(refusal().find("does not match its size"), std::string::npos) << refusal();
  std::filesystem::resize_file(file(), 10);
  EXPECT_NE(refusal().find("10 bytes is no working set file"), std::string::npos) << refusal();
}

TEST_F(WorkingSetFileTest, ASetFromAForkMustKeepTheRules) {
  auto problem = [](const WorkingSet& set) {
    try {
      checkWorkingSet(set, kMemory);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_EQ(problem({.pages = {0, 0x1000}, .written = {0x1000}}), "");
  EXPECT_EQ(problem({}), "");
  EXPECT_NE(problem({.pages = {0x1001}}).find("not 4 KiB aligned"), std::string::npos);
  EXPECT_NE(problem({.pages = {kMemory}}).find("beyond the guest's 64 MiB"), std::string::npos);
  EXPECT_NE(problem({.pages = {0x2000, 0x1000}}).find("not in increasing order"), std::string::npos);
  EXPECT_NE(problem({.pages = {0x1000, 0x1000}}).find("not in increasing order"), std::string::npos);
  EXPECT_NE(problem({.pages = {0x1000}, .written = {0x2000}}).find("not in the working set"),
            std::string::npos);
}

}  // namespace
}  // namespace clonevm::vmm::snapshot
