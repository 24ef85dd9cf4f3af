#include "tests/support/guest_session.h"

#include <gtest/gtest.h>

namespace clonevm::e2e {
namespace {

// /bin/sh stands in for a guest's serial console: run() frames a command the same way.
TEST(GuestSessionTest, RunReturnsTheCommandsOutput) {
  GuestSession shell("/bin/sh", {});
  auto out = shell.run("echo one; echo two");
  ASSERT_TRUE(out) << shell.output();
  EXPECT_EQ(*out, "one\ntwo");
}

TEST(GuestSessionTest, AVmmLogLineInsideTheOutputIsNotPartOfIt) {
  GuestSession shell("/bin/sh", {});
  // As seen in the lab: the core's log line lands between "ALIVE-42" and its line break.
  auto out = shell.run(
      "printf 'ALIVE-42'; "
      "printf '2026-11-23 22:22:40.523 info  vmm[560]: recorded the working set\\n'; echo; "
      "printf '2026-11-23 22:22:40.600 warning clone-block[7]: a warning\\n'; echo after");
  ASSERT_TRUE(out) << shell.output();
  EXPECT_EQ(*out, "ALIVE-42\nafter");
}

TEST(GuestSessionTest, OutputThatOnlyLooksLikeALogLineInPartStays) {
  GuestSession shell("/bin/sh", {});
  auto out = shell.run("echo '2026-11-23 22:22:40 not a log line'");
  ASSERT_TRUE(out) << shell.output();
  EXPECT_EQ(*out, "2026-11-23 22:22:40 not a log line");
}

}  // namespace
}  // namespace clonevm::e2e
