// Issue 7: snapshot a running VM into a template and fork it (docs/FORK.md).
// One template VM is booted for the whole suite; every test forks it.
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "tests/support/guest_session.h"

namespace clonevm::e2e {
namespace {

constexpr char kReady[] = "CLONE-GUEST-READY";

struct Outcome {
  int code;
  std::string output;
};

Outcome cloneCli(const std::vector<std::string>& args, std::chrono::milliseconds timeout = 60s) {
  GuestSession process(buildBin("clone"), args);
  process.closeInput();
  auto code = process.waitExit(timeout);
  return {code.value_or(-1), process.output()};
}

std::string shell(const std::string& command) {
  std::string out;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return out;
  char buffer[4096];
  size_t n;
  while ((n = ::fread(buffer, 1, sizeof(buffer), pipe)) > 0) out.append(buffer, n);
  ::pclose(pipe);
  return out;
}

// `clone fork`'s stdout ("ID SOCKET" lines) and stderr (one latency line per fork) arrive on
// one stream here.
struct ForkOutput {
  std::vector<std::pair<std::string, std::string>> forks;
  int latencyLines = 0;
};

ForkOutput parseForkOutput(const std::string& output) {
  ForkOutput result;
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("ms after spawn") != std::string::npos) {
      result.latencyLines++;
      continue;
    }
    std::istringstream words(line);
    std::string id, socket;
    if (words >> id >> socket) result.forks.emplace_back(id, socket);
  }
  return result;
}

bool isNumber(const std::string& text) {
  return !text.empty() && text.find_first_not_of("0123456789") == std::string::npos;
}

std::string fileSha256(const std::string& path) {
  auto out = shell("sha256sum '" + path + "'");
  return out.substr(0, out.find(' '));
}

class ForkTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    base_ = "/tmp/clone-fork-test-" + std::to_string(::getpid());
    std::filesystem::create_directories(base_);
    templateSocket_ = base_ + "/template.sock";
    templateDir_ = base_ + "/template";
    templateVm_ = new GuestSession(
        buildBin("clone"), {"run", "--no-jail", "--kernel", guestKernel(), "--initrd",
                            guestInitrd(), "--cmdline", "console=ttyS0 panic=-1 quiet", "--mem-mb",
                            "256", "--api-socket", templateSocket_,
                            // Snapshots refuse virtio devices so far (docs/FORK.md).
                            "--no-vsock"});
    if (!templateVm_->expect(kReady)) {
      setupError_ = "the template VM did not boot:\n" + templateVm_->output();
      return;
    }
    // A process that must survive into every fork.
    // (mv: a reader never sees the file empty between truncate and write)
    // (in a subshell: run() appends "; echo END", and "&;" is a syntax error)
    templateVm_->run(
        "(sh -c 'while :; do date +%s > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 1; done' "
        ">/dev/null 2>&1 &)");
    auto tick = templateVm_->run("sleep 2; cat /tmp/tick");
    if (!tick || !isNumber(*tick)) {
      setupError_ = "the ticker did not start in the template VM:\n" + templateVm_->output();
      return;
    }
    auto snapshot = cloneCli({"snapshot", "--vm", templateSocket_, "--output", templateDir_});
    if (snapshot.code != 0) {
      setupError_ = "clone snapshot failed:\n" + snapshot.output + "\n" + templateVm_->output();
      return;
    }
    snapshotOutput_ = snapshot.output;
    memoryHash_ = fileSha256(templateDir_ + "/memory");
  }

  static void TearDownTestSuite() {
    if (templateVm_ != nullptr) {
      cloneCli({"shutdown", "--vm", templateSocket_});
      templateVm_->waitExit(10s);
      delete templateVm_;
      templateVm_ = nullptr;
    }
    std::error_code ignored;
    std::filesystem::remove_all(base_, ignored);
  }

  void SetUp() override { ASSERT_TRUE(setupError_.empty()) << setupError_; }

  // A fork whose serial console is this test's (clone-vmm --restore on pipes).
  std::unique_ptr<GuestSession> startFork(const std::string& name) {
    return std::make_unique<GuestSession>(
        buildBin("clone-vmm"), std::vector<std::string>{"--restore", templateDir_, "--api-socket",
                                                        base_ + "/" + name + ".sock"});
  }

  static bool answers(GuestSession& vm, std::chrono::milliseconds timeout = 30s) {
    auto answer = vm.run("echo ALIVE-$((20+22))", timeout);
    return answer && *answer == "ALIVE-42";
  }

  static void stop(GuestSession& vm) {
    vm.sendLine("poweroff -f");
    if (!vm.waitExit(15s)) ADD_FAILURE() << "a fork did not power off";
  }

  static inline std::string base_;
  static inline std::string templateSocket_;
  static inline std::string templateDir_;
  static inline GuestSession* templateVm_ = nullptr;
  static inline std::string setupError_;
  static inline std::string snapshotOutput_;
  static inline std::string memoryHash_;
};

TEST_F(ForkTest, TemplateFilesAreReadOnlyAndSparse) {
  for (const char* name : {"memory", "state", "manifest.json"}) {
    struct stat st {};
    ASSERT_EQ(::stat((templateDir_ + "/" + name).c_str(), &st), 0) << name;
    EXPECT_EQ(st.st_mode & 0777, 0444u) << name;
  }
  struct stat memory {};
  ASSERT_EQ(::stat((templateDir_ + "/memory").c_str(), &memory), 0);
  EXPECT_EQ(memory.st_size, 256 << 20);
  EXPECT_LT(static_cast<uint64_t>(memory.st_blocks) * 512, static_cast<uint64_t>(memory.st_size))
      << "zero pages were written";
  // The template VM runs on after the snapshot.
  EXPECT_TRUE(answers(*templateVm_)) << templateVm_->output();
}

TEST_F(ForkTest, ForkIsAliveAndKeepsTime) {
  auto fork = startFork("alive");
  auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(answers(*fork, 30s)) << fork->output();
  auto answered = std::chrono::steady_clock::now() - start;
  std::cerr << "fork answered its console after "
            << std::chrono::duration_cast<std::chrono::milliseconds>(answered).count() << " ms\n";

  // `sleep 1` takes about a second of host time: the guest's clocks and timers run. (The
  // first run faults in what the shell needs to fork and exec: not timed.)
  ASSERT_TRUE(fork->run("sleep 1")) << fork->output();
  auto before = std::chrono::steady_clock::now();
  ASSERT_TRUE(fork->run("sleep 1")) << fork->output();
  double slept = std::chrono::duration<double>(std::chrono::steady_clock::now() - before).count();
  EXPECT_GT(slept, 0.9);
  EXPECT_LT(slept, 4.0) << "sleep 1 took " << slept << " s";

  // The background process of the template still runs in the fork: /tmp/tick advances.
  auto first = fork->run("cat /tmp/tick");
  ASSERT_TRUE(first && isNumber(*first)) << fork->output();
  ASSERT_TRUE(fork->run("sleep 3")) << fork->output();
  auto second = fork->run("cat /tmp/tick");
  ASSERT_TRUE(second && isNumber(*second)) << fork->output();
  EXPECT_GT(std::stoll(*second), std::stoll(*first)) << fork->output();
  // ([w]: the grep itself does not match)
  auto jobs = fork->run("ps | grep -c '[w]hile'");
  ASSERT_TRUE(jobs && isNumber(*jobs)) << fork->output();
  EXPECT_GE(std::stoi(*jobs), 1) << fork->output();
  stop(*fork);
  std::cerr << "fork log:\n" << fork->output() << "\n";
}

TEST_F(ForkTest, ForksDivergeAndTheTemplateStaysIntact) {
  auto a = startFork("a");
  auto b = startFork("b");
  ASSERT_TRUE(answers(*a)) << a->output();
  ASSERT_TRUE(answers(*b)) << b->output();
  ASSERT_TRUE(a->run("echo from-a > /tmp/only-in-a; sync"));
  ASSERT_TRUE(b->run("dd if=/dev/urandom of=/tmp/b-noise bs=1M count=8 2>/dev/null; echo ok"));
  auto inA = a->run("cat /tmp/only-in-a");
  ASSERT_TRUE(inA);
  EXPECT_EQ(*inA, "from-a");
  auto inB = b->run("test -e /tmp/only-in-a && echo PRESENT || echo ABSENT");
  ASSERT_TRUE(inB);
  EXPECT_EQ(*inB, "ABSENT");
  auto inTemplate = templateVm_->run("test -e /tmp/only-in-a && echo PRESENT || echo ABSENT");
  ASSERT_TRUE(inTemplate) << templateVm_->output();
  EXPECT_EQ(*inTemplate, "ABSENT");
  stop(*a);
  stop(*b);
  EXPECT_EQ(fileSha256(templateDir_ + "/memory"), memoryHash_)
      << "the template's memory file changed after forks wrote";
}

TEST_F(ForkTest, TwentyConcurrentForksAllAnswer) {
  std::vector<std::unique_ptr<GuestSession>> forks;
  for (int i = 0; i < 20; ++i) forks.push_back(startFork("many-" + std::to_string(i)));
  int alive = 0;
  for (auto& fork : forks) {
    if (answers(*fork, 90s)) {
      ++alive;
    } else {
      ADD_FAILURE() << "a fork did not answer:\n" << fork->output();
    }
  }
  EXPECT_EQ(alive, 20);
  for (auto& fork : forks) stop(*fork);
  EXPECT_EQ(fileSha256(templateDir_ + "/memory"), memoryHash_);
}

TEST_F(ForkTest, CliForkListDestroy) {
  std::string prefix = base_ + "/cli";
  auto fork = cloneCli({"fork", "--template", templateDir_, "--count", "3", "--api-socket", prefix});
  ASSERT_EQ(fork.code, 0) << fork.output;
  auto printed = parseForkOutput(fork.output);
  std::vector<std::string> sockets;
  for (const auto& [id, socket] : printed.forks) {
    EXPECT_EQ(id.rfind("fork-", 0), 0u) << fork.output;
    sockets.push_back(socket);
  }
  ASSERT_EQ(sockets.size(), 3u) << fork.output;
  EXPECT_EQ(printed.latencyLines, 3) << fork.output;
  for (const auto& s : sockets) {
    auto status = cloneCli({"status", "--vm", s, "--json"});
    EXPECT_NE(status.output.find(R"("state":"running")"), std::string::npos) << status.output;
  }
  for (const auto& s : sockets) {
    auto destroy = cloneCli({"destroy", "--vm", s});
    EXPECT_EQ(destroy.code, 0) << destroy.output;
    EXPECT_NE(::access(s.c_str(), F_OK), 0) << s << " outlived its fork";
  }
}

TEST_F(ForkTest, CliListShowsForksInTheRuntimeDir) {
  std::string runtime = base_ + "/runtime";
  std::filesystem::create_directories(runtime);
  ::setenv("CLONE_RUNTIME_DIR", runtime.c_str(), 1);
  auto fork = cloneCli({"fork", "--template", templateDir_});
  ASSERT_EQ(fork.code, 0) << fork.output;
  auto printed = parseForkOutput(fork.output);
  ASSERT_EQ(printed.forks.size(), 1u) << fork.output;
  auto [id, socket] = printed.forks[0];
  EXPECT_EQ(socket.rfind(runtime, 0), 0u) << fork.output;
  auto list = cloneCli({"list"});
  EXPECT_EQ(list.code, 0) << list.output;
  EXPECT_NE(list.output.find(id), std::string::npos) << list.output;
  EXPECT_NE(list.output.find("running"), std::string::npos) << list.output;
  EXPECT_EQ(cloneCli({"destroy", "--vm", socket}).code, 0);
  ::unsetenv("CLONE_RUNTIME_DIR");
}

TEST_F(ForkTest, SnapshotOfAVmWithVsockIsRefusedWithTheWayOut) {
  std::string socket = base_ + "/vsock.sock";
  GuestSession vm(buildBin("clone"), {"run", "--no-jail", "--kernel", guestKernel(), "--initrd",
                                      guestInitrd(), "--cmdline", "console=ttyS0 panic=-1 quiet",
                                      "--mem-mb", "128", "--api-socket", socket});
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  std::string dir = base_ + "/vsock-template";
  auto snapshot = cloneCli({"snapshot", "--vm", socket, "--output", dir});
  EXPECT_NE(snapshot.code, 0) << snapshot.output;
  EXPECT_NE(snapshot.output.find("1 vsock"), std::string::npos) << snapshot.output;
  EXPECT_NE(snapshot.output.find("--no-vsock"), std::string::npos) << snapshot.output;
  EXPECT_FALSE(std::filesystem::exists(dir + "/manifest.json")) << "a refused snapshot left a template";
  EXPECT_EQ(cloneCli({"destroy", "--vm", socket}).code, 0);
}

TEST_F(ForkTest, CorruptedTemplatesAreRefused) {
  std::string flipped = base_ + "/flipped";
  std::string truncated = base_ + "/truncated";
  std::string wrongVersion = base_ + "/version";
  for (const auto& dir : {flipped, truncated, wrongVersion}) {
    ASSERT_EQ(std::system(("cp -a --sparse=always '" + templateDir_ + "' '" + dir + "' && chmod u+w '" +
                           dir + "'/*").c_str()),
              0);
  }
  ASSERT_EQ(std::system(("printf '\\377' | dd of='" + flipped +
                         "/state' bs=1 seek=200 conv=notrunc 2>/dev/null").c_str()),
            0);
  ASSERT_EQ(std::system(("truncate -s -1M '" + truncated + "/memory'").c_str()), 0);
  ASSERT_EQ(std::system(("sed -i 's/\"version\": 1/\"version\": 9/' '" + wrongVersion +
                         "/manifest.json'").c_str()),
            0);
  struct Case {
    std::string dir;
    std::string reason;
  };
  for (const auto& c : {Case{flipped, "SHA-256"}, Case{truncated, "truncated"},
                        Case{wrongVersion, "version 9"}}) {
    auto fork = cloneCli({"fork", "--template", c.dir});
    EXPECT_EQ(fork.code, 1) << fork.output;
    EXPECT_NE(fork.output.find(c.reason), std::string::npos) << fork.output;
    // The VMM itself refuses it too (it may be started without the CLI).
    GuestSession vmm(buildBin("clone-vmm"), {"--restore", c.dir});
    vmm.closeInput();
    EXPECT_EQ(vmm.waitExit(10s), 1) << vmm.output();
    EXPECT_NE(vmm.output().find(c.reason), std::string::npos) << vmm.output();
  }
}

}  // namespace
}  // namespace clonevm::e2e
