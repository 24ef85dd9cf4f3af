#include "cli/jailed_launcher.h"

#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include <gtest/gtest.h>

#include "cli/vmm_process.h"
#include "common/error.h"

namespace clonevm::cli {
namespace {

bool hasPair(const std::vector<std::string>& args, const std::string& flag, const std::string& value) {
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == flag && args[i + 1] == value) return true;
  }
  return false;
}

TEST(VmmProcessSpecTest, NamesTheCoresFilesAbsoluteAndKvm) {
  RunOptions options;
  options.kernel = "vmlinuz";
  options.initrd = "/boot/initrd.img";
  options.apiSocket = "run/vm.sock";
  options.vhostUserBlk = {"disk.sock,queues=2"};
  options.memoryMib = 256;
  auto spec = vmmProcessSpec(options, {}, "/usr/bin/clone-vmm");
  auto cwd = std::filesystem::current_path().string();
  EXPECT_EQ(spec.kind, "vmm");
  EXPECT_EQ(spec.readPaths, (std::vector<std::string>{cwd + "/vmlinuz", "/boot/initrd.img"}));
  EXPECT_EQ(spec.writePaths, (std::vector<std::string>{cwd + "/run", cwd + "/disk.sock"}))
      << "without an inherited API socket the core creates it, so it needs the directory";
  EXPECT_EQ(spec.devices, std::vector<std::string>{"/dev/kvm"});
  EXPECT_EQ(spec.memoryBytes, 256ull << 20);
  EXPECT_TRUE(hasPair(spec.args, "--kernel", cwd + "/vmlinuz"));
  EXPECT_TRUE(hasPair(spec.args, "--vhost-user-blk", cwd + "/disk.sock,queues=2"));
  EXPECT_TRUE(hasPair(spec.args, "--api-socket", cwd + "/run/vm.sock"));

  // `clone run` binds the API socket and passes it: nothing of its directory is in the jail.
  spec = vmmProcessSpec(options, {}, "/usr/bin/clone-vmm", 7);
  EXPECT_EQ(spec.writePaths, std::vector<std::string>{cwd + "/disk.sock"});
  EXPECT_TRUE(hasPair(spec.args, "--api-fd", "7"));
  EXPECT_TRUE(hasPair(spec.args, "--api-socket", cwd + "/run/vm.sock"));
  EXPECT_EQ(spec.keepFds, std::vector<int>{7});
}

TEST(JailedLauncherTest, TurnsASpecIntoAJailerCommandLine) {
  JailOptions options;
  options.user = "1000:994";
  JailedLauncher launcher(options);
  ProcessSpec spec{"vmm", "vm-1-vmm", "/bin/true", {"--kernel", "/k"}, {3}, {"/k"}, {"/run"},
                   {"/dev/kvm"}, false, 1ull << 30};
  auto args = launcher.jailerArguments(spec);
  EXPECT_TRUE(hasPair(args, "--id", "vm-1-vmm"));
  EXPECT_TRUE(hasPair(args, "--uid", "1000"));
  EXPECT_TRUE(hasPair(args, "--gid", "994"));
  EXPECT_TRUE(hasPair(args, "--ro", "/k"));
  EXPECT_TRUE(hasPair(args, "--rw", "/run"));
  EXPECT_TRUE(hasPair(args, "--dev", "/dev/kvm"));
  EXPECT_TRUE(hasPair(args, "--keep-fd", "3"));
  EXPECT_TRUE(hasPair(args, "--cgroup", "memory.max=" + std::to_string((1ull << 30) + (256ull << 20))));
  EXPECT_TRUE(hasPair(args, "--cgroup", "pids.max=512"));
  spec.processes = 4;  // a fork server and its three forks share one jail
  EXPECT_TRUE(hasPair(launcher.jailerArguments(spec), "--cgroup", "pids.max=2048"));
  spec.processes = 1;
  auto dashdash = std::find(args.begin(), args.end(), "--");
  ASSERT_NE(dashdash, args.end());
  EXPECT_EQ(std::vector<std::string>(dashdash + 1, args.end()),
            (std::vector<std::string>{"--kernel", "/k"}));
  EXPECT_EQ(std::find(args.begin(), args.end(), "--net"), args.end());
}

TEST(JailedLauncherTest, RejectsBadJailOptions) {
  JailOptions options;
  options.user = "1000";
  JailedLauncher launcher(options);
  ProcessSpec spec{"vmm", "vm-1-vmm", "/bin/true", {}, {}, {}, {}, {}, false, 0};
  EXPECT_THROW(launcher.jailerArguments(spec), Error);
  options.user = "";
  spec.id = "../x";
  EXPECT_THROW(launcher.jailerArguments(spec), Error);
}

}  // namespace
}  // namespace clonevm::cli
