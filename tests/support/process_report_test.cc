#include "tests/support/process_report.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>

#include <csignal>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <string>

#include <gtest/gtest.h>

#include "tests/support/guest_session.h"

namespace clonevm::e2e {
namespace {

TEST(ProcessReportTest, FindsAProcessByItsCommandLineAndListsItsThreads) {
  std::string marker = "process-report-marker-" + std::to_string(::getpid());
  GuestSession sleeper("/bin/sh", {"-c", "sleep 30 # " + marker});
  std::string report;
  for (int i = 0; i < 100 && report.empty(); ++i) {
    report = describeProcessesMatching(marker);
    if (report.empty()) ::usleep(10000);
  }
  EXPECT_NE(report.find("process "), std::string::npos) << report;
  EXPECT_NE(report.find(marker), std::string::npos) << report;
  EXPECT_NE(report.find("  thread "), std::string::npos) << report;
  EXPECT_NE(report.find("wchan="), std::string::npos) << report;
}

TEST(ProcessReportTest, FindsAThreadByWhereItWaits) {
  // Waits reading its stdin pipe (the wait channel's name depends on the kernel: pipe_read,
  // anon_pipe_read): found once by command line, then again by its wait channel.
  std::string marker = "wait-marker-" + std::to_string(::getpid());
  GuestSession reader("/bin/sh", {"-c", "read line # " + marker});
  std::smatch match;
  std::string byName;
  for (int i = 0; i < 200; ++i) {
    byName = describeProcessesMatching(marker);
    if (std::regex_search(byName, match, std::regex(R"(wchan=(\w*pipe_read))"))) break;
    ::usleep(10000);
  }
  ASSERT_FALSE(match.empty()) << byName;
  std::string byWait = describeThreadsWaitingIn(match[1]);
  EXPECT_NE(byWait.find(marker), std::string::npos) << byWait;
  EXPECT_EQ(describeThreadsWaitingIn("no_such_wait_channel"), "");
}

TEST(ProcessReportTest, AKvmTraceSaysWhyThereIsNone) {
  // No process has this text, so no vCPU thread: the trace says so instead of tracing.
  EXPECT_EQ(traceKvmOfProcessesMatching("no-process-has-this-" + std::to_string(::getpid()) + "-x",
                                        std::chrono::milliseconds(10)),
            "(no vCPU thread to trace)\n");
}

TEST(ProcessReportTest, AStuckVmReportHasEveryPart) {
  std::string marker = "stuck-vm-marker-" + std::to_string(::getpid());
  GuestSession sleeper("/bin/sh", {"-c", "sleep 30 # " + marker});
  std::string report;
  for (int i = 0; i < 100 && report.find("process ") == std::string::npos; ++i) {
    report = describeStuckVm(marker);
    ::usleep(10000);
  }
  EXPECT_NE(report.find("--- its processes:\nprocess "), std::string::npos) << report;
  EXPECT_NE(report.find("--- host threads waiting for a userfaultfd fill:\n"), std::string::npos) << report;
  EXPECT_NE(report.find("--- (no vCPU thread to trace)\n"), std::string::npos) << report;
}

TEST(ProcessReportTest, NothingMatchesGivesNothing) {
  EXPECT_EQ(describeProcessesMatching("no-process-has-this-" + std::to_string(::getpid()) + "-x"), "");
}

TEST(ProcessReportTest, MeasuresACopyOnWriteMappingOfAFile) {
  constexpr size_t kPages = 64, kPage = 4096;
  auto path = std::filesystem::temp_directory_path() /
              ("process-report-map-" + std::to_string(::getpid()));
  {
    std::ofstream out(path, std::ios::binary);
    std::string bytes(kPages * kPage, 'x');
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  // Another process maps the file and reads every page: pages both read count as shared.
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    int fd = ::open(path.c_str(), O_RDONLY);
    auto* other = static_cast<volatile char*>(::mmap(nullptr, kPages * kPage, PROT_READ, MAP_SHARED, fd, 0));
    char sum = 0;
    for (size_t page = 0; page < kPages; ++page) sum += other[page * kPage];
    (void)!::write(ready[1], &sum, 1);
    ::pause();
    ::_exit(0);
  }
  char byte;
  ASSERT_EQ(::read(ready[0], &byte, 1), 1);
  int fd = ::open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  auto* first = static_cast<volatile char*>(
      ::mmap(nullptr, kPages * kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0));
  ::close(fd);
  ASSERT_NE(first, MAP_FAILED);
  char sum = 0;
  for (size_t page = 0; page < kPages; ++page) sum += first[page * kPage];
  for (size_t page = 0; page < 8; ++page) first[page * kPage] = sum;  // 8 private copies

  auto self = std::to_string(::getpid());
  std::ifstream cmdline("/proc/self/cmdline");
  std::string name;
  std::getline(cmdline, name, '\0');
  auto usage = fileMappingUsage(name, path.string());
  uint64_t anonymous = anonymousKib(name);
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  ::close(ready[0]);
  ::close(ready[1]);
  ::munmap(const_cast<char*>(first), kPages * kPage);
  std::filesystem::remove(path);
  // This process and its child (same command line), one mapping each.
  EXPECT_EQ(usage.mappings, 2);
  EXPECT_EQ(usage.anonymous, 8 * kPage / 1024);
  EXPECT_EQ(usage.rss, 2 * kPages * kPage / 1024);
  // The 56 pages this process did not write are mapped by both: shared, in each mapping.
  EXPECT_EQ(usage.shared, 2 * (kPages - 8) * kPage / 1024);
  EXPECT_EQ(fileMappingUsage("no-such-process-text-" + self, path.string()).mappings, 0);
  // The 8 written pages are anonymous memory, among the rest of this process's.
  EXPECT_GE(anonymous, 8 * kPage / 1024);
  EXPECT_EQ(anonymousKib("no-such-process-text-" + self), 0u);
}

TEST(ProcessReportTest, FileTailKeepsTheLastLines) {
  std::string path = ::testing::TempDir() + "/tail-" + std::to_string(::getpid());
  {
    std::ofstream out(path);
    for (int i = 1; i <= 10; ++i) out << "line " << i << "\n";
  }
  EXPECT_EQ(fileTail(path, 3), "line 8\nline 9\nline 10\n");
  EXPECT_EQ(fileTail(path, 50).substr(0, 7), "line 1\n");
  std::filesystem::remove(path);
  EXPECT_NE(fileTail(path).find("cannot read"), std::string::npos);
}

}  // namespace
}  // namespace clonevm::e2e
