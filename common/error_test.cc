#include "common/error.h"

#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace clonevm {
namespace {

TEST(ErrorTest, SyscallFailureNamesStepPathAndErrno) {
  try {
    CLONE_SYSCALL(::open("/nonexistent/clone-test", O_RDONLY), "open kernel image",
                  "/nonexistent/clone-test");
    FAIL() << "open of a missing file did not throw";
  } catch (const SystemError& e) {
    EXPECT_EQ(e.code(), ENOENT);
    EXPECT_STREQ(e.what(), "open kernel image /nonexistent/clone-test: No such file or directory");
  }
}

TEST(ErrorTest, SyscallSuccessReturnsValue) {
  int fd = CLONE_SYSCALL(::open("/dev/null", O_RDONLY), "open", "/dev/null");
  EXPECT_GE(fd, 0);
  ::close(fd);
}

TEST(ErrorTest, RequireFormatsMessage) {
  EXPECT_NO_THROW(require(true, "never {}", 1));
  try {
    require(false, "vcpus must be between 1 and {}, got {}", 8, 0);
    FAIL() << "require(false) did not throw";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "vcpus must be between 1 and 8, got 0");
  }
}

}  // namespace
}  // namespace clonevm
