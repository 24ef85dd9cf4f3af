// QEMU as the front-end of clone-block: qemu-system-x86_64 (TCG, no KVM) with shared memfd
// memory and vhost-user-blk-pci boots the test guest, whose Linux virtio_blk driver reads,
// writes, discards, makes and checks an ext4 file system on the disk clone-block serves.
// Checked from both sides: the guest's shell and the host's image file.

#include <sys/stat.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/support/guest_session.h"
#include "tests/support/socket_daemon.h"

namespace clonevm::block {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using e2e::GuestSession;
using BlockProcess = e2e::SocketDaemon;

constexpr char kReady[] = "CLONE-GUEST-READY";
constexpr char kHostPattern[] = "CLONE-HOST-WROTE-THIS-BEFORE-BOOT";
constexpr uint64_t kSectors = 131072;  // 64 MiB

fs::path scratch(const std::string& name) {
  return e2e::freshScratchDir("integration-block/" + name);
}

int shell(const std::string& command) {
  int rc = std::system(command.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::vector<std::string> qemuArgs(const std::string& socket) {
  return {"-M", "q35", "-accel", "tcg", "-cpu", "max", "-m", "512", "-smp", "2",
          "-object", "memory-backend-memfd,id=mem,size=512M,share=on",
          "-machine", "memory-backend=mem",
          "-chardev", fmt::format("socket,id=blk0,path={}", socket),
          "-device", "vhost-user-blk-pci,chardev=blk0,num-queues=2",
          "-kernel", e2e::guestKernel(), "-initrd", e2e::guestInitrd(),
          "-append", "console=ttyS0 panic=-1 quiet",
          "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"};
}

// raw: the image is a raw file. qcow2: a qcow2 overlay (qemu-img) over a raw base.
class BlockQemuTest : public ::testing::TestWithParam<std::string> {};

TEST_P(BlockQemuTest, LinuxDrivesTheDiskAndTheHostSeesItsWrites) {
  ASSERT_TRUE(fs::exists("/usr/bin/qemu-system-x86_64")) << "scripts/install-deps.sh lab";
  ASSERT_TRUE(fs::exists(e2e::guestKernel())) << "make guest";
  const bool qcow2 = GetParam() == "qcow2";
  fs::path dir = scratch(GetParam());
  fs::path base = dir / "base.raw";
  {
    std::ofstream out(base, std::ios::binary);
    out << kHostPattern;
  }
  fs::resize_file(base, kSectors * 512);
  fs::path image = base;
  if (qcow2) {
    image = dir / "disk.qcow2";
    ASSERT_EQ(shell(fmt::format("qemu-img create -q -f qcow2 -b {} -F raw {}", base.string(),
                                image.string())), 0);
  }
  std::string baseBefore = e2e::readFileAt(base, 0, kSectors * 512);
  std::string socket = fmt::format("/tmp/clone-block-qemu-{}-{}.sock", GetParam(), ::getpid());
  BlockProcess process(e2e::buildBin("clone-block"),
                       {"--socket-path", socket, "--image", image.string(), "--format",
                        qcow2 ? "qcow2" : "raw", "--queues", "2", "--serial", "qemu-disk-0"},
                       dir / "clone-block.log", socket);
  ASSERT_TRUE(process.waitReady()) << process.log();
  {
    GuestSession vm("/usr/bin/qemu-system-x86_64", qemuArgs(socket));
    ASSERT_TRUE(vm.expect(kReady, 400s)) << vm.output() << process.log();
    auto run = [&](const std::string& command, std::chrono::milliseconds timeout = 120s) {
      auto out = vm.run(command, timeout);
      EXPECT_TRUE(out) << command << "\n" << vm.output() << process.log();
      return out.value_or("<no answer>");
    };
    EXPECT_EQ(run("cat /sys/block/vda/size"), std::to_string(kSectors));
    EXPECT_EQ(run("cat /sys/block/vda/serial"), "qemu-disk-0");
    EXPECT_EQ(run("ls /sys/block/vda/mq | wc -l"), "2") << "two queues (MQ)";
    EXPECT_EQ(run("cat /sys/block/vda/ro"), "0");
    EXPECT_EQ(run("head -c 33 /dev/vda; echo"), kHostPattern);

    // A marker at sector 8 and 1 MiB of a pattern at 1 MiB, read back uncached.
    EXPECT_EQ(run("printf GUEST-WROTE-THIS | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null"
                  " && yes CLONE | head -c 1048576 | dd of=/dev/vda bs=65536 seek=16"
                  " iflag=fullblock oflag=direct 2>/dev/null && sync && echo rc=$?"),
              "rc=0");
    EXPECT_EQ(run("dd if=/dev/vda bs=65536 skip=16 count=16 iflag=direct 2>/dev/null | md5sum"
                  " | cut -c1-32; yes CLONE | head -c 1048576 | md5sum | cut -c1-32")
                  .substr(0, 32),
              run("yes CLONE | head -c 1048576 | md5sum | cut -c1-32"));
    if (!qcow2) {
      // The raw file has the guest's data now (the host reads it while the VM runs).
      EXPECT_EQ(e2e::readFileAt(image, 8 * 512, 16), "GUEST-WROTE-THIS");
      EXPECT_EQ(e2e::readFileAt(image, 1 << 20, 6), "CLONE\n");
    }
    // Discard of the pattern: the driver sends DISCARD, the device answers OK.
    EXPECT_EQ(run("cat /sys/block/vda/queue/discard_max_bytes"), "1073741824");
    EXPECT_EQ(run("blkdiscard -o 1048576 -l 1048576 /dev/vda && echo rc=$?"), "rc=0");

    // An ext4 file system made, written, and checked in the guest.
    EXPECT_EQ(run("mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && "
                  "echo hello-from-the-guest > /mnt/hello.txt && "
                  "dd if=/dev/urandom of=/mnt/big bs=1M count=8 2>/dev/null && "
                  "md5sum /mnt/big | cut -c1-32 > /mnt/big.md5 && fstrim /mnt; "
                  "umount /mnt && e2fsck -fn /dev/vda >/dev/null 2>&1; echo fsck=$?",
                  300s),
              "fsck=0");
    EXPECT_EQ(run("mount /dev/vda /mnt && echo $(cat /mnt/hello.txt) $("
                  "md5sum /mnt/big | cut -c1-32 | cmp -s - /mnt/big.md5 && echo same); umount /mnt"),
              "hello-from-the-guest same");
    vm.sendLine("poweroff -f");
    auto code = vm.waitExit(60s);
    EXPECT_TRUE(code) << vm.output();
  }
  // The host checks the file system the guest made, in the image clone-block wrote.
  fs::path rawView = image;
  if (qcow2) {
    EXPECT_EQ(shell(fmt::format("qemu-img check -q {}", image.string())), 0);
    rawView = dir / "converted.raw";
    ASSERT_EQ(shell(fmt::format("qemu-img convert -f qcow2 -O raw {} {}", image.string(),
                                rawView.string())), 0);
    EXPECT_TRUE(e2e::readFileAt(base, 0, kSectors * 512) == baseBefore) << "the backing file changed";
  }
  EXPECT_EQ(shell(fmt::format("e2fsck -fn {} > {}/host-fsck.log 2>&1", rawView.string(),
                              dir.string())), 0);
  EXPECT_EQ(shell(fmt::format("debugfs -R 'cat /hello.txt' {} 2>/dev/null | grep -qx "
                              "hello-from-the-guest", rawView.string())), 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, BlockQemuTest, ::testing::Values("raw", "qcow2"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace clonevm::block
