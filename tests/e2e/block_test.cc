// Issue 5: `clone run --disk` serves disks through clone-block, under real KVM (the lab).
// The guest makes and checks ext4 on a qcow2 disk over a raw backing file; overlays and
// read-only disks leave the base untouched; the device processes and the runtime directory
// are gone when the VM exits.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "tests/support/guest_session.h"

namespace clonevm::e2e {
namespace {

namespace fs = std::filesystem;

constexpr char kReady[] = "CLONE-GUEST-READY";
constexpr char kHostPattern[] = "CLONE-HOST-WROTE-THIS-BEFORE-BOOT";
constexpr uint64_t kSectors = 131072;  // 64 MiB

fs::path buildDir() { return fs::path(buildBin("x")).parent_path().parent_path(); }

fs::path scratch(const std::string& test) {
  fs::path dir = buildDir() / "e2e-block" / test;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string readFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

int shell(const std::string& command) {
  int rc = std::system(command.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

void makeBase(const fs::path& path) {
  {
    std::ofstream out(path, std::ios::binary);
    out << kHostPattern;
  }
  fs::resize_file(path, kSectors * 512);
}

// The runtime directory `clone run` makes lives in XDG_RUNTIME_DIR; point it at a test
// directory so the test can see it appear and go. It is under /tmp: unix sockets cannot be
// bound on the lab's shared tree (9p), and socket paths are limited to 107 bytes.
struct RuntimeDir {
  explicit RuntimeDir(const fs::path& dir)
      : path(fmt::format("/tmp/clone-e2e-block-{}-{}", ::getpid(), dir.filename().string())) {
    fs::remove_all(path);
    fs::create_directories(path);
    ::setenv("XDG_RUNTIME_DIR", path.c_str(), 1);
  }
  ~RuntimeDir() { fs::remove_all(path); }
  bool empty() const { return fs::is_empty(path); }
  fs::path path;
};

std::vector<std::string> runArgs(std::vector<std::string> extra) {
  std::vector<std::string> args{"run", "--no-jail", "--kernel", guestKernel(), "--initrd",
                                guestInitrd(), "--cmdline", "console=ttyS0 panic=-1 quiet"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

std::string run(GuestSession& vm, const std::string& command,
                std::chrono::milliseconds timeout = 120s) {
  auto out = vm.run(command, timeout);
  EXPECT_TRUE(out) << command << "\n" << vm.output();
  return out.value_or("<no answer>");
}

void powerOff(GuestSession& vm) {
  vm.sendLine("poweroff -f");
  auto code = vm.waitExit(30s);
  ASSERT_TRUE(code) << "clone run did not exit after poweroff\n" << vm.output();
  EXPECT_EQ(*code, 0) << vm.output();
}

TEST(BlockTest, Ext4OnQcow2OverRawBackingFile) {
  fs::path dir = scratch("qcow2");
  RuntimeDir runtime(dir);
  fs::path base = dir / "base.raw";
  fs::path disk = dir / "disk.qcow2";
  makeBase(base);
  ASSERT_EQ(shell(fmt::format("qemu-img create -q -f qcow2 -b {} -F raw {}", base.string(),
                              disk.string())), 0);
  std::string baseBefore = readFile(base);
  {
    GuestSession vm(buildBin("clone"), runArgs({"--disk", disk.string() + ",format=qcow2"}));
    ASSERT_TRUE(vm.expect(kReady)) << vm.output();
    EXPECT_FALSE(runtime.empty()) << "the disk's socket lives in the runtime dir";
    EXPECT_EQ(run(vm, "cat /sys/block/vda/size"), std::to_string(kSectors));
    EXPECT_EQ(run(vm, "cat /sys/block/vda/serial"), "clone-disk0");
    EXPECT_EQ(run(vm, "head -c 33 /dev/vda; echo"), kHostPattern) << "read through the backing file";
    EXPECT_EQ(run(vm, "mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount /dev/vda /mnt && "
                      "mkdir /mnt/d && for i in 1 2 3 4 5 6 7 8; do "
                      "dd if=/dev/urandom of=/mnt/d/f$i bs=64k count=$i 2>/dev/null; done && "
                      "echo hello-qcow2 > /mnt/hello.txt && "
                      "md5sum /mnt/d/* > /mnt/sums && rm /mnt/d/f3 && fstrim /mnt; "
                      "umount /mnt && e2fsck -fn /dev/vda > /tmp/fsck.log 2>&1; echo fsck=$?",
                  180s),
              "fsck=0");
    EXPECT_EQ(run(vm, "echo 3 > /proc/sys/vm/drop_caches; mount /dev/vda /mnt && "
                      "echo $(cat /mnt/hello.txt) $(grep -v f3 /mnt/sums | md5sum -c -s && "
                      "echo sums-ok); umount /mnt"),
              "hello-qcow2 sums-ok");
    powerOff(vm);
  }
  EXPECT_TRUE(readFile(base) == baseBefore) << "the backing file was written";
  EXPECT_TRUE(runtime.empty()) << "runtime dir left behind";
  EXPECT_EQ(shell(fmt::format("qemu-img check -q {}", disk.string())), 0);
  fs::path converted = dir / "converted.raw";
  ASSERT_EQ(shell(fmt::format("qemu-img convert -f qcow2 -O raw {} {}", disk.string(),
                              converted.string())), 0);
  EXPECT_EQ(shell(fmt::format("e2fsck -fn {} > {}/host-fsck.log 2>&1", converted.string(),
                              dir.string())), 0);
}

TEST(BlockTest, OverlayKeepsTheBaseAndIsDeletedWithTheVm) {
  fs::path dir = scratch("overlay");
  RuntimeDir runtime(dir);
  fs::path base = dir / "base.raw";
  makeBase(base);
  std::string baseBefore = readFile(base);
  {
    GuestSession vm(buildBin("clone"), runArgs({"--disk", base.string() + ",overlay"}));
    ASSERT_TRUE(vm.expect(kReady)) << vm.output();
    EXPECT_EQ(run(vm, "ls " + runtime.path.string() + " 2>/dev/null | wc -l"), "0")
        << "the guest does not see host paths (sanity)";
    EXPECT_EQ(run(vm, "head -c 33 /dev/vda; echo"), kHostPattern);
    EXPECT_EQ(run(vm, "printf GUEST-WROTE-THIS | dd of=/dev/vda bs=512 seek=0 conv=notrunc "
                      "2>/dev/null && sync && echo 3 > /proc/sys/vm/drop_caches && "
                      "head -c 16 /dev/vda; echo"),
              "GUEST-WROTE-THIS");
    bool overlayExists = false;
    for (const auto& entry : fs::recursive_directory_iterator(runtime.path)) {
      if (entry.path().extension() == ".qcow2") overlayExists = true;
    }
    EXPECT_TRUE(overlayExists) << "the overlay is in the runtime dir";
    powerOff(vm);
  }
  EXPECT_TRUE(readFile(base) == baseBefore) << "the base was written";
  EXPECT_TRUE(runtime.empty()) << "overlay or socket left behind";
}

TEST(BlockTest, ReadOnlyDiskRefusesWrites) {
  fs::path dir = scratch("readonly");
  RuntimeDir runtime(dir);
  fs::path base = dir / "base.raw";
  makeBase(base);
  std::string baseBefore = readFile(base);
  {
    GuestSession vm(buildBin("clone"), runArgs({"--disk", base.string() + ",readonly,format=raw"}));
    ASSERT_TRUE(vm.expect(kReady)) << vm.output();
    EXPECT_EQ(run(vm, "cat /sys/block/vda/ro"), "1");
    EXPECT_EQ(run(vm, "head -c 33 /dev/vda; echo"), kHostPattern);
    EXPECT_NE(run(vm, "printf X | dd of=/dev/vda conv=notrunc 2>/dev/null; echo rc=$?"), "rc=0");
    powerOff(vm);
  }
  EXPECT_TRUE(readFile(base) == baseBefore);
  EXPECT_TRUE(runtime.empty());
}

TEST(BlockTest, ADiskThatCannotBeOpenedStopsTheRunBeforeTheVm) {
  fs::path dir = scratch("missing");
  RuntimeDir runtime(dir);
  GuestSession vm(buildBin("clone"), runArgs({"--disk", (dir / "missing.img").string()}));
  auto code = vm.waitExit(30s);
  ASSERT_TRUE(code) << vm.output();
  EXPECT_EQ(*code, 1) << vm.output();
  EXPECT_NE(vm.output().find("exited with code 1 before it listened"), std::string::npos)
      << vm.output();
  EXPECT_TRUE(runtime.empty());
}

}  // namespace
}  // namespace clonevm::e2e
