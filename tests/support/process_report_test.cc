#include "tests/support/process_report.h"

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
