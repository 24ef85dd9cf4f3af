// Issue 4: the core serves virtio-blk and virtio-fs through third-party vhost-user back-ends,
// qemu-storage-daemon and QEMU's virtiofsd (both from Debian's qemu-system-common), under
// real KVM. The guest is Debian's cloud kernel with the test initramfs; everything it does
// is checked from both sides (the guest's shell and the host's files).
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <fstream>
#include <sstream>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/support/guest_session.h"
#include "tests/support/socket_daemon.h"

namespace clonevm::e2e {
namespace {

namespace fs = std::filesystem;

constexpr char kReady[] = "CLONE-GUEST-READY";
constexpr char kVirtiofsd[] = "/usr/lib/qemu/virtiofsd";

// The build directory these tests belong to (buildBin gives <build>/bin/<program>).
fs::path buildDir() { return fs::path(buildBin("x")).parent_path().parent_path(); }

// Scratch space for images and shared directories: under the build dir (O_DIRECT works
// there in the lab, and a failed test leaves its files to look at).
fs::path scratch(const std::string& test) {
  fs::path dir = buildDir() / "e2e-vhost-user" / test;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Sockets in /tmp: unix socket paths are limited to 107 bytes.
std::string socketPath(const std::string& name) {
  return fmt::format("/tmp/clone-e2e-{}-{}.sock", name, ::getpid());
}

// A back-end process: started with its output in a log file, killed at the end.
using Daemon = SocketDaemon;

std::unique_ptr<Daemon> storageDaemon(const fs::path& image, const std::string& socket,
                                      const fs::path& log, int queues = 1) {
  return std::make_unique<Daemon>(kQemuStorageDaemon, storageDaemonArgs(image, socket, queues),
                                  log, socket);
}

// A raw image of `sectors` 512-byte sectors; sector 0 starts with `pattern`.
void makeImage(const fs::path& path, uint64_t sectors, const std::string& pattern) {
  std::ofstream out(path, std::ios::binary);
  out << pattern;
  out.close();
  fs::resize_file(path, sectors * 512);
}

std::vector<std::string> runArgs(std::vector<std::string> extra) {
  std::vector<std::string> args{"run", "--no-jail", "--kernel", guestKernel(), "--initrd",
                                guestInitrd(), "--cmdline", "console=ttyS0 panic=-1 quiet"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

// CLONE_E2E_VERBOSE=1 prints each VM's console and the core's log after the test.
void powerOff(GuestSession& vm) {
  vm.sendLine("poweroff -f");
  auto code = vm.waitExit(30s);
  if (const char* verbose = std::getenv("CLONE_E2E_VERBOSE"); verbose && *verbose == '1') {
    std::cerr << "---- console and log of " << ::testing::UnitTest::GetInstance()->current_test_info()->name()
              << "\n" << vm.output() << "\n----\n";
  }
  ASSERT_TRUE(code) << "clone run did not exit after poweroff\n" << vm.output();
  EXPECT_EQ(*code, 0) << vm.output();
}

TEST(VhostUserBlkTest, GuestReadsHostDataAndHostSeesGuestWrites) {
  fs::path dir = scratch("blk");
  fs::path image = dir / "disk.raw";
  makeImage(image, 131072, "CLONE-HOST-WROTE-THIS-BEFORE-BOOT");
  std::string socket = socketPath("blk");
  auto daemon = storageDaemon(image, socket, dir / "qsd.log");
  ASSERT_TRUE(daemon->waitReady()) << daemon->log();
  {
    GuestSession vm(buildBin("clone"), runArgs({"--vhost-user-blk", socket}));
    ASSERT_TRUE(vm.expect(kReady)) << vm.output();
    auto size = vm.run("cat /sys/block/vda/size");
    ASSERT_TRUE(size) << vm.output();
    EXPECT_EQ(*size, "131072");
    auto head = vm.run("head -c 33 /dev/vda; echo");
    ASSERT_TRUE(head) << vm.output();
    EXPECT_EQ(*head, "CLONE-HOST-WROTE-THIS-BEFORE-BOOT");
    // The device is virtio-pci modern over our transport, driven by virtio_blk.
    auto driver = vm.run("basename $(readlink /sys/block/vda/device/driver)");
    ASSERT_TRUE(driver) << vm.output();
    EXPECT_EQ(*driver, "virtio_blk");
    // Write 1 MiB of a pattern at 1 MiB, plus a marker at sector 8, and flush.
    auto wrote = vm.run(
        "printf 'GUEST-WROTE-THIS' | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null && "
        "yes CLONE | head -c 1048576 | dd of=/dev/vda bs=65536 seek=16 iflag=fullblock 2>/dev/null && "
        "sync && "
        "echo rc=$?");
    ASSERT_TRUE(wrote) << vm.output();
    EXPECT_EQ(*wrote, "rc=0");
    // Read back through the guest after dropping its cache: the data went to the back-end.
    auto back = vm.run("echo 3 > /proc/sys/vm/drop_caches; "
                       "dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | md5sum "
                       "| cut -c1-32; yes CLONE | head -c 1048576 | md5sum | cut -c1-32");
    ASSERT_TRUE(back) << vm.output();
    auto newline = back->find('\n');
    ASSERT_NE(newline, std::string::npos) << *back;
    EXPECT_EQ(back->substr(0, 32), back->substr(newline + 1, 32)) << *back;
    powerOff(vm);
    EXPECT_EQ(vm.output().find("disconnected"), std::string::npos) << vm.output();
    // Same hash on the host.
    std::string written = readFileAt(image, 1 << 20, 1 << 20);
    std::string expected;
    while (expected.size() < (1u << 20)) expected += "CLONE\n";
    expected.resize(1 << 20);
    EXPECT_TRUE(written == expected) << "1 MiB at offset 1 MiB differs from the guest's pattern";
  }
  daemon.reset();
  EXPECT_EQ(readFileAt(image, 8 * 512, 16), "GUEST-WROTE-THIS");
}

TEST(VhostUserBlkTest, TwoQueuesOnTwoVcpus) {
  fs::path dir = scratch("blk-mq");
  fs::path image = dir / "disk.raw";
  makeImage(image, 65536, "MQ");
  std::string socket = socketPath("blk-mq");
  auto daemon = storageDaemon(image, socket, dir / "qsd.log", 2);
  ASSERT_TRUE(daemon->waitReady()) << daemon->log();
  GuestSession vm(buildBin("clone"),
                  runArgs({"--vcpus", "2", "--vhost-user-blk", socket + ",queues=2"}));
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  auto queues = vm.run("ls /sys/block/vda/mq | wc -l");
  ASSERT_TRUE(queues) << vm.output();
  EXPECT_EQ(*queues, "2");
  // I/O from each CPU (blk-mq maps CPU n to hardware queue n).
  auto io = vm.run("for c in 0 1; do taskset $((c+1)) dd if=/dev/vda of=/dev/null bs=4096 "
                   "count=256 skip=$((c*256)) iflag=direct 2>/dev/null || echo fail$c; done; "
                   "echo done");
  ASSERT_TRUE(io) << vm.output();
  EXPECT_EQ(*io, "done");
  // Each queue has its own MSI-X vector.
  auto vectors = vm.run("grep -c 'virtio.-req' /proc/interrupts");
  ASSERT_TRUE(vectors) << vm.output();
  EXPECT_EQ(*vectors, "2");
  powerOff(vm);
}

TEST(VhostUserBlkTest, BackendKilledWhileTheVmRuns) {
  fs::path dir = scratch("blk-kill");
  fs::path image = dir / "disk.raw";
  makeImage(image, 65536, "STILL-HERE");
  std::string socket = socketPath("blk-kill");
  auto daemon = storageDaemon(image, socket, dir / "qsd.log");
  ASSERT_TRUE(daemon->waitReady()) << daemon->log();
  GuestSession vm(buildBin("clone"), runArgs({"--vhost-user-blk", socket}));
  ASSERT_TRUE(vm.expect(kReady)) << vm.output();
  auto head = vm.run("head -c 10 /dev/vda; echo");
  ASSERT_TRUE(head) << vm.output();
  EXPECT_EQ(*head, "STILL-HERE");
  daemon->stop(SIGKILL);
  // The core notices and says so, naming the back-end and the device.
  ASSERT_TRUE(vm.expect("vhost-user-blk backend " + socket +
                            " disconnected; device 00:01.0 is no longer served",
                        30s))
      << vm.output();
  // The VM lives on: its shell still answers.
  auto alive = vm.run("echo alive-$((40+2))");
  ASSERT_TRUE(alive) << vm.output();
  EXPECT_EQ(*alive, "alive-42");
  powerOff(vm);
}

TEST(VhostUserFsTest, GuestMountsTheTagReadsAndWrites) {
  fs::path dir = scratch("fs");
  fs::path share = dir / "share";
  fs::create_directories(share);
  std::ofstream(share / "hello.txt") << "hello from the host\n";
  std::string socket = socketPath("fs");
  Daemon daemon(kVirtiofsd,
                {"--socket-path=" + socket, "-o", "source=" + share.string(), "-o", "cache=none",
                 "-o", "sandbox=chroot"},
                dir / "virtiofsd.log", socket);
  ASSERT_TRUE(daemon.waitReady()) << daemon.log();
  {
    GuestSession vm(buildBin("clone"), runArgs({"--vhost-user-fs", socket + ":hostshare"}));
    ASSERT_TRUE(vm.expect(kReady)) << vm.output();
    auto mounted = vm.run("mkdir -p /mnt && mount -t virtiofs hostshare /mnt && echo mounted");
    ASSERT_TRUE(mounted) << vm.output();
    ASSERT_EQ(*mounted, "mounted") << vm.output() << daemon.log();
    auto hello = vm.run("cat /mnt/hello.txt");
    ASSERT_TRUE(hello) << vm.output();
    EXPECT_EQ(*hello, "hello from the host");
    auto wrote = vm.run("echo written by the guest > /mnt/guest.txt && mkdir /mnt/sub && "
                        "ls /mnt | tr '\\n' ' '; umount /mnt && echo unmounted");
    ASSERT_TRUE(wrote) << vm.output();
    EXPECT_EQ(*wrote, "guest.txt hello.txt sub unmounted");
    powerOff(vm);
  }
  std::ifstream in(share / "guest.txt");
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "written by the guest");
  EXPECT_TRUE(fs::is_directory(share / "sub"));
}

// --- Bad input: one clear line and exit code 1.

struct Outcome {
  int code;
  std::string output;
};

Outcome runClone(std::vector<std::string> args) {
  GuestSession process(buildBin("clone"), args);
  process.closeInput();
  auto code = process.waitExit(60s);
  return {code.value_or(-1), process.output()};
}

void expectOneClearLine(const Outcome& outcome, const std::string& mustContain) {
  EXPECT_EQ(outcome.code, 1) << outcome.output;
  EXPECT_NE(outcome.output.find(mustContain), std::string::npos) << outcome.output;
  std::istringstream lines(outcome.output);
  int errorLines = 0;
  for (std::string text; std::getline(lines, text);) {
    if (text.rfind("clone: warning: --no-jail", 0) != 0) ++errorLines;
  }
  EXPECT_EQ(errorLines, 1) << outcome.output;
}

TEST(VhostUserBadInputTest, MissingSocket) {
  std::string socket = socketPath("missing");
  ::unlink(socket.c_str());
  expectOneClearLine(runClone(runArgs({"--vhost-user-blk", socket})),
                     "--vhost-user-blk " + socket + ": connect to vhost-user socket " + socket +
                         ": No such file or directory");
}

TEST(VhostUserBadInputTest, BackendThatHangsUpDuringNegotiation) {
  // A listener that accepts and closes at once: not a vhost-user back-end.
  std::string socket = socketPath("hangup");
  ::unlink(socket.c_str());
  int listener = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, socket.c_str(), sizeof(address.sun_path) - 1);
  ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(::listen(listener, 4), 0);
  std::atomic<bool> done{false};
  std::thread acceptor([&] {
    while (!done) {
      int fd = ::accept(listener, nullptr, nullptr);
      if (fd >= 0) ::close(fd);
    }
  });
  expectOneClearLine(runClone(runArgs({"--vhost-user-fs", socket + ":tag"})),
                     "--vhost-user-fs " + socket + ": vhost-user backend " + socket +
                         " disconnected during GET_FEATURES");
  done = true;
  ::shutdown(listener, SHUT_RDWR);
  ::close(listener);
  acceptor.join();
  ::unlink(socket.c_str());
}

TEST(VhostUserBadInputTest, BadTag) {
  expectOneClearLine(runClone(runArgs({"--vhost-user-fs", "/tmp/x.sock:" + std::string(40, 't')})),
                     "must be 1 to 36 bytes");
  expectOneClearLine(runClone(runArgs({"--vhost-user-fs", "/tmp/x.sock"})),
                     "expected SOCKET:TAG");
  expectOneClearLine(runClone(runArgs({"--vhost-user-blk", "/tmp/x.sock,queues=0"})),
                     "queues=0 is not a number from 1 to 64");
}

}  // namespace
}  // namespace clonevm::e2e
