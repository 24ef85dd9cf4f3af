// Issue 3: bad input to clone run gets one clear line on stderr and a non-zero exit.
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "tests/support/guest_session.h"

namespace clonevm::e2e {
namespace {

struct Outcome {
  int code;
  std::string output;
};

Outcome runClone(std::vector<std::string> args) {
  GuestSession process(buildBin("clone"), args);
  process.closeInput();
  auto code = process.waitExit(20s);
  return {code.value_or(-1), process.output()};
}

std::string tempFile(const std::string& name, const std::string& contents) {
  auto path = std::filesystem::temp_directory_path() / ("clone-bad-input-" + name);
  std::ofstream(path) << contents;
  return path.string();
}

void expectOneClearLine(const Outcome& outcome, const std::string& mustContain) {
  EXPECT_NE(outcome.code, 0) << outcome.output;
  EXPECT_NE(outcome.code, -1) << "timed out\n" << outcome.output;
  EXPECT_NE(outcome.output.find(mustContain), std::string::npos) << outcome.output;
  // One line of error; --no-jail's warning is the only other line allowed.
  std::istringstream lines(outcome.output);
  int errorLines = 0;
  for (std::string line; std::getline(lines, line);) {
    if (line.rfind("clone: warning: --no-jail", 0) != 0) ++errorLines;
  }
  EXPECT_EQ(errorLines, 1) << outcome.output;
}

TEST(BadInputTest, MissingKernel) {
  expectOneClearLine(runClone({"run", "--no-jail", "--kernel", "/nonexistent/vmlinuz"}),
                     "/nonexistent/vmlinuz");
}

TEST(BadInputTest, NotAKernel) {
  auto path = tempFile("not-a-kernel", std::string(8192, 'x'));
  expectOneClearLine(runClone({"run", "--no-jail", "--kernel", path}), path);
}

TEST(BadInputTest, TruncatedBzImage) {
  std::ifstream in(guestKernel(), std::ios::binary);
  std::string head(64 * 1024, '\0');
  in.read(head.data(), static_cast<std::streamsize>(head.size()));
  auto path = tempFile("truncated-bzimage", head);
  expectOneClearLine(runClone({"run", "--no-jail", "--kernel", path}), "truncated");
}

TEST(BadInputTest, InitrdLargerThanRam) {
  auto path = std::filesystem::temp_directory_path() / "clone-bad-input-huge-initrd";
  {
    std::ofstream out(path);
  }
  std::filesystem::resize_file(path, 200ull << 20);  // sparse
  expectOneClearLine(runClone({"run", "--no-jail", "--kernel", guestKernel(), "--initrd",
                               path.string(), "--mem-mb", "128"}),
                     "initrd");
  std::filesystem::remove(path);
}

TEST(BadInputTest, MemoryTooSmallOrBeyondHost) {
  expectOneClearLine(runClone({"run", "--no-jail", "--kernel", guestKernel(), "--mem-mb", "8"}),
                     "--mem-mb");
  expectOneClearLine(
      runClone({"run", "--no-jail", "--kernel", guestKernel(), "--mem-mb", "100000000"}),
      "--mem-mb");
}

TEST(BadInputTest, VcpuCountOutOfRange) {
  expectOneClearLine(runClone({"run", "--no-jail", "--kernel", guestKernel(), "--vcpus", "0"}),
                     "--vcpus");
  expectOneClearLine(runClone({"run", "--no-jail", "--kernel", guestKernel(), "--vcpus", "4096"}),
                     "--vcpus");
}

}  // namespace
}  // namespace clonevm::e2e
