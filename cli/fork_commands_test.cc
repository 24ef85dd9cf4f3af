#include "cli/fork_commands.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <capnp/rpc-twoparty.h>
#include <gtest/gtest.h>

#include "ipc/capnp/rpc_socket.h"
#include "vm_control.capnp.h"
#include "vmm-core/snapshot/working_set_file.h"

namespace clonevm::cli {
namespace {

using namespace std::chrono_literals;
using SystemClock = std::chrono::system_clock;

// What a well-behaved agent reads back for `sent` at `guestClock`.
IdentityResult appliedAsAsked(const Identity& sent, SystemClock::time_point guestClock) {
  IdentityResult result;
  result.hostnameApplied = result.seedApplied = result.clockApplied = true;
  result.entropyAvail = 256;
  result.crngReady = 1;
  result.guestClock = guestClock;
  result.guestHostname = sent.hostname.value_or("");
  return result;
}

std::string joined(const std::vector<std::string>& problems) {
  std::string text;
  for (const auto& p : problems) text += p + "\n";
  return text;
}

TEST(ForkIdentityTest, ForkIdentityHasTheIdAFreshSeedAndNow) {
  auto before = SystemClock::now();
  auto a = forkIdentity("fork-0000abcd");
  auto b = forkIdentity("fork-0000abcd");
  EXPECT_EQ(a.hostname, "fork-0000abcd");
  EXPECT_EQ(a.rngSeed.size(), 32u);
  EXPECT_NE(a.rngSeed, b.rngSeed) << "two forks got the same seed";
  ASSERT_TRUE(a.clock);
  EXPECT_GE(*a.clock, before);
  EXPECT_LE(*a.clock, SystemClock::now());
}

TEST(ForkIdentityTest, AnswerAsAskedHasNoProblems) {
  auto sent = forkIdentity("fork-1");
  auto now = SystemClock::now();
  EXPECT_TRUE(identityProblems(sent, appliedAsAsked(sent, now - 1500ms), now).empty());
  EXPECT_TRUE(identityProblems(sent, appliedAsAsked(sent, now + 1500ms), now).empty());
}

TEST(ForkIdentityTest, EachFailureIsNamed) {
  auto sent = forkIdentity("fork-1");
  auto now = SystemClock::now();
  struct Case {
    const char* what;
    void (*spoil)(IdentityResult&);
    const char* expected;
  };
  const Case cases[] = {
      {"hostname refused", [](IdentityResult& r) { r.hostnameApplied = false; r.hostnameError = EPERM; },
       "hostname not set: guest errno 1"},
      {"other hostname", [](IdentityResult& r) { r.guestHostname = "template"; },
       "reads hostname 'template', not 'fork-1'"},
      {"seed refused", [](IdentityResult& r) { r.seedApplied = false; r.seedError = EPERM; },
       "RNG seed not added (RNDADDENTROPY): guest errno 1"},
      {"no reseed", [](IdentityResult& r) { r.reseedError = EINVAL; }, "CRNG not reseeded"},
      {"crng not ready", [](IdentityResult& r) { r.crngReady = 0; }, "CRNG is not ready"},
      {"clock refused", [](IdentityResult& r) { r.clockApplied = false; r.clockError = EINVAL; },
       "clock not set: guest errno 22"},
      {"clock behind", [](IdentityResult& r) { r.guestClock -= 5s; }, "clock reads -5.000 s off"},
      {"clock ahead", [](IdentityResult& r) { r.guestClock += 2500ms; }, "clock reads 2.500 s off"},
  };
  for (const auto& c : cases) {
    auto result = appliedAsAsked(sent, now);
    c.spoil(result);
    auto problems = identityProblems(sent, result, now);
    ASSERT_EQ(problems.size(), 1u) << c.what << ":\n" << joined(problems);
    EXPECT_NE(problems[0].find(c.expected), std::string::npos) << c.what << ": " << problems[0];
  }
  // Several at once: one line each.
  IdentityResult nothing;
  EXPECT_EQ(identityProblems(sent, nothing, now).size(), 3u) << joined(identityProblems(sent, nothing, now));
}

TEST(ForkIdentityTest, OnlyWhatWasSentIsChecked) {
  Identity hostnameOnly;
  hostnameOnly.hostname = "fork-2";
  IdentityResult result;
  result.hostnameApplied = true;
  result.guestHostname = "fork-2";
  EXPECT_TRUE(identityProblems(hostnameOnly, result, SystemClock::now()).empty());
}

// Parses `clone fork ARGS` into options. The verb's callback runs too and fails on the missing
// template, after parsing.
// Fails every launch: parsing must never start a process.
class RefusingLauncher : public ProcessLauncher {
 public:
  pid_t launch(const ProcessSpec&) override { throw Error("no launches in this test"); }
};

ForkCommandOptions parseFork(std::vector<std::string> args, bool& parseError) {
  CLI::App app;
  ForkCommandOptions options;
  std::ostringstream out, err;
  RefusingLauncher launcher;
  addForkCommands(app, options, {out, err}, launcher);
  args.insert(args.begin(), "fork");
  std::vector<std::string> reversed(args.rbegin(), args.rend());
  parseError = false;
  try {
    app.parse(reversed);
  } catch (const CLI::ParseError&) {
    parseError = true;
  } catch (const Error&) {
  }
  return options;
}

TEST(ForkCommandTest, NoIdentityFlag) {
  bool parseError = true;
  auto plain = parseFork({"--template", "/nonexistent-template", "--count", "3"}, parseError);
  EXPECT_FALSE(parseError);
  EXPECT_FALSE(plain.noIdentity);
  EXPECT_EQ(plain.count, 3u);
  EXPECT_FALSE(plain.forkServer);
  EXPECT_TRUE(parseFork({"--template", "/nonexistent-template", "--fork-server"}, parseError).forkServer);
  EXPECT_FALSE(parseError);
  auto without = parseFork({"--template", "/nonexistent-template", "--no-identity"}, parseError);
  EXPECT_FALSE(parseError);
  EXPECT_TRUE(without.noIdentity);
  parseFork({"--template", "/nonexistent-template", "--no-identity=maybe"}, parseError);
  EXPECT_TRUE(parseError);
  parseFork({"--template", "/nonexistent-template", "--count", "0"}, parseError);
  EXPECT_TRUE(parseError);
}

TEST(ForkCommandTest, AForksJailHoldsItsTemplateAndDevicesAndNothingWritable) {
  vmm::snapshot::Manifest manifest;
  manifest.memoryBytes = 512ull << 20;
  manifest.devices = {"serial-16550 (COM1)", vmm::snapshot::kVsockDeviceName};
  auto spec = forkProcessSpec("fork-1", "/srv/tpl", manifest, "/run/clone/fork-1.sock",
                              "/run/clone/fork-1.console", "/usr/bin/clone-vmm",
                              /*copyOnWriteMemory=*/false, /*apiFd=*/5);
  EXPECT_EQ(spec.kind, "vmm");
  EXPECT_EQ(spec.args, (std::vector<std::string>{"--restore", "/srv/tpl", "--api-fd", "5",
                                                 "--api-socket", "/run/clone/fork-1.sock"}));
  EXPECT_EQ(spec.keepFds, std::vector<int>{5});
  EXPECT_EQ(spec.readPaths, std::vector<std::string>{"/srv/tpl"});
  EXPECT_TRUE(spec.writePaths.empty()) << "the runtime directory, shared by all forks, is not in the jail";
  EXPECT_EQ(spec.devices, (std::vector<std::string>{"/dev/kvm", "/dev/userfaultfd", "/dev/vhost-vsock"}));
  EXPECT_EQ(spec.memoryBytes, 512ull << 20);
  EXPECT_EQ(spec.detachedOutput, "/run/clone/fork-1.console");

  manifest.devices = {"serial-16550 (COM1)"};  // a template without vsock: no vsock device node
  spec = forkProcessSpec("fork-2", "/srv/tpl", manifest, "/run/clone/fork-2.sock", "/dev/null",
                         "/usr/bin/clone-vmm", /*copyOnWriteMemory=*/false, /*apiFd=*/5);
  EXPECT_EQ(spec.devices, (std::vector<std::string>{"/dev/kvm", "/dev/userfaultfd"}));

  // A copy-on-write fork maps the template's memory file and fills nothing: no userfaultfd.
  spec = forkProcessSpec("fork-3", "/srv/tpl", manifest, "/run/clone/fork-3.sock", "/dev/null",
                         "/usr/bin/clone-vmm", /*copyOnWriteMemory=*/true, /*apiFd=*/5);
  EXPECT_EQ(spec.args, (std::vector<std::string>{"--restore", "/srv/tpl", "--api-fd", "5",
                                                 "--api-socket", "/run/clone/fork-3.sock",
                                                 "--fork-memory", "cow"}));
  EXPECT_EQ(spec.devices, std::vector<std::string>{"/dev/kvm"});
}

TEST(ForkCommandTest, AForkServersJailIsAForksJailForAllItsForks) {
  vmm::snapshot::Manifest manifest;
  manifest.memoryBytes = 256ull << 20;
  manifest.devices = {"serial-16550 (COM1)", vmm::snapshot::kVsockDeviceName};
  auto spec = forkServerProcessSpec("fork-server-1", "/srv/tpl", manifest, "/run/clone/fork-server-1.console",
                                    "/usr/bin/clone-vmm", /*copyOnWriteMemory=*/true, /*serverFd=*/6,
                                    /*forks=*/10);
  EXPECT_EQ(spec.kind, "vmm");
  EXPECT_EQ(spec.args, (std::vector<std::string>{"--restore", "/srv/tpl", "--fork-server-fd", "6",
                                                 "--fork-memory", "cow"}));
  EXPECT_EQ(spec.keepFds, std::vector<int>{6});
  EXPECT_EQ(spec.readPaths, std::vector<std::string>{"/srv/tpl"});
  EXPECT_TRUE(spec.writePaths.empty()) << "each fork's socket and log come as fds";
  EXPECT_EQ(spec.devices, (std::vector<std::string>{"/dev/kvm", "/dev/vhost-vsock"}));
  EXPECT_EQ(spec.memoryBytes, 10 * (256ull << 20));
  EXPECT_EQ(spec.processes, 11u);
  EXPECT_EQ(spec.detachedOutput, "/run/clone/fork-server-1.console");

  // One server per template version, way of forking and jailing.
  vmm::snapshot::FileIdentity memory{1, 2, 3, 4, 5};
  std::string base = forkServerBase("/run/clone", "/srv/tpl", memory, "memfd", true);
  EXPECT_EQ(base, forkServerBase("/run/clone", "/srv/tpl", memory, "memfd", true));
  EXPECT_TRUE(base.starts_with("/run/clone/fork-server-")) << base;
  EXPECT_NE(base, forkServerBase("/run/clone", "/srv/tpl2", memory, "memfd", true));
  EXPECT_NE(base, forkServerBase("/run/clone", "/srv/tpl", memory, "cow", true));
  EXPECT_NE(base, forkServerBase("/run/clone", "/srv/tpl", memory, "memfd", false));
  EXPECT_NE(base, forkServerBase("/run/clone", "/srv/tpl", memory, "memfd", true, /*disksFilledUpFront=*/true));
  auto rewritten = memory;
  rewritten.ctimeNs++;  // the template written again at the same path
  EXPECT_NE(base, forkServerBase("/run/clone", "/srv/tpl", rewritten, "memfd", true));

  spec = forkServerProcessSpec("fork-server-2", "/srv/tpl", manifest, "/dev/null", "/usr/bin/clone-vmm",
                               /*copyOnWriteMemory=*/false, /*serverFd=*/6, /*forks=*/1);
  EXPECT_EQ(spec.args, (std::vector<std::string>{"--restore", "/srv/tpl", "--fork-server-fd", "6"}));
  EXPECT_EQ(spec.devices, (std::vector<std::string>{"/dev/kvm", "/dev/userfaultfd", "/dev/vhost-vsock"}));
}

// A socket file at `path`, bound and, if `listening`, listened on; the fd is returned open.
UniqueFd boundSocket(const std::string& path, bool listening) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  sockaddr_un address = rpc::unixAddress(path);
  EXPECT_EQ(::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)), 0) << path;
  if (listening) {
    EXPECT_EQ(::listen(fd.get(), 4), 0);
  }
  return fd;
}

TEST(ForkCommandTest, EndedForkServersLeaveNoSocketOrEmptyOverlayDirectory) {
  namespace fs = std::filesystem;
  fs::path runtime = fs::temp_directory_path() / ("clone-ended-servers-" + std::to_string(::getpid()));
  fs::remove_all(runtime);
  fs::create_directories(runtime);
  auto base = [&](const char* name) { return (runtime / name).string(); };
  // Ended: bound, never listened on (as a server's socket after it ended), empty overlays, a log.
  boundSocket(base("fork-server-ended.forkserver"), false);
  fs::create_directory(base("fork-server-ended.overlays"));
  { std::ofstream(base("fork-server-ended.console")) << "log\n"; }
  // Ended, an overlay left in its directory: the directory stays.
  boundSocket(base("fork-server-full.forkserver"), false);
  fs::create_directory(base("fork-server-full.overlays"));
  { std::ofstream(base("fork-server-full.overlays") + "/spare-1.disk0.qcow2") << "x"; }
  // Running: listened on.
  UniqueFd running = boundSocket(base("fork-server-running.forkserver"), true);
  fs::create_directory(base("fork-server-running.overlays"));
  // Not a server's.
  boundSocket(base("other.forkserver"), false);

  removeEndedForkServers(runtime.string(), std::chrono::hours(1));  // all too young
  EXPECT_TRUE(fs::exists(base("fork-server-ended.forkserver")));
  EXPECT_TRUE(fs::exists(base("fork-server-ended.overlays")));

  removeEndedForkServers(runtime.string(), std::chrono::seconds(0));
  EXPECT_FALSE(fs::exists(base("fork-server-ended.forkserver")));
  EXPECT_FALSE(fs::exists(base("fork-server-ended.overlays")));
  EXPECT_TRUE(fs::exists(base("fork-server-ended.console")));
  EXPECT_FALSE(fs::exists(base("fork-server-full.forkserver")));
  EXPECT_TRUE(fs::exists(base("fork-server-full.overlays") + "/spare-1.disk0.qcow2"));
  EXPECT_TRUE(fs::exists(base("fork-server-running.forkserver")));
  EXPECT_TRUE(fs::exists(base("fork-server-running.overlays")));
  EXPECT_TRUE(fs::exists(base("other.forkserver")));
  fs::remove_all(runtime);
}

// A template with disks: the spares start each fork's clone-blocks inside the server's jail,
// which then holds the program and, its one writable path, the overlay directory.
TEST(ForkCommandTest, AForkServerOfATemplateWithDisksHoldsTheDiskProgramAndItsOverlayDirectory) {
  vmm::snapshot::Manifest manifest;
  manifest.memoryBytes = 256ull << 20;
  manifest.disks.resize(1);
  manifest.disks[0].file = "disk0.raw";
  EXPECT_THROW(forkServerProcessSpec("fork-server-3", "/srv/tpl", manifest, "/dev/null", "/usr/bin/clone-vmm",
                                     false, 6, 4),
               Error);
  auto spec = forkServerProcessSpec("fork-server-3", "/srv/tpl", manifest, "/dev/null", "/usr/bin/clone-vmm",
                                    false, 6, 4, {"/usr/bin/clone-block", "/run/clone/fork-server-3.overlays"});
  EXPECT_EQ(spec.args, (std::vector<std::string>{"--restore", "/srv/tpl", "--fork-server-fd", "6",
                                                 "--fork-server-block", "/usr/bin/clone-block",
                                                 "--fork-server-overlays", "/run/clone/fork-server-3.overlays"}));
  EXPECT_EQ(spec.readPaths, (std::vector<std::string>{"/srv/tpl", "/usr/bin/clone-block"}));
  EXPECT_EQ(spec.writePaths, std::vector<std::string>{"/run/clone/fork-server-3.overlays"});
  // --disk-fill-up-front: the spares' disks without postcopy.
  spec = forkServerProcessSpec("fork-server-3", "/srv/tpl", manifest, "/dev/null", "/usr/bin/clone-vmm", false, 6,
                               4, {"/usr/bin/clone-block", "/run/clone/fork-server-3.overlays", true});
  EXPECT_EQ(spec.args.back(), "--fork-server-disks-filled-up-front");
}

// A fork's VM API that answers recordedWorkingSet with whatever it was given, as a
// compromised fork could; served on its own thread, as a fork's core serves it.
class FakeFork final : public rpc::VmControl::Server {
 public:
  FakeFork(std::vector<uint64_t> pages, std::vector<uint64_t> written)
      : pages_(std::move(pages)), written_(std::move(written)) {}

 protected:
  kj::Promise<void> recordedWorkingSet(RecordedWorkingSetContext context) override {
    auto results = context.getResults();
    auto pages = results.initPages(static_cast<unsigned>(pages_.size()));
    for (unsigned i = 0; i < pages_.size(); ++i) pages.set(i, pages_[i]);
    auto written = results.initWrittenPages(static_cast<unsigned>(written_.size()));
    for (unsigned i = 0; i < written_.size(); ++i) written.set(i, written_[i]);
    return kj::READY_NOW;
  }

 private:
  std::vector<uint64_t> pages_, written_;
};

class SaveWorkingSetTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = ::testing::TempDir() + "/save-working-set-" + std::to_string(::getpid()) + "-" +
           ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::filesystem::remove_all(dir_);
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  // Runs saveTemplateWorkingSet against a fork that answers `pages` and `written`; returns
  // what it printed.
  std::string save(std::vector<uint64_t> pages, std::vector<uint64_t> written) {
    std::string socket = dir_ + "/fork.sock";
    std::atomic<bool> listening = false, done = false;
    std::thread fork([&] {
      auto io = kj::setupAsyncIo();
      auto listener = rpc::listenUnix(io, socket);
      capnp::TwoPartyServer server(kj::heap<FakeFork>(pages, written));
      auto serving = server.listenCapStreamReceiver(*listener, rpc::kMaxFdsPerMessage);
      listening = true;
      while (!done) io.provider->getTimer().afterDelay(5 * kj::MILLISECONDS).wait(io.waitScope);
    });
    while (!listening) std::this_thread::sleep_for(1ms);
    std::ostringstream err;
    saveTemplateWorkingSet(dir_, kMemory, "fork-0000abcd", socket, err);
    done = true;
    fork.join();
    return err.str();
  }

  std::string file() const { return dir_ + "/" + vmm::snapshot::kWorkingSetFile; }

  static constexpr uint64_t kMemory = 64 << 20;
  std::string dir_;
};

TEST_F(SaveWorkingSetTest, AForksRecordIsWrittenIntoTheTemplate) {
  auto said = save({0x1000, 0x2000, 0x9000}, {0x2000});
  EXPECT_NE(said.find("saved the working set fork fork-0000abcd recorded (3 pages, 1 written)"),
            std::string::npos) << said;
  auto read = vmm::snapshot::readWorkingSetFile(file(), kMemory);
  EXPECT_EQ(read.pages, (std::vector<uint64_t>{0x1000, 0x2000, 0x9000}));
  EXPECT_EQ(read.written, std::vector<uint64_t>{0x2000});
}

TEST_F(SaveWorkingSetTest, AHostileRecordIsRefusedWithAWarningAndWritesNothing) {
  for (auto [pages, written, reason] :
       std::vector<std::tuple<std::vector<uint64_t>, std::vector<uint64_t>, std::string>>{
           {{0x1234}, {}, "not 4 KiB aligned"},
           {{kMemory + 0x1000}, {}, "beyond the guest's 64 MiB"},
           {{0x3000, 0x1000}, {}, "not in increasing order"},
           {{0x1000}, {0x5000}, "not in the working set"}}) {
    auto said = save(pages, written);
    EXPECT_NE(said.find("warning: the template's working set was not saved"), std::string::npos) << said;
    EXPECT_NE(said.find(reason), std::string::npos) << said;
    EXPECT_FALSE(std::filesystem::exists(file())) << reason;
  }
}

TEST_F(SaveWorkingSetTest, AnEmptyRecordIsNotSaved) {
  auto said = save({}, {});
  EXPECT_NE(said.find("recorded an empty working set: none saved"),
            std::string::npos) << said;
  EXPECT_FALSE(std::filesystem::exists(file()));
}

TEST_F(SaveWorkingSetTest, AFileInPlaceIsKeptAndNothingIsSaid) {
  ASSERT_TRUE(vmm::snapshot::linkWorkingSetFile(AT_FDCWD, dir_, {.pages = {0x4000}}, "first"));
  EXPECT_EQ(save({0x1000}, {}), "");
  EXPECT_EQ(vmm::snapshot::readWorkingSetFile(file(), kMemory).pages, std::vector<uint64_t>{0x4000});
}

TEST_F(SaveWorkingSetTest, AForkThatIsGoneIsAWarning) {
  std::ostringstream err;
  saveTemplateWorkingSet(dir_, kMemory, "fork-0000abcd", dir_ + "/nobody.sock", err);
  EXPECT_NE(err.str().find("warning: the template's working set was not saved"), std::string::npos)
      << err.str();
  EXPECT_FALSE(std::filesystem::exists(file()));
}

}  // namespace
}  // namespace clonevm::cli
