// Issue 7: snapshot a running VM into a template and fork it (docs/FORK.md).
// One template VM (with its vsock device and guest agent) is booted for the whole suite; every
// test forks it. Forks are driven through their serial consoles (clone-vmm --restore on pipes)
// or through `clone fork` + `clone exec` (the guest agent at each fork's own CID).
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include <fmt/format.h>

#include "ipc/fork-server/fork_request.h"
#include "tests/support/guest_session.h"
#include "tests/support/process_report.h"

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
  int identityLines = 0;  // latency lines saying the identity was applied
};

ForkOutput parseForkOutput(const std::string& output) {
  ForkOutput result;
  static const std::regex latency(R"(^fork (fork-[0-9a-f]{8}): ready \((.*)\) ([0-9.]+) ms after spawn(; API answered after [0-9.]+ ms)?$)");
  std::istringstream lines(output);
  for (std::string line; std::getline(lines, line);) {
    std::smatch match;
    if (std::regex_match(line, match, latency)) {
      result.latencyLines++;
      if (match[2] == "agent answered, identity applied") result.identityLines++;
      continue;
    }
    // "ID SOCKET" lines only: errors, notes and the logs a failure quotes are not forks.
    static const std::regex forkLine(R"(^(fork-[0-9a-f]{8}) (/\S+)$)");
    std::smatch fork;
    if (std::regex_match(line, fork, forkLine)) result.forks.emplace_back(fork[1], fork[2]);
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

// `clone exec --vm SOCKET -- argv...` (stdout and stderr on one stream).
Outcome execIn(const std::string& socket, std::vector<std::string> argv,
               std::chrono::milliseconds timeout = 60s, int guestTimeoutSeconds = 50) {
  std::vector<std::string> args = {"exec", "--vm", socket, "--timeout",
                                   std::to_string(guestTimeoutSeconds), "--"};
  args.insert(args.end(), argv.begin(), argv.end());
  return cloneCli(args, timeout);
}

std::string withoutNewline(std::string text) {
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  return text;
}

// The CID a VM's status reports (0 when none or on error, with a failure recorded).
uint32_t vsockCid(const std::string& socket) {
  auto status = cloneCli({"status", "--vm", socket, "--json"});
  std::smatch match;
  if (status.code != 0 || !std::regex_search(status.output, match, std::regex(R"("vsock_cid":(\d+))"))) {
    ADD_FAILURE() << "no vsock_cid in the status of " << socket << ": " << status.output;
    return 0;
  }
  return static_cast<uint32_t>(std::stoul(match[1]));
}

// Forks started with `clone fork --count N --api-socket PREFIX`, destroyed at the end.
class CliForks {
 public:
  CliForks(const std::string& templateDir, const std::string& prefix, int count,
           std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"fork", "--template", templateDir, "--count", std::to_string(count),
                                     "--api-socket", prefix};
    args.insert(args.end(), extra.begin(), extra.end());
    // The forks' console logs go where a failure can quote them.
    const char* runtime = std::getenv("CLONE_RUNTIME_DIR");
    bool ownRuntime = runtime == nullptr || *runtime == '\0';
    runtime_ = ownRuntime ? prefix + ".runtime" : runtime;
    std::filesystem::create_directories(runtime_);
    if (ownRuntime) ::setenv("CLONE_RUNTIME_DIR", runtime_.c_str(), 1);
    auto fork = cloneCli(args, 120s);
    if (ownRuntime) ::unsetenv("CLONE_RUNTIME_DIR");
    code = fork.code;
    output = fork.output;
    printed = parseForkOutput(fork.output);
  }
  ~CliForks() {
    if (::testing::Test::HasFailure()) {
      for (const auto& [id, socket] : printed.forks) std::cerr << diagnosis(id, socket);
    }
    for (const auto& [id, socket] : printed.forks) {
      auto destroyed = cloneCli({"destroy", "--vm", socket});
      if (destroyed.code != 0) ADD_FAILURE() << "destroy " << id << ": " << destroyed.output;
    }
  }
  // Did `clone fork` start `count` forks, each with its identity applied?
  ::testing::AssertionResult allReady(int count) const {
    if (code == 0 && static_cast<int>(printed.forks.size()) == count && printed.identityLines == count) {
      return ::testing::AssertionSuccess();
    }
    return ::testing::AssertionFailure() << "clone fork exited " << code << ":\n" << output;
  }
  const std::string& socket(size_t i) const { return printed.forks.at(i).second; }
  const std::string& id(size_t i) const { return printed.forks.at(i).first; }
  std::string consoleLog(size_t i) const { return runtime_ + "/" + id(i) + ".console"; }

  int code = -1;
  std::string output;
  ForkOutput printed;

 private:
  // For a failed test: does the fork's agent still answer (and then the guest's blocked
  // tasks, sysrq-w), where do its processes' threads wait, which host threads wait for a
  // memory fill, and what did its console (guest serial and the core's log) say last.
  std::string diagnosis(const std::string& id, const std::string& socket) const {
    auto probe = execIn(socket, {"sh", "-c", "echo still-answers; echo w > /proc/sysrq-trigger; "
                                             "sleep 1; dmesg | tail -n 150; ps"}, 30s, 20);
    return fmt::format("=== {} ({}): a new exec {} ({}):\n{}\n{}--- the end of its console log:\n{}===\n",
                       id, socket, probe.code == 0 ? "answers" : "does not answer", probe.code,
                       probe.output, describeStuckVm(socket),
                       fileTail(runtime_ + "/" + id + ".console"));
  }

  std::string runtime_;
};

// Shuts a fixture's template VM down and removes its directory.
void shutDownTemplate(GuestSession*& templateVm, const std::string& socket, const std::string& base) {
  if (templateVm != nullptr) {
    cloneCli({"shutdown", "--vm", socket});
    templateVm->waitExit(10s);
    delete templateVm;
    templateVm = nullptr;
  }
  std::error_code ignored;
  std::filesystem::remove_all(base, ignored);
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
                            "256", "--api-socket", templateSocket_});
    if (!templateVm_->expect(kReady)) {
      setupError_ = "the template VM did not boot:\n" + templateVm_->output() + "\n" +
                    describeStuckVm(templateSocket_);
      return;
    }
    // A process that must survive into every fork.
    // (mv: a reader never sees the file empty between truncate and write)
    // (in a subshell: run() appends "; echo END", and "&;" is a syntax error)
    templateVm_->run(
        "(sh -c 'while :; do date +%s > /tmp/tick.new; mv /tmp/tick.new /tmp/tick; sleep 1; done' "
        ">/dev/null 2>&1 &)");
    // And an idle one, whose pid the forks look up.
    templateVm_->run("(sleep 100000 >/dev/null 2>&1 & echo $! > /tmp/sleeper.pid)");
    auto tick = templateVm_->run("sleep 2; cat /tmp/tick");
    if (!tick || !isNumber(*tick)) {
      setupError_ = "the ticker did not start in the template VM:\n" + templateVm_->output() + "\n" +
                    describeStuckVm(templateSocket_);
      return;
    }
    // What the forks must not share with the template.
    templateCid_ = vsockCid(templateSocket_);
    auto hostname = execIn(templateSocket_, {"hostname"});
    auto random = execIn(templateSocket_, {"sh", "-c", "head -c16 /dev/urandom | od -An -tx1"});
    if (templateCid_ == 0 || hostname.code != 0 || random.code != 0) {
      setupError_ = "the template's agent did not answer: " + hostname.output + random.output;
      return;
    }
    templateHostname_ = withoutNewline(hostname.output);
    templateRandom_ = withoutNewline(random.output);
    auto snapshot = cloneCli({"snapshot", "--vm", templateSocket_, "--output", templateDir_});
    if (snapshot.code != 0) {
      setupError_ = "clone snapshot failed:\n" + snapshot.output + "\n" + templateVm_->output();
      return;
    }
    snapshotOutput_ = snapshot.output;
    memoryHash_ = fileSha256(templateDir_ + "/memory");
  }

  static void TearDownTestSuite() { shutDownTemplate(templateVm_, templateSocket_, base_); }

  void SetUp() override { ASSERT_TRUE(setupError_.empty()) << setupError_; }

  // A fork whose serial console is this test's (clone-vmm --restore on pipes).
  std::unique_ptr<GuestSession> startFork(const std::string& name) {
    return std::make_unique<GuestSession>(
        buildBin("clone-vmm"), std::vector<std::string>{"--restore", templateDir_, "--api-socket",
                                                        base_ + "/" + name + ".sock"});
  }

  // A fork's console output and where its core's threads wait, for a fork that failed.
  std::string report(const std::string& name, const GuestSession& fork) const {
    return fork.output() + "\n" + describeStuckVm(base_ + "/" + name + ".sock");
  }

  static bool answers(GuestSession& vm, std::chrono::milliseconds timeout = 30s) {
    // run() drops the core's log lines (the first fork logs that it recorded the working
    // set), which can land inside the command's output.
    auto answer = vm.run("echo ALIVE-$((20+22))", timeout);
    if (!answer) return false;
    std::istringstream lines(*answer);
    for (std::string line; std::getline(lines, line);) {
      if (line == "ALIVE-42" || line == "ALIVE-42\r") return true;
    }
    return false;
  }

  static void stop(GuestSession& vm) {
    vm.sendLine("poweroff -f");
    if (!vm.waitExit(15s)) ADD_FAILURE() << "a fork did not power off";
  }

  // Each fork answers exec with its own hostname (its id), RNG output and vsock CID, none the
  // template's, and its clock reads the host's.
  static void expectForksUnique(const CliForks& forks, int kForks) {
    std::set<std::string> hostnames = {templateHostname_};
    std::set<std::string> randoms = {templateRandom_};
    std::set<uint32_t> cids = {templateCid_};
    for (int i = 0; i < kForks; ++i) {
      auto hostname = execIn(forks.socket(i), {"hostname"});
      ASSERT_EQ(hostname.code, 0) << hostname.output;
      EXPECT_EQ(withoutNewline(hostname.output), forks.id(i));
      auto etcHostname = execIn(forks.socket(i), {"cat", "/etc/hostname"});
      EXPECT_EQ(withoutNewline(etcHostname.output), forks.id(i));
      auto random = execIn(forks.socket(i), {"sh", "-c", "head -c16 /dev/urandom | od -An -tx1"});
      ASSERT_EQ(random.code, 0) << random.output;
      uint32_t cid = vsockCid(forks.socket(i));
      EXPECT_GE(cid, 3u);
      // The guest's vsock driver holds that CID too (not the template's).
      auto localCid = execIn(forks.socket(i), {"clone-agent", "--local-cid"});
      EXPECT_EQ(localCid.output, std::to_string(cid) + "\n") << localCid.output;
      std::cerr << forks.id(i) << ": cid " << cid << ", hostname " << withoutNewline(hostname.output)
                << ", urandom" << withoutNewline(random.output) << "\n";
      hostnames.insert(withoutNewline(hostname.output));
      randoms.insert(withoutNewline(random.output));
      cids.insert(cid);
    }
    std::cerr << "template: cid " << templateCid_ << ", hostname " << templateHostname_ << ", urandom"
              << templateRandom_ << "\n";
    EXPECT_EQ(hostnames.size(), kForks + 1u) << "a hostname repeats";
    EXPECT_EQ(randoms.size(), kForks + 1u) << "two guests drew the same random bytes";
    EXPECT_EQ(cids.size(), kForks + 1u) << "a vsock CID repeats";
    // The guest's wall clock was stepped to the host's (the template's is behind by its age).
    for (int i = 0; i < kForks; ++i) {
      auto date = execIn(forks.socket(i), {"date", "+%s"});
      ASSERT_TRUE(date.code == 0 && isNumber(withoutNewline(date.output))) << date.output;
      auto host = std::chrono::duration_cast<std::chrono::seconds>(
                      std::chrono::system_clock::now().time_since_epoch()).count();
      EXPECT_LE(std::abs(std::stoll(date.output) - host), 3) << date.output;
    }
  }

  static inline std::string base_;
  static inline std::string templateSocket_;
  static inline std::string templateDir_;
  static inline GuestSession* templateVm_ = nullptr;
  static inline std::string setupError_;
  static inline std::string snapshotOutput_;
  static inline std::string memoryHash_;
  static inline uint32_t templateCid_ = 0;
  static inline std::string templateHostname_;
  static inline std::string templateRandom_;
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
  ASSERT_TRUE(answers(*fork, 30s)) << report("alive", *fork);
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
  ASSERT_TRUE(answers(*a)) << report("a", *a);
  ASSERT_TRUE(answers(*b)) << report("b", *b);
  ASSERT_TRUE(a->run("echo from-a > /tmp/only-in-a; sync")) << a->output();
  // Writes 8 MiB of pages the template never wrote: each is a fresh lazy fill.
  ASSERT_TRUE(b->run("dd if=/dev/urandom of=/tmp/b-noise bs=1M count=8 2>/dev/null; echo ok", 120s))
      << b->output();
  auto inA = a->run("cat /tmp/only-in-a");
  ASSERT_TRUE(inA) << a->output();
  EXPECT_EQ(*inA, "from-a");
  auto inB = b->run("test -e /tmp/only-in-a && echo PRESENT || echo ABSENT");
  ASSERT_TRUE(inB) << b->output();
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
  for (size_t i = 0; i < forks.size(); ++i) {
    if (answers(*forks[i], 90s)) {
      ++alive;
    } else {
      ADD_FAILURE() << "a fork did not answer:\n" << report("many-" + std::to_string(i), *forks[i]);
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
  EXPECT_EQ(printed.identityLines, 3) << fork.output;
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
  // The runtime directory, shared by every fork, is not in the fork's jail: its API socket
  // was bound by `clone fork` and inherited.
  auto roots = jailRootsOfProcessesMatching(socket);
  EXPECT_FALSE(roots.empty()) << "no jailed process of " << socket;
  for (const auto& root : roots) {
    EXPECT_TRUE(std::filesystem::exists(root + templateDir_ + "/manifest.json")) << root;
    EXPECT_FALSE(std::filesystem::exists(root + runtime)) << root << " holds the runtime dir";
  }
  EXPECT_EQ(cloneCli({"destroy", "--vm", socket}).code, 0);
  EXPECT_FALSE(std::filesystem::exists(socket)) << "destroy leaves the socket behind";
  list = cloneCli({"list"});
  EXPECT_EQ(list.output.find(id), std::string::npos) << list.output;
  ::unsetenv("CLONE_RUNTIME_DIR");
}

TEST_F(ForkTest, ExecWorksInAFork) {
  CliForks forks(templateDir_, base_ + "/exec", 1);
  ASSERT_TRUE(forks.allReady(1));
  auto hi = execIn(forks.socket(0), {"echo", "hi"});
  EXPECT_EQ(hi.code, 0) << hi.output;
  EXPECT_EQ(hi.output, "hi\n");
  auto seven = execIn(forks.socket(0), {"sh", "-c", "echo out; exit 7"});
  EXPECT_EQ(seven.code, 7) << seven.output;
  EXPECT_EQ(seven.output, "out\n");
  auto missing = execIn(forks.socket(0), {"no-such-command"});
  EXPECT_EQ(missing.code, 127) << missing.output;
}

TEST_F(ForkTest, ForksAreUnique) {
  constexpr int kForks = 3;
  CliForks forks(templateDir_, base_ + "/unique", kForks);
  ASSERT_TRUE(forks.allReady(kForks));
  expectForksUnique(forks, kForks);
}

// clone fork --fork-server: the template's fork server (a jailed core that checked the
// template once) fork()s the forks; they are as alive and unique as the others, a second
// command reuses the server, and it ends after its last fork and its linger.
TEST_F(ForkTest, ForksOfAForkServerAreUniqueAliveAndShareOneServerThatEndsAfterThem) {
  constexpr int kForks = 3;
  auto serverRuns = [] {
    int running = 0;
    for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
      std::ifstream comm(entry.path() / "comm"), cmdline(entry.path() / "cmdline");
      std::string name, text((std::istreambuf_iterator<char>(cmdline)), std::istreambuf_iterator<char>());
      std::getline(comm, name);
      // Not its jailer, whose command line holds the server's.
      running += name == "clone-vmm" && text.find("--fork-server-fd") != std::string::npos;
    }
    return running;
  };
  // The server prepares its next spare --fork-server-spare-delay-ms after a hand-out: a count
  // that includes it is taken once it has settled. (A second server would never pass through
  // the count one server gives: it brings its own spare along.)
  auto serverRunsSettle = [&](int expected) {
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (serverRuns() != expected && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(50ms);
    }
    return serverRuns();
  };
  // Both commands in one runtime directory, where the server's socket is found.
  std::string runtime = base_ + "/served.runtime";
  std::filesystem::create_directories(runtime);
  ::setenv("CLONE_RUNTIME_DIR", runtime.c_str(), 1);
  {
    // memfd forks (the benchmark runs cow ones)
    CliForks forks(templateDir_, base_ + "/served", kForks, {"--fork-server", "--fork-server-linger", "2"});
    ASSERT_TRUE(forks.allReady(kForks));
    // The server, its forks and the spare it prepares for the next request (they carry its
    // command line: no exec).
    EXPECT_EQ(serverRunsSettle(kForks + 2), kForks + 2);
    expectForksUnique(forks, kForks);
    // The template's process runs on, and time passes, in a fork of the server too.
    auto sleeper = execIn(forks.socket(1), {"sh", "-c", "p=$(cat /tmp/sleeper.pid); tr '\\0' ' ' < /proc/$p/cmdline"});
    EXPECT_EQ(sleeper.output, "sleep 100000 ") << sleeper.output;
    ASSERT_EQ(execIn(forks.socket(2), {"sleep", "1"}).code, 0);
    auto before = std::chrono::steady_clock::now();
    EXPECT_EQ(execIn(forks.socket(2), {"sleep", "1"}).code, 0);
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - before).count();
    EXPECT_GE(seconds, 0.8);
    EXPECT_LE(seconds, 3.0);
    {
      CliForks more(templateDir_, base_ + "/served-more", 1, {"--fork-server"});
      ASSERT_TRUE(more.allReady(1));
      EXPECT_EQ(serverRunsSettle(kForks + 3), kForks + 3) << "a second command started a second fork server";
      EXPECT_EQ(execIn(more.socket(0), {"hostname"}).output, more.id(0) + "\n");
    }
    // One fork destroyed: the others and the server run on.
    ASSERT_EQ(cloneCli({"destroy", "--vm", forks.socket(0)}).code, 0);
    EXPECT_EQ(execIn(forks.socket(1), {"echo", "still"}).output, "still\n");
    EXPECT_EQ(serverRunsSettle(kForks + 1), kForks + 1);
    forks.printed.forks.erase(forks.printed.forks.begin());  // destroyed above
  }  // the rest destroyed
  ::unsetenv("CLONE_RUNTIME_DIR");
  auto deadline = std::chrono::steady_clock::now() + 20s;
  while (serverRuns() > 0 && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(50ms);
  EXPECT_EQ(serverRuns(), 0) << "the fork server did not end after its last fork and its linger";
}

// A fork server's spare runs its guest while it waits (docs/FORK.md, "The spare"): a request
// that comes later finds that guest running. Its fork still takes an identity of its own, its
// CID is its own in the guest too, and its clock keeps time.
TEST_F(ForkTest, ARequestTakesASpareWhoseGuestRunsAndItsForkIsUniqueAndKeepsTime) {
  std::string runtime = base_ + "/warm.runtime";
  std::filesystem::create_directories(runtime);
  ::setenv("CLONE_RUNTIME_DIR", runtime.c_str(), 1);
  // Spares whose guests ran, by the fork server's log (in the runtime directory).
  auto sparesThatRan = [&] {
    int count = 0;
    for (const auto& entry : std::filesystem::directory_iterator(runtime)) {
      if (entry.path().extension() != ".console") continue;
      std::ifstream log(entry.path());
      for (std::string line; std::getline(log, line);) count += line.find("spare: its guest runs") != std::string::npos;
    }
    return count;
  };
  auto waitForARunningSpare = [&](int seen) {
    for (auto deadline = std::chrono::steady_clock::now() + 30s;
         sparesThatRan() <= seen && std::chrono::steady_clock::now() < deadline;) {
      std::this_thread::sleep_for(100ms);
    }
    return sparesThatRan() > seen;
  };
  {
    CliForks first(templateDir_, base_ + "/warm-a", 1, {"--fork-server", "--fork-server-linger", "2"});
    ASSERT_TRUE(first.allReady(1));
    // The spare started after the first request runs its guest once it has restored.
    ASSERT_TRUE(waitForARunningSpare(0)) << "no spare of the fork server ran its guest";
    std::this_thread::sleep_for(1s);  // it runs a while before its request
    CliForks warm(templateDir_, base_ + "/warm-b", 1, {"--fork-server"});
    ASSERT_TRUE(warm.allReady(1));
    std::string log = fileTail(warm.consoleLog(0), 400);
    EXPECT_NE(log.find("its guest running since"), std::string::npos) << "not the running spare:\n" << log;
    expectForksUnique(warm, 1);
    EXPECT_NE(vsockCid(warm.socket(0)), vsockCid(first.socket(0)));
    auto randomOf = [](const std::string& socket) {
      return execIn(socket, {"sh", "-c", "head -c16 /dev/urandom | od -An -tx1"}).output;
    };
    EXPECT_NE(randomOf(warm.socket(0)), randomOf(first.socket(0)));
    auto before = std::chrono::steady_clock::now();
    EXPECT_EQ(execIn(warm.socket(0), {"sleep", "1"}).code, 0);
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - before).count();
    EXPECT_GE(seconds, 0.8);
    EXPECT_LE(seconds, 3.0);
  }
  ::unsetenv("CLONE_RUNTIME_DIR");
}

TEST_F(ForkTest, NoIdentityLeavesTheTemplatesHostname) {
  CliForks forks(templateDir_, base_ + "/noid", 1, {"--no-identity"});
  ASSERT_EQ(forks.code, 0) << forks.output;
  ASSERT_EQ(forks.printed.forks.size(), 1u) << forks.output;
  EXPECT_EQ(forks.printed.latencyLines, 1) << forks.output;
  EXPECT_EQ(forks.printed.identityLines, 0) << forks.output;
  auto hostname = execIn(forks.socket(0), {"hostname"});
  EXPECT_EQ(hostname.code, 0) << hostname.output;
  EXPECT_EQ(withoutNewline(hostname.output), templateHostname_);
}

TEST_F(ForkTest, TemplateProcessesRunOnInAFork) {
  CliForks forks(templateDir_, base_ + "/procs", 1);
  ASSERT_TRUE(forks.allReady(1));
  // The idle `sleep 100000` started before the snapshot, same pid.
  auto sleeper = execIn(forks.socket(0),
                        {"sh", "-c", "p=$(cat /tmp/sleeper.pid); tr '\\0' ' ' < /proc/$p/cmdline"});
  EXPECT_EQ(sleeper.code, 0) << sleeper.output;
  EXPECT_EQ(sleeper.output, "sleep 100000 ") << sleeper.output;
  // The ticker advances /tmp/tick.
  auto first = execIn(forks.socket(0), {"cat", "/tmp/tick"});
  ASSERT_TRUE(first.code == 0 && isNumber(withoutNewline(first.output))) << first.output;
  std::this_thread::sleep_for(3s);
  auto second = execIn(forks.socket(0), {"cat", "/tmp/tick"});
  ASSERT_TRUE(second.code == 0 && isNumber(withoutNewline(second.output))) << second.output;
  EXPECT_GT(std::stoll(second.output), std::stoll(first.output));
}

TEST_F(ForkTest, SleepThroughExecTakesASecond) {
  CliForks forks(templateDir_, base_ + "/sleep", 1);
  ASSERT_TRUE(forks.allReady(1));
  // The first run faults in what the agent needs to fork and exec: not timed.
  ASSERT_EQ(execIn(forks.socket(0), {"sleep", "1"}).code, 0);
  auto before = std::chrono::steady_clock::now();
  auto slept = execIn(forks.socket(0), {"sleep", "1"});
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - before).count();
  EXPECT_EQ(slept.code, 0) << slept.output;
  std::cerr << "clone exec -- sleep 1 took " << seconds << " s\n";
  EXPECT_GE(seconds, 0.8);
  EXPECT_LE(seconds, 3.0);
}

TEST_F(ForkTest, ConcurrentExecsIntoOneFork) {
  CliForks forks(templateDir_, base_ + "/concurrent", 1);
  ASSERT_TRUE(forks.allReady(1));
  constexpr int kExecs = 4;
  std::vector<std::unique_ptr<GuestSession>> execs;
  auto before = std::chrono::steady_clock::now();
  for (int i = 0; i < kExecs; ++i) {
    execs.push_back(std::make_unique<GuestSession>(
        buildBin("clone"),
        std::vector<std::string>{"exec", "--vm", forks.socket(0), "--", "sh", "-c",
                                 "sleep 2; echo done-$((" + std::to_string(i) + " * 7))"}));
    execs.back()->closeInput();
  }
  for (int i = 0; i < kExecs; ++i) {
    EXPECT_EQ(execs[i]->waitExit(60s), 0) << execs[i]->output();
    EXPECT_EQ(execs[i]->output(), "done-" + std::to_string(i * 7) + "\n");
  }
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - before).count();
  std::cerr << kExecs << " concurrent `sleep 2` execs took " << seconds << " s\n";
  EXPECT_LT(seconds, 2.0 * kExecs - 1) << "the execs ran one after another";
}

TEST_F(ForkTest, TmpfsWritesStayInTheirFork) {
  CliForks forks(templateDir_, base_ + "/tmpfs", 2);
  ASSERT_TRUE(forks.allReady(2));
  auto write = execIn(forks.socket(0), {"sh", "-c", "echo from-" + forks.id(0) + " > /tmp/only-here"});
  ASSERT_EQ(write.code, 0) << write.output;
  auto here = execIn(forks.socket(0), {"cat", "/tmp/only-here"});
  EXPECT_EQ(here.output, "from-" + forks.id(0) + "\n");
  const char* probe = "test -e /tmp/only-here && echo PRESENT || echo ABSENT";
  auto other = execIn(forks.socket(1), {"sh", "-c", probe});
  EXPECT_EQ(other.output, "ABSENT\n");
  auto inTemplate = execIn(templateSocket_, {"sh", "-c", probe});
  EXPECT_EQ(inTemplate.output, "ABSENT\n");
}

// The fill counters `clone status --json` reports for a fork: {faults, copied + zeroed pages}.
std::pair<uint64_t, uint64_t> memoryFill(const std::string& socket) {
  auto status = cloneCli({"status", "--vm", socket, "--json"});
  std::smatch match;
  if (status.code != 0 ||
      !std::regex_search(status.output, match,
                         std::regex(R"("memory_fill":\{"faults":(\d+),"device_faults":\d+,"copied_pages":(\d+),"zeroed_pages":(\d+))"))) {
    ADD_FAILURE() << "no memory_fill in the status of " << socket << ": " << status.output;
    return {0, 0};
  }
  return {std::stoull(match[1]), std::stoull(match[2]) + std::stoull(match[3])};
}

TEST_F(ForkTest, AForksPageFaultsAreNeverAsync) {
  CliForks forks(templateDir_, base_ + "/apf", 1);
  ASSERT_TRUE(forks.allReady(1));
  // Reading every file of the guest's root reads page-cache pages the fork has not touched:
  // each is a fill. KVM counts its async "page ready" notices on the guest's HYP line.
  auto [faultsBefore, pagesBefore] = memoryFill(forks.socket(0));
  auto read = execIn(forks.socket(0), {"sh", "-c", "grep HYP: /proc/interrupts; "
                                                   "find / -xdev -type f -exec cat {} + >/dev/null 2>&1; "
                                                   "grep HYP: /proc/interrupts"});
  ASSERT_EQ(read.code, 0) << read.output;
  auto [faultsAfter, pagesAfter] = memoryFill(forks.socket(0));
  std::cerr << "reading the guest's files: " << faultsAfter - faultsBefore << " faults, "
            << pagesAfter - pagesBefore << " pages filled\n" << read.output;
  EXPECT_GT(pagesAfter - pagesBefore, 256u) << "the reads filled too little to tell";
  std::vector<uint64_t> notices;
  std::regex hyp(R"(HYP:\s+(\d+))");
  for (std::sregex_iterator it(read.output.begin(), read.output.end(), hyp), end; it != end; ++it) {
    notices.push_back(std::stoull((*it)[1]));
  }
  ASSERT_EQ(notices.size(), 2u) << "no HYP line in the guest's /proc/interrupts:\n" << read.output;
  EXPECT_EQ(notices[1], notices[0]) << "the guest was sent async page-fault notices";
  // The fill, as a person reads it.
  auto text = cloneCli({"status", "--vm", forks.socket(0)});
  EXPECT_TRUE(std::regex_search(text.output, std::regex(R"(\nmemory filled from the template: \d+ KiB \(\d+ KiB prefetched\), \d+ faults \(0 from devices\)\n)")))
      << text.output;
}

// --fork-memory cow: guest RAM is a MAP_PRIVATE mapping of the template's memory file, so
// forks share every page none of them wrote (docs/FORK.md, "Copy-on-write forks").
TEST_F(ForkTest, CopyOnWriteForksShareTheTemplatesPagesUntilTheyWrite) {
  constexpr int kForks = 3;
  CliForks forks(templateDir_, base_ + "/cow", kForks, {"--fork-memory", "cow"});
  ASSERT_TRUE(forks.allReady(kForks));  // alive, identity applied and checked in each guest
  std::set<std::string> hostnames = {templateHostname_};
  for (int i = 0; i < kForks; ++i) {
    auto text = cloneCli({"status", "--vm", forks.socket(i)});
    EXPECT_NE(text.output.find("\nmemory: a copy-on-write mapping of the template ("), std::string::npos)
        << text.output;
    auto hostname = execIn(forks.socket(i), {"hostname"});
    hostnames.insert(withoutNewline(hostname.output));
    // The template's idle process lives on in the fork.
    auto sleeper = execIn(forks.socket(i), {"sh", "-c", "kill -0 $(cat /tmp/sleeper.pid) && echo LIVES"});
    EXPECT_EQ(sleeper.output, "LIVES\n");
  }
  EXPECT_EQ(hostnames.size(), kForks + 1u) << "a hostname repeats";

  // Fork 0 writes a file and 8 MiB of fresh pages; neither shows in fork 1 or the template.
  auto write = execIn(forks.socket(0), {"sh", "-c", "echo cow > /tmp/only-here; "
                                                    "dd if=/dev/urandom of=/tmp/noise bs=1M count=8 2>/dev/null; "
                                                    "cat /tmp/only-here"});
  ASSERT_EQ(write.code, 0) << write.output;
  EXPECT_EQ(write.output, "cow\n");
  const char* probe = "test -e /tmp/only-here && echo PRESENT || echo ABSENT";
  EXPECT_EQ(execIn(forks.socket(1), {"sh", "-c", probe}).output, "ABSENT\n");
  EXPECT_EQ(execIn(templateSocket_, {"sh", "-c", probe}).output, "ABSENT\n");

  // Each fork's core maps the template's memory file. The pages several forks read are
  // shared between them; only the pages a fork wrote are its own.
  std::string memoryFile = templateDir_ + "/memory";
  std::vector<FileMappingUsage> usage;
  for (int i = 0; i < kForks; ++i) {
    usage.push_back(fileMappingUsage(forks.socket(i), memoryFile));
    std::cerr << forks.id(i) << ": template memory in " << usage[i].mappings << " mappings, rss "
              << usage[i].rss << " KiB, shared " << usage[i].shared << " KiB, own (written) "
              << usage[i].anonymous << " KiB\n";
    EXPECT_GE(usage[i].mappings, 1);  // one mapping per data extent of the file
    EXPECT_GE(usage[i].shared, 1024u) << "a fork shares less than 1 MiB with the others";
  }
  // What each fork owns: the pages it wrote, wherever in guest memory, and the core's heap.
  std::vector<uint64_t> own;
  for (int i = 0; i < kForks; ++i) {
    own.push_back(anonymousKib(forks.socket(i)));
    std::cerr << forks.id(i) << ": " << own[i] << " KiB anonymous memory in all\n";
  }
  EXPECT_GE(own[0], 8u * 1024) << "fork 0 wrote 8 MiB, but owns less";
  EXPECT_GT(own[0], own[1] + 4u * 1024) << "fork 1 did not write fork 0's 8 MiB, but owns as much";
  EXPECT_EQ(fileSha256(memoryFile), memoryHash_) << "the template's memory file changed";
}

// A fork is a template in its turn: `clone snapshot` reads its memory through the mapping
// (a memfd fork's unfilled pages fault in from its template; a copy-on-write fork reads the
// template's pages and its own), and a fork of that template sees both. The fork is jailed,
// and the new template's directory is not in its jail: the snapshot goes through the
// directory fd `clone snapshot` sends.
void snapshotAForkAndForkIt(const std::string& forkMemory, const std::string& base,
                            const std::string& templateDir, const std::string& memoryHash) {
  CliForks parent(templateDir, base + "/" + forkMemory + "-parent", 1, {"--fork-memory", forkMemory});
  ASSERT_TRUE(parent.allReady(1));
  auto mark = execIn(parent.socket(0), {"sh", "-c", "echo from-parent > /tmp/parent-mark"});
  ASSERT_EQ(mark.code, 0) << mark.output;
  std::string dir = base + "/from-" + forkMemory + "-fork";
  auto snapshot = cloneCli({"snapshot", "--vm", parent.socket(0), "--output", dir}, 120s);
  ASSERT_EQ(snapshot.code, 0) << snapshot.output;
  CliForks child(dir, base + "/" + forkMemory + "-child", 1, {"--fork-memory", forkMemory});
  ASSERT_TRUE(child.allReady(1));
  EXPECT_EQ(execIn(child.socket(0), {"cat", "/tmp/parent-mark"}).output, "from-parent\n");
  // The template's idle process, through two generations.
  EXPECT_EQ(execIn(child.socket(0), {"sh", "-c", "kill -0 $(cat /tmp/sleeper.pid) && echo LIVES"}).output,
            "LIVES\n");
  EXPECT_EQ(execIn(parent.socket(0), {"echo", "parent-runs-on"}).output, "parent-runs-on\n");
  EXPECT_EQ(fileSha256(templateDir + "/memory"), memoryHash) << "the template's memory file changed";
}

TEST_F(ForkTest, ACopyOnWriteForkCanBeSnapshottedAndForked) {
  snapshotAForkAndForkIt("cow", base_, templateDir_, memoryHash_);
}

TEST_F(ForkTest, AMemfdForkCanBeSnapshottedAndForked) {
  snapshotAForkAndForkIt("memfd", base_, templateDir_, memoryHash_);
}

// A second template: a small VM booted with `extra` options, `prepare` typed into its console
// (its output must contain `prepared`), then snapshotted to BASE/NAME and ended. Returns "" or
// what went wrong.
std::string makeOtherTemplate(const std::string& base, const std::string& name,
                              const std::vector<std::string>& extra, const std::string& prepare = "",
                              const std::string& prepared = "") {
  std::string socket = base + "/" + name + ".sock";
  std::vector<std::string> args = {"run", "--no-jail", "--kernel", guestKernel(), "--initrd", guestInitrd(),
                                   "--cmdline", "console=ttyS0 panic=-1 quiet", "--mem-mb", "128",
                                   "--api-socket", socket};
  args.insert(args.end(), extra.begin(), extra.end());
  GuestSession vm(buildBin("clone"), args);
  if (!vm.expect(kReady)) return "the VM did not boot:\n" + vm.output();
  if (!prepare.empty()) {
    auto done = vm.run(prepare);
    if (!done || done->find(prepared) == std::string::npos) return "prepare failed:\n" + vm.output();
  }
  auto snapshot = cloneCli({"snapshot", "--vm", socket, "--output", base + "/" + name});
  cloneCli({"destroy", "--vm", socket});
  vm.waitExit(10s);
  return snapshot.code == 0 ? "" : "clone snapshot failed:\n" + snapshot.output;
}

// A host user truncates a template under its running copy-on-write fork (the jail holds the
// file read-only, but the host can): the pages the fork had not written are gone. The fork's
// core ends with the reason in its log, and nothing else does; `clone destroy` cleans up
// after it, and the template is refused from then on.
TEST_F(ForkTest, ATemplateTruncatedUnderACopyOnWriteForkEndsThatForkWithAReason) {
  ASSERT_EQ(makeOtherTemplate(base_, "cut-under-fork", {}), "");
  std::string dir = base_ + "/cut-under-fork";
  CliForks forks(dir, base_ + "/cut-under-fork-fork", 1, {"--fork-memory", "cow"});
  ASSERT_TRUE(forks.allReady(1));
  std::string socket = forks.socket(0);
  ASSERT_EQ(execIn(socket, {"echo", "before"}).output, "before\n");
  ASSERT_EQ(::truncate((dir + "/memory").c_str(), 0), 0) << std::strerror(errno);
  // Any page the guest had not written faults now; keep it busy until its core has ended.
  auto alive = [&] { return cloneCli({"status", "--vm", socket}).code == 0; };
  auto deadline = std::chrono::steady_clock::now() + 60s;
  while (alive() && std::chrono::steady_clock::now() < deadline) {
    execIn(socket, {"sh", "-c", "cat /proc/meminfo /proc/slabinfo >/dev/null 2>&1; ls -R /usr >/dev/null"}, 10s);
  }
  std::string log = fileTail(forks.consoleLog(0));
  EXPECT_FALSE(alive()) << "the fork still answers with its memory file gone:\n" << log;
  bool reasoned = log.find("KVM_RUN: Bad address") != std::string::npos ||
                  log.find("fatal signal SIGBUS") != std::string::npos;
  EXPECT_TRUE(reasoned) << "no reason in the fork's log:\n" << log;
  // The other VMs run on: the template VM of this suite.
  auto other = templateVm_->run("echo still-$((40+2))");
  ASSERT_TRUE(other) << templateVm_->output();
  EXPECT_EQ(*other, "still-42");
  // A new fork of the damaged template is refused before anything starts.
  auto again = cloneCli({"fork", "--template", dir, "--fork-memory", "cow"});
  EXPECT_NE(again.code, 0) << again.output;
  EXPECT_NE(again.output.find("truncated"), std::string::npos) << again.output;
}

// A fork server whose template's memory file is cut after it started: the spare that had
// restored before refuses its request on the recheck, the next spare's restore fails, and
// each fork ends with its reason in its own log; the server goes on and ends with its client.
TEST_F(ForkTest, ATemplateCutUnderAForkServerEndsItsForksWithTheReasonInTheirOwnLogs) {
  ASSERT_EQ(makeOtherTemplate(base_, "cut-under-server", {}), "");
  std::string dir = base_ + "/cut-under-server";
  auto [client, server] = ipc::makeForkSocketPair();
  ::fcntl(server.get(), F_SETFD, 0);  // inherited by the server only
  // Spares wait paused here: a running one's guest would touch the cut file before its
  // request, and that spare die of it (docs/FORK.md), before its recheck could refuse it.
  GuestSession vmm(buildBin("clone-vmm"), {"--restore", dir, "--fork-memory", "cow", "--fork-server-spare-runs",
                                           "false", "--fork-server-fd", std::to_string(server.get())});
  server.reset();
  ASSERT_TRUE(vmm.expect("fork server: ready", 60s)) << vmm.output();
  ASSERT_TRUE(vmm.expect("restored from", 60s)) << "no spare restored:\n" << vmm.output();
  ASSERT_EQ(::truncate((dir + "/memory").c_str(), 0), 0) << std::strerror(errno);
  auto forkLogFor = [&](const std::string& id, const std::string& reason) {
    ipc::ForkRequest request;
    request.forkId = id;
    request.apiSocketName = base_ + "/" + id + ".sock";
    UniqueFd api(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un address{};
    address.sun_family = AF_UNIX;
    std::snprintf(address.sun_path, sizeof address.sun_path, "%s", request.apiSocketName.c_str());
    EXPECT_EQ(::bind(api.get(), reinterpret_cast<sockaddr*>(&address), sizeof address), 0);
    EXPECT_EQ(::listen(api.get(), 1), 0);
    request.apiListener = std::move(api);
    std::string logPath = base_ + "/" + id + ".console";
    request.output = UniqueFd(::open(logPath.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    ipc::sendForkRequest(client.get(), request);
    auto reply = ipc::receiveForkReply(client.get());
    EXPECT_EQ(reply.error, "");
    EXPECT_GT(reply.pid, 0);
    std::string log;
    for (auto deadline = std::chrono::steady_clock::now() + 60s;
         std::chrono::steady_clock::now() < deadline && log.find(reason) == std::string::npos;) {
      std::this_thread::sleep_for(50ms);
      log = fileTail(logPath);
    }
    return log;
  };
  // The spare restored from the whole file; its recheck sees the change.
  auto first = forkLogFor("cut-a", "changed since the fork server checked it");
  EXPECT_NE(first.find("changed since the fork server checked it"), std::string::npos) << first << "\nserver:\n"
                                                                                   << vmm.output();
  // The next spare restored from the cut file and failed; it reports to the fork it was for.
  auto second = forkLogFor("cut-b", "clone-vmm: fork cut-b:");
  EXPECT_NE(second.find("clone-vmm: fork cut-b:"), std::string::npos) << second << "\nserver:\n" << vmm.output();
  EXPECT_NE(second.find("bytes is needed for guest memory"), std::string::npos) << second;
  EXPECT_TRUE(vmm.expect("fork cut-b (pid", 30s)) << vmm.output();  // the server logged its end
  client.reset();
  EXPECT_EQ(vmm.waitExit(30s), 0) << vmm.output();
}

// A jailed fork cannot write into its template, so `clone fork` (the template's owner) fetches
// the record of the first fork of a template without a working set over its API and writes
// the file. The next fork prefetches exactly those pages.
TEST_F(ForkTest, AJailedForksWorkingSetIsSavedByCloneForkAndPrefetchedByTheNextFork) {
  ASSERT_EQ(makeOtherTemplate(base_, "working-set", {}), "");
  std::string dir = base_ + "/working-set";
  std::string file = dir + "/workingset";
  ASSERT_NE(::access(file.c_str(), F_OK), 0) << "a new template has no working set";
  uint64_t saved = 0;
  uint64_t written = 0;
  {
    CliForks first(dir, base_ + "/working-set-first", 1, {"--fork-memory", "cow"});
    ASSERT_TRUE(first.allReady(1));
    std::smatch match;
    ASSERT_TRUE(std::regex_search(first.output, match,
                                  std::regex(R"(saved the working set fork (fork-[0-9a-f]{8}) recorded \((\d+) pages, (\d+) written\))")))
        << first.output;
    EXPECT_EQ(match[1], first.id(0));
    saved = std::stoull(match[2]);
    written = std::stoull(match[3]);
    std::cerr << "saved: " << saved << " pages, " << written << " of them written\n";
    // The guest's first second touches hundreds of pages and writes some (a copy-on-write fork
    // tells them apart).
    EXPECT_GT(saved, 100u) << first.output;
    EXPECT_GT(written, 0u) << first.output;
    EXPECT_LT(written, saved) << first.output;
    EXPECT_NE(fileTail(first.consoleLog(0), 1000).find("kept for the API"), std::string::npos)
        << "the jailed fork could not write it itself:\n" << fileTail(first.consoleLog(0));
  }
  struct stat info {};
  ASSERT_EQ(::stat(file.c_str(), &info), 0) << std::strerror(errno);
  EXPECT_EQ(info.st_mode & 0777, 0444u);
  EXPECT_EQ(static_cast<uint64_t>(info.st_size), 24 + 8 * saved);
  std::ifstream in(file, std::ios::binary);
  char magic[8] = {};
  in.read(magic, 8);
  EXPECT_EQ(std::string(magic, 8), "CLWSET02");
  CliForks second(dir, base_ + "/working-set-second", 1, {"--fork-memory", "cow"});
  ASSERT_TRUE(second.allReady(1));
  EXPECT_EQ(second.output.find("saved the working set"), std::string::npos) << second.output;
  std::string log = fileTail(second.consoleLog(0), 1000);
  EXPECT_NE(log.find(fmt::format("{} pages prefetched", saved)), std::string::npos) << log;
  EXPECT_EQ(execIn(second.socket(0), {"echo", "prefetched"}).output, "prefetched\n");
}

// `clone fork` has its recording fork run `true` through the agent before it asks for the
// record, which ends the record's window: the next fork's first command finds the guest's
// exec path (the agent's fork, the kernel's exec, the binary) filled already.
TEST_F(ForkTest, TheWorkingSetCloneForkRecordsHoldsTheExecPath) {
  ASSERT_EQ(makeOtherTemplate(base_, "exec-path", {}), "");
  std::string dir = base_ + "/exec-path";
  {
    CliForks first(dir, base_ + "/exec-path-first", 1);
    ASSERT_TRUE(first.allReady(1));
    EXPECT_NE(first.output.find("saved the working set"), std::string::npos) << first.output;
    EXPECT_EQ(first.output.find("ran no command for its working set"), std::string::npos)
        << first.output;
    EXPECT_NE(fileTail(first.consoleLog(0), 2000).find("window ended when asked"), std::string::npos)
        << fileTail(first.consoleLog(0));
  }
  CliForks second(dir, base_ + "/exec-path-second", 1);
  ASSERT_TRUE(second.allReady(1));
  auto [faultsBefore, pagesBefore] = memoryFill(second.socket(0));
  ASSERT_EQ(execIn(second.socket(0), {"true"}).code, 0);
  auto [faultsAfter, pagesAfter] = memoryFill(second.socket(0));
  // A command outside the record, for scale: a binary no fork ran before.
  ASSERT_EQ(execIn(second.socket(0), {"sh", "-c", "cat /proc/version >/dev/null"}).code, 0);
  auto [faultsOther, pagesOther] = memoryFill(second.socket(0));
  std::cerr << "the next fork's first `true`: " << faultsAfter - faultsBefore
            << " faults; then a shell and cat: " << faultsOther - faultsAfter << " faults\n";
  EXPECT_LT(faultsAfter - faultsBefore, 40u) << "the exec path was not in the working set";
}

TEST_F(ForkTest, TemplateWithoutVsockForksWithoutIdentity) {
  auto error = makeOtherTemplate(base_, "novsock", {"--no-vsock"});
  ASSERT_EQ(error, "");
  CliForks forks(base_ + "/novsock", base_ + "/novsock-fork", 2);
  EXPECT_EQ(forks.code, 0) << forks.output;
  EXPECT_EQ(forks.printed.forks.size(), 2u) << forks.output;
  EXPECT_EQ(forks.printed.latencyLines, 2) << forks.output;
  EXPECT_EQ(forks.printed.identityLines, 0) << forks.output;
  EXPECT_NE(forks.output.find("clone fork: the template has no vsock device"), std::string::npos)
      << forks.output;
  for (const auto& [id, socket] : forks.printed.forks) EXPECT_EQ(vsockCid(socket), 0u) << forks.output;
}

TEST_F(ForkTest, ForksWhoseAgentIsGoneFailByNameAndAreStopped) {
  // The agent ends before the snapshot: every fork answers on its API, never on vsock.
  auto error = makeOtherTemplate(base_, "noagent", {},
                                 "kill $(pidof clone-agent); sleep 1; pidof clone-agent || echo NO-AGENT",
                                 "NO-AGENT");
  ASSERT_EQ(error, "");
  std::string prefix = base_ + "/noagent-fork";
  auto start = std::chrono::steady_clock::now();
  auto fork = cloneCli({"fork", "--template", base_ + "/noagent", "--count", "2", "--api-socket", prefix}, 120s);
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(fork.code, 1) << fork.output;
  auto printed = parseForkOutput(fork.output);
  EXPECT_TRUE(printed.forks.empty()) << fork.output;
  EXPECT_EQ(printed.latencyLines, 0) << fork.output;
  std::regex failure(R"(clone fork: fork-[0-9a-f]{8} failed and was stopped \(console log [^)]+\): connect to the guest agent at vsock CID \d+ port 1024)");
  auto failures = std::distance(std::sregex_iterator(fork.output.begin(), fork.output.end(), failure),
                                std::sregex_iterator());
  EXPECT_EQ(failures, 2) << fork.output;
  EXPECT_NE(fork.output.find("2 of 2 forks failed"), std::string::npos) << fork.output;
  // Concurrently: both gave up after one agent timeout (20 s), not two.
  EXPECT_LT(seconds, 60) << fork.output;
  for (const char* suffix : {".1", ".2"}) {
    EXPECT_NE(::access((prefix + suffix).c_str(), F_OK), 0) << prefix << suffix << " outlived its fork";
  }
  // ([/]: the pattern does not match the shell running pgrep)
  EXPECT_EQ(shell("pgrep -f -- '--api-socket [/]" + prefix.substr(1) + "'"), "") << "a failed fork still runs";
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

// Issue 7 with a disk: a template VM with a clone-block disk (`clone run --disk
// BASE,overlay`: a qcow2 overlay, which `clone snapshot` flattens into disk0.raw), forks
// through `clone fork` (jailed, each with its own overlay and clone-block).
class ForkDiskTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kDiskBytes = 32 << 20;
  // 4 MiB written but not synced before the snapshot.
  static constexpr char kDirtyPattern[] = "yes DIRTY-BEFORE-SNAPSHOT | head -c 4194304";

  static void SetUpTestSuite() {
    base_ = "/tmp/clone-fork-disk-test-" + std::to_string(::getpid());
    std::filesystem::create_directories(base_);
    templateSocket_ = base_ + "/template.sock";
    templateDir_ = base_ + "/template";
    baseImage_ = base_ + "/base.raw";
    shell("truncate -s " + std::to_string(kDiskBytes) + " '" + baseImage_ + "'");
    baseImageHash_ = fileSha256(baseImage_);
    templateVm_ = new GuestSession(
        buildBin("clone"), {"run", "--no-jail", "--kernel", guestKernel(), "--initrd", guestInitrd(),
                            "--cmdline", "console=ttyS0 panic=-1 quiet", "--mem-mb", "256",
                            "--api-socket", templateSocket_, "--disk", baseImage_ + ",overlay"});
    if (!templateVm_->expect(kReady)) {
      setupError_ = "the template VM did not boot:\n" + templateVm_->output() + "\n" +
                    describeStuckVm(templateSocket_);
      return;
    }
    // Data on the disk (synced), and one file left dirty in the guest's page cache: the
    // forks write it back from their memory, which must hold the template's bytes.
    auto prepared = templateVm_->run(
        "echo 360000 > /proc/sys/vm/dirty_writeback_centisecs && "
        "echo 360000 > /proc/sys/vm/dirty_expire_centisecs && "
        "mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount -o commit=600 /dev/vda /mnt && "
        "echo from-template > /mnt/template.txt && "
        "dd if=/dev/urandom of=/mnt/blob bs=64k count=16 2>/dev/null && "
        "md5sum /mnt/blob | cut -c1-32 > /mnt/blob.md5 && sync && "
        "" + std::string(kDirtyPattern) + " > /mnt/dirty.bin && echo PREPARED", 180s);
    if (!prepared || prepared->find("PREPARED") == std::string::npos) {
      setupError_ = "preparing the disk failed:\n" + templateVm_->output() + "\n" +
                    describeStuckVm(templateSocket_);
      return;
    }
    blobMd5_ = withoutNewline(templateVm_->run("cat /mnt/blob.md5").value_or(""));
    // (meminfo's count lags by the per-CPU batches: a few pages would read 0 here.)
    auto dirty = templateVm_->run("grep '^Dirty:' /proc/meminfo | tr -s ' ' | cut -d' ' -f2");
    dirtyKib_ = dirty && isNumber(*dirty) ? std::stol(*dirty) : -1;
    std::cerr << "template before the snapshot: " << dirtyKib_ << " KiB dirty in the page cache\n";
    auto snapshot = cloneCli({"snapshot", "--vm", templateSocket_, "--output", templateDir_}, 120s);
    if (snapshot.code != 0 || snapshot.output.find("1 disks copied") == std::string::npos) {
      setupError_ = "clone snapshot failed:\n" + snapshot.output + "\n" + templateVm_->output();
      return;
    }
    std::cerr << snapshot.output;
    diskHash_ = fileSha256(templateDir_ + "/disk0.raw");
  }

  static void TearDownTestSuite() { shutDownTemplate(templateVm_, templateSocket_, base_); }

  void SetUp() override { ASSERT_TRUE(setupError_.empty()) << setupError_; }

  // Runs `command` in a fork's guest through the agent; returns its output without the newline.
  static std::string inFork(const std::string& socket, const std::string& command) {
    auto out = execIn(socket, {"sh", "-c", command}, 120s);
    EXPECT_EQ(out.code, 0) << command << ": " << out.output;
    return withoutNewline(out.output);
  }

  // In the fork at `socket`: after `prepare`, a sync and dropping the page cache, whether
  // `file` reads back from the disk as what `pattern` prints: "same", else "differs: A B".
  static std::string readsBackAs(const std::string& socket, const std::string& file, const std::string& pattern,
                                 const std::string& prepare = "true") {
    return inFork(socket, prepare + " && sync && echo 3 > /proc/sys/vm/drop_caches && a=$(" + pattern +
                              " | md5sum) && b=$(md5sum < " + file + ") && "
                              "if [ \"$a\" = \"$b\" ]; then echo same; else echo \"differs: $a $b\"; fi");
  }

  static inline std::string base_;
  static inline std::string templateSocket_;
  static inline std::string templateDir_;
  static inline std::string baseImage_;
  static inline std::string baseImageHash_;
  static inline GuestSession* templateVm_ = nullptr;
  static inline std::string setupError_;
  static inline std::string blobMd5_;
  static inline std::string diskHash_;
  static inline long dirtyKib_ = -1;
};

TEST_F(ForkDiskTest, TemplateDiskIsASparseReadOnlyCopyAndTheTemplateRunsOn) {
  struct stat st {};
  ASSERT_EQ(::stat((templateDir_ + "/disk0.raw").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0444u);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskBytes);
  EXPECT_LT(static_cast<uint64_t>(st.st_blocks) * 512, kDiskBytes) << "zeros were written";
  auto manifest = shell("cat '" + templateDir_ + "/manifest.json'");
  EXPECT_NE(manifest.find(R"("file": "disk0.raw")"), std::string::npos) << manifest;
  EXPECT_NE(manifest.find(R"("source_format": "qcow2")"), std::string::npos) << manifest;
  // The template VM's disk queues run again: it writes and reads its disk after the snapshot.
  auto after = templateVm_->run("echo after-snapshot > /mnt/after.txt && sync && "
                                "echo 3 > /proc/sys/vm/drop_caches && cat /mnt/after.txt");
  ASSERT_TRUE(after) << templateVm_->output();
  EXPECT_EQ(*after, "after-snapshot");
  EXPECT_EQ(fileSha256(baseImage_), baseImageHash_) << "the template VM's base image was written";
}

TEST_F(ForkDiskTest, ForksReadTheTemplatesDiskAndWriteTheirOwn) {
  CliForks forks(templateDir_, base_ + "/rw", 2);
  ASSERT_TRUE(forks.allReady(2));
  std::cerr << forks.output;
  for (int i = 0; i < 2; ++i) {
    SCOPED_TRACE(forks.id(i));
    const std::string& vm = forks.socket(i);
    // The default: postcopy, the fork's memory stays lazy and its core resolves the disk's
    // first touches of it.
    std::string diskLog = shell("cat '" + vm + ".disk0.log'");
    EXPECT_NE(diskLog.find("postcopy: 1 memory regions registered"), std::string::npos) << diskLog;
    std::string coreLog = shell("cat '" + forks.consoleLog(i) + "'");
    EXPECT_EQ(coreLog.find("up front"), std::string::npos) << coreLog;
    EXPECT_EQ(inFork(vm, "cat /mnt/template.txt"), "from-template");
    // From the disk, not the page cache: through the fork's clone-block, its overlay and the
    // template's disk0.raw.
    EXPECT_EQ(inFork(vm, "echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/blob | cut -c1-32"), blobMd5_);
    // Written back from the fork's memory: the disk path reads pages of it nothing else has
    // touched in the fork; without postcopy they would be zeros here.
    EXPECT_GE(dirtyKib_, 2048) << "the template's file was not dirty at the snapshot: nothing tested";
    EXPECT_EQ(readsBackAs(vm, "/mnt/dirty.bin", kDirtyPattern), "same");
    // Data of its own, read back from its disk.
    std::string pattern = "yes FORK-DATA-" + forks.id(i) + " | head -c 1048576";
    EXPECT_EQ(readsBackAs(vm, "/mnt/own.bin", pattern, pattern + " > /mnt/own.bin"), "same");
  }
  // Whole-disk scans after dropping the caches: each fork's data is on its own disk only.
  // (1 MiB of 24-byte lines: 43690 whole ones; a line split across blocks may not count.)
  auto count = [&](int fork, int whose) {
    auto text = inFork(forks.socket(fork), "echo 3 > /proc/sys/vm/drop_caches; "
                                           "dd if=/dev/vda bs=1M 2>/dev/null | grep -c FORK-DATA-" +
                                               forks.id(whose) + "; true");
    return isNumber(text) ? std::stol(text) : -1L;
  };
  EXPECT_GT(count(0, 0), 40000);
  EXPECT_GT(count(1, 1), 40000);
  EXPECT_EQ(count(0, 1), 0) << "fork B's write is visible in fork A";
  EXPECT_EQ(count(1, 0), 0) << "fork A's write is visible in fork B";
  EXPECT_EQ(fileSha256(templateDir_ + "/disk0.raw"), diskHash_) << "the template's disk changed";
  EXPECT_EQ(shell("grep -c FORK-DATA- '" + templateDir_ + "/disk0.raw'"), "0\n");
  EXPECT_EQ(fileSha256(baseImage_), baseImageHash_);
}

// `clone fork --fork-server` of a template with a disk: the server's spares start each fork's
// clone-block inside the server's jail over an overlay of its own, which `clone fork` moves to
// the fork's name; the forks read the template's disk and write their own, the template's is
// unchanged, a fork can be snapshotted with its disk, and destroy removes its overlay.
TEST_F(ForkDiskTest, ForkServerForksGetDisksOfTheirOwn) {
  std::vector<std::string> overlays;
  {
    CliForks forks(templateDir_, base_ + "/served", 2, {"--fork-server", "--fork-server-linger", "1"});
    ASSERT_TRUE(forks.allReady(2));
    std::cerr << forks.output;
    for (int i = 0; i < 2; ++i) {
      SCOPED_TRACE(forks.id(i));
      const std::string& vm = forks.socket(i);
      std::string overlay = vm + ".disk0.qcow2";
      EXPECT_TRUE(std::filesystem::exists(overlay)) << overlay;
      std::string record = shell("cat '" + vm + ".disks'");
      EXPECT_NE(record.find("\"image\":\"" + overlay + "\""), std::string::npos) << record;
      EXPECT_NE(record.find("\"core_image\":"), std::string::npos) << record;
      EXPECT_EQ(inFork(vm, "cat /mnt/template.txt"), "from-template");
      EXPECT_EQ(inFork(vm, "echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/blob | cut -c1-32"), blobMd5_);
      EXPECT_EQ(readsBackAs(vm, "/mnt/dirty.bin", kDirtyPattern), "same");
      EXPECT_EQ(inFork(vm, "echo own-" + forks.id(i) + " > /mnt/own.txt && sync && "
                           "echo 3 > /proc/sys/vm/drop_caches && cat /mnt/own.txt"),
                "own-" + forks.id(i));
    }
    EXPECT_EQ(inFork(forks.socket(0), "cat /mnt/own.txt"), "own-" + forks.id(0)) << "fork B's write reached A";
    // The spares' clone-blocks (their output is the server's) did postcopy: the forks' memory
    // stayed lazy.
    auto serverLog = shell("cat '" + base_ + "/served.runtime'/fork-server-*.console");
    EXPECT_NE(serverLog.find("postcopy: 1 memory regions registered"), std::string::npos) << serverLog;
    EXPECT_EQ(serverLog.find("up front: vhost-user back-end"), std::string::npos) << serverLog;
    // Nothing of the spares is left in the server's overlay directory but the next spare's.
    auto spares = shell("ls '" + base_ + "/served.runtime'/*.overlays/ | grep -c qcow2; true");
    EXPECT_LE(std::atoi(spares.c_str()), 1) << spares;
    // A snapshot of a fork copies its disk from its overlay.
    std::string snapshotDir = base_ + "/served-snapshot";
    auto snapshot = cloneCli({"snapshot", "--vm", forks.socket(1), "--output", snapshotDir}, 120s);
    EXPECT_EQ(snapshot.code, 0) << snapshot.output;
    auto copies = shell("grep -c own-" + forks.id(1) + " '" + snapshotDir + "/disk0.raw'");
    EXPECT_GE(std::atoi(copies.c_str()), 1) << copies;
    overlays = {forks.socket(0) + ".disk0.qcow2", forks.socket(1) + ".disk0.qcow2"};
  }  // clone destroy of each fork
  for (const auto& overlay : overlays) EXPECT_FALSE(std::filesystem::exists(overlay)) << overlay;
  EXPECT_EQ(fileSha256(templateDir_ + "/disk0.raw"), diskHash_) << "the template's disk changed";
  EXPECT_EQ(fileSha256(baseImage_), baseImageHash_);
}

// `clone fork --disk-fill-up-front`: no postcopy; the core fills all of the fork's memory
// before its disk starts. What the template left dirty in its page cache is written back by
// the fork from that memory, and its own data reads back.
TEST_F(ForkDiskTest, FilledUpFrontForkWritesBackTheTemplatesDirtyDataAndItsOwn) {
  CliForks forks(templateDir_, base_ + "/filled", 1, {"--disk-fill-up-front"});
  ASSERT_TRUE(forks.allReady(1));
  const std::string& vm = forks.socket(0);
  std::string diskLog = shell("cat '" + vm + ".disk0.log'");
  EXPECT_EQ(diskLog.find("postcopy"), std::string::npos) << diskLog;
  std::string coreLog = shell("cat '" + forks.consoleLog(0) + "'");
  EXPECT_NE(coreLog.find("up front: vhost-user back-end"), std::string::npos) << coreLog;
  EXPECT_EQ(inFork(vm, "cat /mnt/template.txt"), "from-template");
  EXPECT_GE(dirtyKib_, 2048) << "the template's file was not dirty at the snapshot: nothing tested";
  EXPECT_EQ(readsBackAs(vm, "/mnt/dirty.bin", kDirtyPattern), "same");
  std::string pattern = "yes FILLED-DATA | head -c 1048576";
  EXPECT_EQ(readsBackAs(vm, "/mnt/own.bin", pattern, pattern + " > /mnt/own.bin"), "same");
  EXPECT_EQ(fileSha256(templateDir_ + "/disk0.raw"), diskHash_) << "the template's disk changed";
}

// `clone fork --fork-server --disk-fill-up-front`: a server of its own whose spares' disks do
// no postcopy and whose spares fill their memory up front; its fork reads the template's
// dirty data back from that memory.
TEST_F(ForkDiskTest, AFillUpFrontForkServerFillsItsSparesMemory) {
  CliForks forks(templateDir_, base_ + "/served-filled", 1,
                 {"--fork-server", "--disk-fill-up-front", "--fork-server-linger", "1"});
  ASSERT_TRUE(forks.allReady(1));
  const std::string& vm = forks.socket(0);
  auto serverLog = shell("cat '" + base_ + "/served-filled.runtime'/fork-server-*.console");
  EXPECT_NE(serverLog.find("up front: vhost-user back-end"), std::string::npos) << serverLog;
  EXPECT_EQ(serverLog.find("postcopy: 1 memory regions registered"), std::string::npos) << serverLog;
  EXPECT_EQ(inFork(vm, "cat /mnt/template.txt"), "from-template");
  EXPECT_EQ(readsBackAs(vm, "/mnt/dirty.bin", kDirtyPattern), "same");
}

TEST_F(ForkDiskTest, DestroyRemovesTheForksDiskAndKeepsAnOverlayGivenWithDisk) {
  std::string runtime = base_ + "/runtime";
  std::filesystem::create_directories(runtime);
  ::setenv("CLONE_RUNTIME_DIR", runtime.c_str(), 1);
  std::string keep = base_ + "/keep.qcow2";
  auto fork = cloneCli({"fork", "--template", templateDir_, "--disk", "0,overlay=" + keep}, 120s);
  ::unsetenv("CLONE_RUNTIME_DIR");
  ASSERT_EQ(fork.code, 0) << fork.output;
  auto printed = parseForkOutput(fork.output);
  ASSERT_EQ(printed.forks.size(), 1u) << fork.output;
  auto [id, socket] = printed.forks[0];
  EXPECT_EQ(inFork(socket, "echo KEPT-BY-THE-USER > /mnt/kept.txt && sync && echo ok"), "ok");
  EXPECT_TRUE(std::filesystem::exists(runtime + "/" + id + ".disk0.log"));
  EXPECT_FALSE(std::filesystem::exists(runtime + "/" + id + ".disk0.qcow2")) << "the overlay is the user's";
  ASSERT_EQ(cloneCli({"destroy", "--vm", socket}).code, 0);
  EXPECT_FALSE(std::filesystem::exists(runtime + "/" + id + ".disk0.log"));
  EXPECT_TRUE(std::filesystem::exists(keep));
  EXPECT_NE(shell("grep -c KEPT-BY-THE-USER '" + keep + "'"), "0\n");
  // clone-block ended with the core ([k]: pgrep does not match its own shell).
  std::string left;
  for (int i = 0; i < 50; ++i) {
    left = shell("pgrep -f -- '[k]eep.qcow2'");
    if (left.empty()) break;
    std::this_thread::sleep_for(100ms);
  }
  EXPECT_EQ(left, "") << "the fork's clone-block outlived it";

  // Without --disk, the overlay is in the runtime directory and goes with the fork.
  ::setenv("CLONE_RUNTIME_DIR", runtime.c_str(), 1);
  auto plain = cloneCli({"fork", "--template", templateDir_}, 120s);
  ::unsetenv("CLONE_RUNTIME_DIR");
  ASSERT_EQ(plain.code, 0) << plain.output;
  auto second = parseForkOutput(plain.output);
  ASSERT_EQ(second.forks.size(), 1u) << plain.output;
  std::string overlay = runtime + "/" + second.forks[0].first + ".disk0.qcow2";
  EXPECT_TRUE(std::filesystem::exists(overlay));
  ASSERT_EQ(cloneCli({"destroy", "--vm", second.forks[0].second}).code, 0);
  EXPECT_FALSE(std::filesystem::exists(overlay));
}

TEST_F(ForkDiskTest, DamagedTemplateDisksAreRefused) {
  std::string truncated = base_ + "/truncated";
  std::string modified = base_ + "/modified";
  for (const auto& dir : {truncated, modified}) {
    ASSERT_EQ(std::system(("cp -a --sparse=always '" + templateDir_ + "' '" + dir + "' && chmod u+w '" +
                           dir + "'/*").c_str()),
              0);
  }
  ASSERT_EQ(std::system(("truncate -s -1M '" + truncated + "/disk0.raw'").c_str()), 0);
  ASSERT_EQ(std::system(("printf 'X' | dd of='" + modified + "/disk0.raw' bs=1 seek=1030 conv=notrunc "
                         "2>/dev/null").c_str()),
            0);
  struct Case {
    std::string dir;
    std::string reason;
  };
  for (const auto& c : {Case{truncated, "truncated"}, Case{modified, "differs from the manifest's digest"}}) {
    auto fork = cloneCli({"fork", "--template", c.dir});
    EXPECT_EQ(fork.code, 1) << fork.output;
    EXPECT_NE(fork.output.find(c.reason), std::string::npos) << fork.output;
    EXPECT_NE(fork.output.find("disk0.raw"), std::string::npos) << fork.output;
    EXPECT_TRUE(parseForkOutput(fork.output).forks.empty()) << fork.output;
    GuestSession vmm(buildBin("clone-vmm"), {"--restore", c.dir});
    vmm.closeInput();
    EXPECT_EQ(vmm.waitExit(10s), 1) << vmm.output();
    EXPECT_NE(vmm.output().find(c.reason), std::string::npos) << vmm.output();
  }
  // A fork's core must be given the template's disk.
  GuestSession vmm(buildBin("clone-vmm"), {"--restore", templateDir_});
  vmm.closeInput();
  EXPECT_EQ(vmm.waitExit(10s), 1) << vmm.output();
  EXPECT_NE(vmm.output().find("the template has 1 disks, 0 --vhost-user-blk given"), std::string::npos)
      << vmm.output();
}

// clone-block maps the fork's memory: a copy-on-write mapping of the template cannot be
// shared with it, so such a template is refused before anything starts.
TEST_F(ForkDiskTest, CopyOnWriteIsRefusedForATemplateWithADisk) {
  auto fork = cloneCli({"fork", "--template", templateDir_, "--fork-memory", "cow"});
  EXPECT_EQ(fork.code, 1) << fork.output;
  EXPECT_NE(fork.output.find("--fork-memory cow: " + templateDir_ + " has 1 disks"), std::string::npos)
      << fork.output;
  EXPECT_TRUE(parseForkOutput(fork.output).forks.empty()) << fork.output;
  // The core refuses it too, before it touches the disk's socket.
  GuestSession vmm(buildBin("clone-vmm"), {"--restore", templateDir_, "--fork-memory", "cow",
                                           "--vhost-user-blk", base_ + "/no-such.sock"});
  vmm.closeInput();
  EXPECT_EQ(vmm.waitExit(10s), 1) << vmm.output();
  EXPECT_NE(vmm.output().find("--fork-memory cow: 1 vhost-user devices"), std::string::npos)
      << vmm.output();
}

}  // namespace
}  // namespace clonevm::e2e
