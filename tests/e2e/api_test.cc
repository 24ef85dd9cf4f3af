// Issue 4: pause, resume and shutdown over the Cap'n Proto VM control API.
#include <unistd.h>

#include <gtest/gtest.h>

#include "tests/support/guest_session.h"

namespace clonevm::e2e {
namespace {

struct Outcome {
  int code;
  std::string output;
};

Outcome cloneCli(const std::vector<std::string>& args) {
  GuestSession process(buildBin("clone"), args);
  process.closeInput();
  auto code = process.waitExit(30s);
  return {code.value_or(-1), process.output()};
}

std::string socketPath() { return "/tmp/clone-api-test-" + std::to_string(::getpid()) + ".sock"; }

TEST(ApiTest, PauseResumeShutdown) {
  std::string socket = socketPath();
  GuestSession vm(buildBin("clone"),
                  {"run", "--no-jail", "--kernel", guestKernel(), "--initrd", guestInitrd(),
                   "--cmdline", "console=ttyS0 quiet", "--api-socket", socket});
  ASSERT_TRUE(vm.expect("CLONE-GUEST-READY")) << vm.output();

  auto status = cloneCli({"status", "--vm", socket, "--json"});
  EXPECT_EQ(status.code, 0) << status.output;
  EXPECT_NE(status.output.find(R"("state":"running")"), std::string::npos) << status.output;
  EXPECT_NE(status.output.find(R"("vcpus":1)"), std::string::npos) << status.output;
  // A booted VM has no template to fill its memory from.
  EXPECT_NE(status.output.find(R"("memory_fill":null)"), std::string::npos) << status.output;

  auto pause = cloneCli({"pause", "--vm", socket});
  ASSERT_EQ(pause.code, 0) << pause.output;
  status = cloneCli({"status", "--vm", socket, "--json"});
  EXPECT_NE(status.output.find(R"("state":"paused")"), std::string::npos) << status.output;

  // A paused guest runs nothing: the command typed now is answered only after resume.
  vm.sendLine("echo ANSWER-$((40+2))");
  EXPECT_FALSE(vm.expect("ANSWER-42", 3s)) << "a paused guest answered";
  auto resume = cloneCli({"resume", "--vm", socket});
  ASSERT_EQ(resume.code, 0) << resume.output;
  EXPECT_TRUE(vm.expect("ANSWER-42", 30s)) << vm.output();

  auto shutdown = cloneCli({"shutdown", "--vm", socket});
  EXPECT_EQ(shutdown.code, 0) << shutdown.output;
  EXPECT_EQ(vm.waitExit(10s), 0) << vm.output();
  EXPECT_NE(::access(socket.c_str(), F_OK), 0) << "the API socket outlived the VM";
}

TEST(ApiTest, ClearErrorWithoutAVm) {
  auto status = cloneCli({"status", "--vm", "/tmp/clone-no-such-vm.sock"});
  EXPECT_EQ(status.code, 1);
  EXPECT_NE(status.output.find("/tmp/clone-no-such-vm.sock"), std::string::npos) << status.output;
}

}  // namespace
}  // namespace clonevm::e2e
