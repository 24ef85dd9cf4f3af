// Issue 7: the guest agent over virtio-vsock (kernel vhost-vsock). Boots VMs with `clone run
// --api-socket`, then drives the agent with `clone exec` and the client library: stdout and
// stderr kept apart, exit codes and signals, stdin forwarded, concurrent commands, and an
// IDENTITY (hostname, wall clock, RNG seed) verified from inside the guest.
#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <random>
#include <regex>
#include <thread>

#include <gtest/gtest.h>

#include "cli/agent_client.h"
#include "tests/support/guest_session.h"

namespace clonevm::e2e {
namespace {

using Clock = std::chrono::steady_clock;

struct Outcome {
  int code;
  std::string output;
};

Outcome runProgram(const std::string& program, const std::vector<std::string>& args,
                   std::chrono::milliseconds timeout = 60s) {
  GuestSession process(program, args);
  process.closeInput();
  auto code = process.waitExit(timeout);
  return {code.value_or(-1), process.output()};
}

Outcome cloneCli(const std::vector<std::string>& args) { return runProgram(buildBin("clone"), args); }

// `clone exec` through a host shell, so stdout and stderr can be told apart.
Outcome shell(const std::string& script) { return runProgram("/bin/sh", {"-c", script}); }

std::string socketPath(const std::string& name) {
  return "/tmp/clone-agent-test-" + name + "-" + std::to_string(::getpid()) + ".sock";
}

class Vm {
 public:
  explicit Vm(const std::string& name, std::vector<std::string> extra = {})
      : socket_(socketPath(name)) {
    std::vector<std::string> args = {"run", "--no-jail", "--kernel", guestKernel(), "--initrd",
                                     guestInitrd(), "--cmdline", "console=ttyS0 quiet",
                                     "--api-socket", socket_};
    args.insert(args.end(), extra.begin(), extra.end());
    session_ = std::make_unique<GuestSession>(buildBin("clone"), args);
  }
  ~Vm() {
    if (session_) {
      cloneCli({"shutdown", "--vm", socket_});
      session_->waitExit(10s);
    }
  }
  bool ready() { return session_->expect("CLONE-GUEST-READY"); }
  GuestSession& console() { return *session_; }
  const std::string& socket() const { return socket_; }
  uint32_t cid() {
    auto status = cloneCli({"status", "--vm", socket_, "--json"});
    std::smatch match;
    if (status.code != 0 || !std::regex_search(status.output, match, std::regex(R"("vsock_cid":(\d+))"))) {
      ADD_FAILURE() << "no vsock_cid in: " << status.output;
      return 0;
    }
    return static_cast<uint32_t>(std::stoul(match[1]));
  }

 private:
  std::string socket_;
  std::unique_ptr<GuestSession> session_;
};

struct GuestRun {
  int code = -1;
  std::string out, err;
};

std::string readMemfd(int fd) {
  std::string data;
  ::lseek(fd, 0, SEEK_SET);
  char buffer[4096];
  ssize_t n;
  while ((n = ::read(fd, buffer, sizeof buffer)) > 0) data.append(buffer, static_cast<size_t>(n));
  ::close(fd);
  return data;
}

// Runs a command through the client library (stdin closed).
GuestRun guestRun(uint32_t cid, std::vector<std::string> argv) {
  auto connection = cli::AgentConnection::connect(cid, cli::kAgentPort, 30s);
  int out = ::memfd_create("out", MFD_CLOEXEC);
  int err = ::memfd_create("err", MFD_CLOEXEC);
  GuestRun run;
  run.code = cli::exec(connection, {std::move(argv), std::nullopt}, -1, out, err, 60s).exitCode();
  run.out = readMemfd(out);
  run.err = readMemfd(err);
  return run;
}

int64_t hostSeconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch()).count();
}

TEST(AgentTest, ExecStreamsExitCodesStdinAndConcurrency) {
  Vm vm("exec");
  ASSERT_TRUE(vm.ready()) << vm.console().output();
  uint32_t cid = vm.cid();
  ASSERT_GE(cid, 3u);
  std::string clone = buildBin("clone");
  std::string vmArg = " exec --vm " + vm.socket() + " -- ";

  auto hi = cloneCli({"exec", "--vm", vm.socket(), "--", "echo", "hi"});
  EXPECT_EQ(hi.code, 0) << hi.output;
  EXPECT_EQ(hi.output, "hi\n");

  // stdout only (stderr to /dev/null), then stderr only; the exit code comes through.
  std::string command = "'" + clone + "'" + vmArg + "sh -c 'echo out; echo err >&2; exit 7'";
  auto stdoutOnly = shell(command + " 2>/dev/null; echo rc=$?");
  EXPECT_EQ(stdoutOnly.output, "out\nrc=7\n");
  auto stderrOnly = shell(command + " 2>&1 >/dev/null; echo rc=$?");
  EXPECT_EQ(stderrOnly.output, "err\nrc=7\n");

  // A command killed by a signal: 128 + signal; a missing one: 127, like a shell.
  auto killed = cloneCli({"exec", "--vm", vm.socket(), "--", "sh", "-c", "kill -9 $$"});
  EXPECT_EQ(killed.code, 137) << killed.output;
  auto missing = cloneCli({"exec", "--vm", vm.socket(), "--", "no-such-command"});
  EXPECT_EQ(missing.code, 127) << missing.output;
  EXPECT_NE(missing.output.find("no-such-command"), std::string::npos) << missing.output;

  // stdin is forwarded, and its EOF ends `cat`.
  {
    GuestSession cat(clone, {"exec", "--vm", vm.socket(), "--", "cat"});
    cat.sendLine("hello through the agent");
    EXPECT_TRUE(cat.expect("hello through the agent", 20s)) << cat.output();
    std::string big(30000, 'x');  // several frames' worth
    cat.sendLine(big);
    cat.closeInput();
    EXPECT_EQ(cat.waitExit(30s), 0) << cat.output().size();
    EXPECT_EQ(cat.output().size(), std::string("hello through the agent\n").size() + big.size() + 1);
  }

  // `sleep 2` runs while other commands come and go on their own connections.
  auto sleepStart = Clock::now();
  GuestSession sleeper(clone, {"exec", "--vm", vm.socket(), "--", "sh", "-c", "sleep 2; echo slept"});
  std::this_thread::sleep_for(200ms);
  std::vector<std::thread> others;
  std::vector<GuestRun> results(4);
  for (size_t i = 0; i < results.size(); ++i) {
    others.emplace_back([&, i] {
      results[i] = guestRun(cid, {"sh", "-c", "echo quick-" + std::to_string(i)});
    });
  }
  for (auto& t : others) t.join();
  auto quickDone = Clock::now() - sleepStart;
  for (size_t i = 0; i < results.size(); ++i) {
    EXPECT_EQ(results[i].code, 0);
    EXPECT_EQ(results[i].out, "quick-" + std::to_string(i) + "\n");
  }
  sleeper.closeInput();
  EXPECT_EQ(sleeper.waitExit(30s), 0) << sleeper.output();
  auto sleepDone = Clock::now() - sleepStart;
  EXPECT_EQ(sleeper.output(), "slept\n");
  EXPECT_LT(quickDone, 2s) << "the quick commands waited for the sleeping one";
  EXPECT_GE(sleepDone, 2s);

  // --timeout kills a command that runs too long.
  auto timedOut = cloneCli({"exec", "--vm", vm.socket(), "--timeout", "1", "--", "sleep", "30"});
  EXPECT_EQ(timedOut.code, 124) << timedOut.output;

  // --cid reaches the same agent; PING answers.
  auto byCid = cloneCli({"exec", "--cid", std::to_string(cid), "--", "cat", "/proc/sys/kernel/hostname"});
  EXPECT_EQ(byCid.code, 0) << byCid.output;
  auto connection = cli::AgentConnection::connect(cid, cli::kAgentPort, 10s);
  std::cout << "agent PING round trip: " << cli::ping(connection).count() << " us\n";
}

TEST(AgentTest, IdentityIsAppliedAndVisibleInsideTheGuest) {
  Vm first("id-a");
  Vm second("id-b");
  ASSERT_TRUE(first.ready()) << first.console().output();
  ASSERT_TRUE(second.ready()) << second.console().output();
  uint32_t cidA = first.cid();
  uint32_t cidB = second.cid();
  ASSERT_NE(cidA, cidB);

  // Set the clock wrong first, so the identity's clock step is visible.
  auto wrong = guestRun(cidA, {"date", "-s", "@1000000000"});
  ASSERT_EQ(wrong.code, 0) << wrong.err;
  auto before = guestRun(cidA, {"date", "+%s"});
  EXPECT_LT(std::stoll(before.out), 1000000100) << before.out;

  std::mt19937_64 rng(std::random_device{}());
  auto seed = [&] {
    std::vector<uint8_t> bytes(64);
    for (auto& b : bytes) b = static_cast<uint8_t>(rng());
    return bytes;
  };
  auto entropyBefore = guestRun(cidA, {"cat", "/proc/sys/kernel/random/entropy_avail"});

  cli::Identity identity;
  identity.hostname = "fork-a";
  identity.rngSeed = seed();
  identity.clock = std::chrono::system_clock::now();
  auto connection = cli::AgentConnection::connect(cidA, cli::kAgentPort, 30s);
  auto result = cli::applyIdentity(connection, identity);
  EXPECT_TRUE(result.hostnameApplied) << result.hostnameError;
  EXPECT_TRUE(result.seedApplied) << result.seedError;
  EXPECT_TRUE(result.clockApplied) << result.clockError;
  EXPECT_EQ(result.guestHostname, "fork-a");
  auto readBack = std::chrono::duration_cast<std::chrono::seconds>(
                      result.guestClock - std::chrono::system_clock::now()).count();
  EXPECT_LE(std::abs(readBack), 3) << "guest clock read back " << readBack << " s off";
  EXPECT_EQ(result.crngReady, 1);
  EXPECT_GE(result.entropyAvail, 0);
  std::cout << "identity: entropy_avail " << entropyBefore.out.substr(0, entropyBefore.out.size() - 1)
            << " -> " << result.entropyAvail << ", crng ready " << result.crngReady
            << ", RNDRESEEDCRNG errno " << result.reseedError << "\n";

  // Verified from inside the guest with ordinary tools.
  EXPECT_EQ(guestRun(cidA, {"hostname"}).out, "fork-a\n");
  EXPECT_EQ(guestRun(cidA, {"cat", "/etc/hostname"}).out, "fork-a\n");
  auto after = guestRun(cidA, {"date", "+%s"});
  EXPECT_LE(std::abs(std::stoll(after.out) - hostSeconds()), 3) << after.out;

  // The second VM, seeded differently: both accept the seed; their RNG output differs.
  cli::Identity other;
  other.rngSeed = seed();
  auto otherConnection = cli::AgentConnection::connect(cidB, cli::kAgentPort, 30s);
  auto otherResult = cli::applyIdentity(otherConnection, other);
  EXPECT_TRUE(otherResult.seedApplied) << otherResult.seedError;
  EXPECT_FALSE(otherResult.hostnameApplied);  // not asked for
  auto bytesA = guestRun(cidA, {"sh", "-c", "head -c8 /dev/urandom | od -An -tx1"});
  auto bytesB = guestRun(cidB, {"sh", "-c", "head -c8 /dev/urandom | od -An -tx1"});
  EXPECT_EQ(bytesA.code, 0);
  EXPECT_NE(bytesA.out, bytesB.out);
  std::cout << "urandom after seeding: A" << bytesA.out << "                       B" << bytesB.out;
}

TEST(AgentTest, CidChoiceAndConflicts) {
  // An explicit CID shows in the status; asking for it again is a clear error.
  uint32_t wanted = 3000 + static_cast<uint32_t>(::getpid() % 100000);
  Vm vm("cid", {"--vsock-cid", std::to_string(wanted)});
  ASSERT_TRUE(vm.ready()) << vm.console().output();
  EXPECT_EQ(vm.cid(), wanted);
  auto status = cloneCli({"status", "--vm", vm.socket()});
  EXPECT_NE(status.output.find("vsock cid: " + std::to_string(wanted)), std::string::npos) << status.output;

  auto clash = runProgram(buildBin("clone-vmm"),
                          {"--kernel", guestKernel(), "--vsock-cid", std::to_string(wanted)}, 30s);
  EXPECT_EQ(clash.code, 1);
  EXPECT_NE(clash.output.find("--vsock-cid " + std::to_string(wanted) + ": CID already in use"),
            std::string::npos)
      << clash.output;

  // --no-vsock: CID 0 in the status, and clone exec says why it cannot work.
  Vm plain("novsock", {"--no-vsock"});
  ASSERT_TRUE(plain.ready()) << plain.console().output();
  EXPECT_EQ(plain.cid(), 0u);
  auto refused = cloneCli({"exec", "--vm", plain.socket(), "--", "true"});
  EXPECT_EQ(refused.code, 1);
  EXPECT_NE(refused.output.find("no vsock device"), std::string::npos) << refused.output;
}

}  // namespace
}  // namespace clonevm::e2e
