// Issue 6: `clone run` jails clone-vmm by default. The jailed VM boots and does I/O, and the
// real clone-vmm process is locked down (checked from outside through /proc); a jailed process
// killed for a forbidden syscall does not harm the VM.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>

#include "tests/support/guest_session.h"

namespace clonevm::e2e {
namespace {

namespace fs = std::filesystem;
constexpr char kReady[] = "CLONE-GUEST-READY";
constexpr uint64_t kMemoryMib = 256;

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string statusField(pid_t pid, const std::string& key) {
  std::istringstream status(readFile("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(status, line);) {
    if (line.starts_with(key + ":")) {
      auto value = line.substr(key.size() + 1);
      auto start = value.find_first_not_of(" \t");
      return start == std::string::npos ? "" : value.substr(start);
    }
  }
  return "<missing>";
}

// The process named `comm` whose command line holds `marker` (a unique socket path).
pid_t findProcess(const std::string& comm, const std::string& marker) {
  for (const auto& entry : fs::directory_iterator("/proc")) {
    auto name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    if (readFile(entry.path().string() + "/comm") != comm + "\n") continue;
    std::string cmdline = readFile(entry.path().string() + "/cmdline");
    if (cmdline.find(marker) != std::string::npos) return std::stoi(name);
  }
  return -1;
}

pid_t findVmm(const std::string& marker) { return findProcess("clone-vmm", marker); }

std::string ns(const std::string& pid, const std::string& name) {
  std::error_code error;
  return fs::read_symlink("/proc/" + pid + "/ns/" + name, error).string();
}

std::string listDir(const std::string& path) {
  std::vector<std::string> names;
  std::error_code error;
  for (const auto& entry : fs::directory_iterator(path, error)) names.push_back(entry.path().filename());
  std::sort(names.begin(), names.end());
  std::string joined;
  for (const auto& name : names) joined += " " + name;
  return joined;
}

std::string topLevel(const std::string& path) { return (++fs::path(path).begin())->string(); }

// What every jailed Clone process shows from outside: its own seccomp filter, no privileges,
// its own namespaces, and a cgroup with pids.max (and memory.max when `memoryMax` is given).
void expectLockedDown(pid_t pid, const std::string& memoryMax) {
  std::string p = std::to_string(pid);
  SCOPED_TRACE(readFile("/proc/" + p + "/comm") + " pid " + p);
  EXPECT_EQ(statusField(pid, "Seccomp"), "2");
  EXPECT_EQ(statusField(pid, "NoNewPrivs"), "1");
  EXPECT_EQ(statusField(pid, "CapEff"), "0000000000000000");
  EXPECT_EQ(statusField(pid, "CapPrm"), "0000000000000000");
  EXPECT_EQ(statusField(pid, "CapBnd"), "0000000000000000");
  EXPECT_EQ(statusField(pid, "NSpid"), p + "\t1");
  for (const char* name : {"mnt", "pid", "net", "ipc", "uts", "cgroup"}) {
    EXPECT_NE(ns(p, name), ns("self", name)) << name;
  }
  std::string cgroup = readFile("/proc/" + p + "/cgroup");
  ASSERT_TRUE(cgroup.starts_with("0::/clone/vm-")) << cgroup;
  std::string dir = "/sys/fs/cgroup" + cgroup.substr(3, cgroup.size() - 4);
  EXPECT_EQ(readFile(dir + "/pids.max"), "512\n");
  if (!memoryMax.empty()) {
    EXPECT_EQ(readFile(dir + "/memory.max"), memoryMax + "\n");
  }
}

// The top-level names a jail's root holds: the libraries, /dev, /proc and the trees of `paths`.
std::string expectedRoot(const std::vector<std::string>& paths) {
  std::vector<std::string> expected{"dev", "etc", "proc", "usr"};
  for (const auto& path : paths) expected.push_back(topLevel(path));
  for (const char* link : {"lib", "lib64"}) {
    if (fs::exists(std::string("/") + link)) expected.push_back(link);
  }
  std::sort(expected.begin(), expected.end());
  expected.erase(std::unique(expected.begin(), expected.end()), expected.end());
  std::string joined;
  for (const auto& name : expected) joined += " " + name;
  return joined;
}

class JailedVm : public ::testing::Test {
 protected:
  void SetUp() override {
    // Not under the build dir: the lab's tree is 9p, where unix sockets cannot be bound.
    dir_ = fs::temp_directory_path() / ("jail-e2e-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    socket_ = (dir_ / "api.sock").string();
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::string> runArgs() {
    return {"run", "--kernel", guestKernel(), "--initrd", guestInitrd(), "--cmdline",
            "console=ttyS0 panic=-1 quiet", "--mem-mb", std::to_string(kMemoryMib),
            "--api-socket", socket_};
  }

  fs::path dir_;
  std::string socket_;
};

TEST_F(JailedVm, BootsDoesIoAndTheCoreIsLockedDown) {
  GuestSession vm(buildBin("clone"), runArgs());
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  auto io = vm.run("dd if=/dev/urandom of=/tmp/f bs=1k count=512 2>/dev/null; sync; wc -c < /tmp/f");
  ASSERT_TRUE(io) << vm.output();
  EXPECT_EQ(*io, "524288");
  auto answer = vm.run("echo $((6*7))");
  ASSERT_TRUE(answer) << vm.output();
  EXPECT_EQ(*answer, "42");

  pid_t pid = findVmm(socket_);
  ASSERT_GT(pid, 0) << "no clone-vmm process with " << socket_;
  std::string p = std::to_string(pid);
  // No capability (/dev/kvm is opened by path, its memfd and sockets are its own), its own
  // namespaces, and the cgroup limits the jailed launcher asked for.
  expectLockedDown(pid, std::to_string((kMemoryMib + 256) << 20));
  std::string cgroup = readFile("/proc/" + p + "/cgroup");
  std::string dir = "/sys/fs/cgroup" + cgroup.substr(3, cgroup.size() - 4);
  // Its root holds the libraries, the tree its files live in, /dev and /proc; nothing else.
  // Not the API socket's directory: `clone run` binds the socket and the core inherits it.
  std::vector<std::string> expected{"dev", "etc", "proc", "usr", topLevel(guestKernel()),
                                    topLevel(buildBin("clone-vmm"))};
  for (const char* link : {"lib", "lib64"}) {
    if (fs::exists(std::string("/") + link)) expected.push_back(link);
  }
  std::sort(expected.begin(), expected.end());
  expected.erase(std::unique(expected.begin(), expected.end()), expected.end());
  std::string joined;
  for (const auto& name : expected) joined += " " + name;
  EXPECT_EQ(listDir("/proc/" + p + "/root"), joined);
  // /dev/vhost-vsock is passed when the host has it (the guest agent's vsock).
  EXPECT_EQ(listDir("/proc/" + p + "/root/dev"),
            fs::exists("/dev/vhost-vsock") ? " kvm null urandom vhost-vsock zero"
                                           : " kvm null urandom zero");
  EXPECT_FALSE(fs::exists("/proc/" + p + "/root/etc/shadow"));
  EXPECT_FALSE(fs::exists("/proc/" + p + "/root" + dir_.string()))
      << "the API socket's directory is in the jail";

  // The API answers on the inherited socket, and a snapshot is written into a directory the
  // jail does not hold: `clone snapshot` sends it as an open fd.
  auto cli = [](const std::vector<std::string>& args) {
    GuestSession process(buildBin("clone"), args);
    process.closeInput();
    auto code = process.waitExit(std::chrono::seconds(120));
    return std::make_pair(code.value_or(-1), process.output());
  };
  auto [statusCode, status] = cli({"status", "--vm", socket_});
  EXPECT_EQ(statusCode, 0) << status;
  std::string templateDir = (dir_ / "template").string();
  auto [snapshotCode, snapshot] = cli({"snapshot", "--vm", socket_, "--output", templateDir});
  EXPECT_EQ(snapshotCode, 0) << snapshot;
  for (const char* file : {"memory", "state", "manifest.json"}) {
    EXPECT_TRUE(fs::exists(fs::path(templateDir) / file)) << file << "\n" << snapshot;
  }
  auto after = vm.run("echo $((7*6))");
  ASSERT_TRUE(after) << vm.output();
  EXPECT_EQ(*after, "42") << "the VM runs on after the snapshot";

  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
  EXPECT_FALSE(fs::exists(dir)) << "the jailer removes the VM's cgroup";
  EXPECT_FALSE(fs::exists(socket_)) << "clone run removes the API socket it bound";
}

TEST_F(JailedVm, AJailedProcessKilledForAForbiddenSyscallDoesNotHarmTheVm) {
  GuestSession vm(buildBin("clone"), runArgs());
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  // A stand-in for a device process of this VM (clone-block is not wired into `clone run` yet):
  // jailed with the block policy, it opens an AF_INET socket and is killed.
  GuestSession device(buildBin("clone-jailer"),
                      {"--id", "jail-e2e-probe", "--exec-file", CLONE_JAIL_PROBE, "--uid", "65534",
                       "--gid", "65534", "--", "block", "kill"});
  ASSERT_TRUE(device.expect("ready", std::chrono::seconds(30))) << device.output();
  device.sendLine("inet");
  EXPECT_EQ(device.waitExit(), 128 + SIGSYS) << device.output();
  auto answer = vm.run("echo still-$((40+2))");
  ASSERT_TRUE(answer) << vm.output();
  EXPECT_EQ(*answer, "still-42");
  pid_t pid = findVmm(socket_);
  ASSERT_GT(pid, 0);
  EXPECT_EQ(statusField(pid, "Seccomp"), "2");
  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
}

// `clone run --disk` jails clone-block beside clone-vmm: both are locked down, the block
// process sees only its image chain and its socket directory, and a process under the block
// policy killed for forbidden acts leaves the VM and its disk working.
TEST_F(JailedVm, BothProcessesOfAVmWithADiskAreLockedDown) {
  // A qcow2 over a raw base in another directory: the jail must show the whole chain.
  fs::create_directories(dir_ / "base");
  std::string base = (dir_ / "base" / "base.img").string();
  std::string top = (dir_ / "top.qcow2").string();
  { std::ofstream(base) << "JAIL-E2E-BASE"; }
  fs::resize_file(base, 64 << 20);
  ASSERT_EQ(std::system(("qemu-img create -q -f qcow2 -F raw -b " + base + " " + top).c_str()), 0);
  { std::ofstream(dir_ / "secret") << "not for the jail"; }
  std::string runtimeBase = (dir_ / "run").string();
  fs::create_directories(runtimeBase);
  ::setenv("XDG_RUNTIME_DIR", runtimeBase.c_str(), 1);
  auto args = runArgs();
  args.insert(args.end(), {"--disk", top});
  GuestSession vm(buildBin("clone"), args);
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  auto head = vm.run("head -c 13 /dev/vda; echo");
  ASSERT_TRUE(head) << vm.output();
  EXPECT_EQ(*head, "JAIL-E2E-BASE") << "read through the backing file";

  pid_t vmm = findVmm(socket_);
  ASSERT_GT(vmm, 0);
  expectLockedDown(vmm, std::to_string((kMemoryMib + 256) << 20));
  pid_t block = findProcess("clone-block", runtimeBase);
  ASSERT_GT(block, 0) << "no clone-block process with " << runtimeBase;
  expectLockedDown(block, "");
  std::string root = "/proc/" + std::to_string(block) + "/root";
  EXPECT_EQ(listDir(root), expectedRoot({buildBin("clone-block"), top, base, runtimeBase}));
  EXPECT_EQ(listDir(root + "/dev"), " null urandom zero") << "no /dev/kvm for a device process";
  EXPECT_TRUE(fs::exists(root + base)) << "the backing file is visible";
  EXPECT_TRUE(fs::exists(root + top));
  EXPECT_FALSE(fs::exists(root + (dir_ / "secret").string())) << "only the chain, not its directory";
  EXPECT_FALSE(fs::exists(root + socket_)) << "the core's API socket is not the block's";
  EXPECT_FALSE(fs::exists(root + "/etc/shadow"));

  // Forbidden acts under the block policy, in a jailed process of its own: each is killed.
  for (const char* act : {"inet", "ptrace", "exec", "shadow"}) {
    GuestSession probe(buildBin("clone-jailer"),
                       {"--id", std::string("jail-e2e-block-") + act, "--exec-file",
                        CLONE_JAIL_PROBE, "--uid", "65534", "--gid", "65534", "--", "block",
                        "kill"});
    ASSERT_TRUE(probe.expect("ready", std::chrono::seconds(30))) << probe.output();
    probe.sendLine(act);
    EXPECT_EQ(probe.waitExit(), 128 + SIGSYS) << act << "\n" << probe.output();
  }
  // The disk still works: write, drop the cache, read back through clone-block.
  auto io = vm.run("dd if=/dev/urandom of=/tmp/r bs=64k count=16 2>/dev/null && "
                   "dd if=/tmp/r of=/dev/vda bs=64k seek=1 conv=fsync 2>/dev/null && "
                   "echo 3 > /proc/sys/vm/drop_caches && "
                   "dd if=/dev/vda bs=64k skip=1 count=16 2>/dev/null | cmp - /tmp/r && echo io-ok",
                   std::chrono::seconds(120));
  ASSERT_TRUE(io) << vm.output();
  EXPECT_EQ(*io, "io-ok");
  EXPECT_EQ(statusField(block, "Seccomp"), "2") << "clone-block is still the one serving";
  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
  ::unsetenv("XDG_RUNTIME_DIR");
}

TEST_F(JailedVm, SeccompLogModeStillBoots) {
  auto args = runArgs();
  args.insert(args.end(), {"--seccomp", "log"});
  GuestSession vm(buildBin("clone"), args);
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  pid_t pid = findVmm(socket_);
  ASSERT_GT(pid, 0);
  EXPECT_EQ(statusField(pid, "Seccomp"), "2");
  vm.sendLine("poweroff -f");
  EXPECT_EQ(vm.waitExit(), 0) << vm.output();
}

TEST(JailedRunBadInputTest, AMissingKernelIsOneClearLine) {
  GuestSession run(buildBin("clone"), {"run", "--kernel", "/nonexistent/vmlinuz"});
  run.closeInput();
  auto code = run.waitExit(std::chrono::seconds(20));
  ASSERT_TRUE(code) << run.output();
  EXPECT_EQ(*code, 1) << run.output();
  EXPECT_EQ(run.output(),
            "clone-jailer: find jail path /nonexistent/vmlinuz: No such file or directory\n");
}

}  // namespace
}  // namespace clonevm::e2e
