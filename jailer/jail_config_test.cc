#include "jailer/jail_config.h"

#include <gtest/gtest.h>

#include "common/error.h"

namespace clonevm::jailer {
namespace {

std::vector<std::string> baseArgs(std::string id = "vm1-block0", std::string exec = "/bin/true") {
  return {"--id", id, "--exec-file", exec, "--uid", "1000", "--gid", "1000"};
}

std::string errorFor(std::vector<std::string> args) {
  try {
    parseJailerArgs(args);
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

TEST(JailConfigTest, ParsesEveryOption) {
  auto args = baseArgs();
  args.insert(args.end(), {"--cgroup", "memory.max=1048576", "--cgroup", "cpu.max=50000 100000",
                           "--ro", "/etc/passwd", "--rw", "/tmp", "--dev", "/dev/kvm",
                           "--keep-fd", "3", "--net", "--userns", "on", "--rlimit", "nofile=64",
                           "--rlimit", "fsize=4096", "--", "--kernel", "/k"});
  JailConfig config = parseJailerArgs(args);
  EXPECT_EQ(config.id, "vm1-block0");
  EXPECT_EQ(config.uid, 1000u);
  EXPECT_EQ(config.cgroupLimits.size(), 2u);
  EXPECT_EQ(config.cgroupLimits[1], "cpu.max=50000 100000");
  EXPECT_EQ(config.devices, std::vector<std::string>{"/dev/kvm"});
  EXPECT_EQ(config.keepFds, std::vector<int>{3});
  EXPECT_TRUE(config.network);
  EXPECT_EQ(config.userNamespace, UserNamespace::kOn);
  EXPECT_EQ(config.rlimitNofile, 64u);
  EXPECT_EQ(config.rlimitFsize, 4096u);
  EXPECT_EQ(config.args, (std::vector<std::string>{"--kernel", "/k"}));
}

TEST(JailConfigTest, ToJailerArgsRoundTrips) {
  auto args = baseArgs();
  args.insert(args.end(), {"--cgroup", "pids.max=64", "--ro", "/etc", "--dev", "/dev/null", "--",
                           "-x", "y"});
  JailConfig config = parseJailerArgs(args);
  JailConfig again = parseJailerArgs(toJailerArgs(config));
  EXPECT_EQ(toJailerArgs(again), toJailerArgs(config));
  EXPECT_EQ(again.args, config.args);
  EXPECT_EQ(again.cgroupLimits, config.cgroupLimits);
}

TEST(JailConfigTest, RejectsBadIds) {
  EXPECT_NE(errorFor(baseArgs("")).find("--id"), std::string::npos);
  EXPECT_NE(errorFor(baseArgs("a/b")).find("no '/'"), std::string::npos);
  EXPECT_NE(errorFor(baseArgs("..")).find("'..'"), std::string::npos);
  EXPECT_NE(errorFor(baseArgs("a..b")).find("'..'"), std::string::npos);
  EXPECT_NE(errorFor(baseArgs(std::string(65, 'a'))).find("longer"), std::string::npos);
}

TEST(JailConfigTest, RejectsAMissingOrNonExecutableFile) {
  EXPECT_NE(errorFor(baseArgs("x", "/nonexistent/prog")).find("/nonexistent/prog"),
            std::string::npos);
  EXPECT_NE(errorFor(baseArgs("x", "relative/prog")).find("absolute"), std::string::npos);
  EXPECT_NE(errorFor(baseArgs("x", "/etc/passwd")).find("not executable"), std::string::npos);
  EXPECT_NE(errorFor(baseArgs("x", "/etc")).find("not a regular file"), std::string::npos);
}

TEST(JailConfigTest, RejectsBadUidsAndGids) {
  std::vector<std::string> args{"--id", "x", "--exec-file", "/bin/true", "--uid", "nosuchuser_zz",
                                "--gid", "0"};
  EXPECT_NE(errorFor(args).find("no such user"), std::string::npos);
  args[5] = "4294967295";
  EXPECT_NE(errorFor(args).find("out of range"), std::string::npos);
  args[5] = "-1";
  EXPECT_FALSE(errorFor(args).empty());
  args[5] = "0";
  args[7] = "nosuchgroup_zz";
  EXPECT_NE(errorFor(args).find("no such group"), std::string::npos);
}

TEST(JailConfigTest, RejectsBadPathsLimitsAndDevices) {
  auto with = [](std::vector<std::string> extra) {
    auto args = baseArgs();
    args.insert(args.end(), extra.begin(), extra.end());
    return errorFor(args);
  };
  EXPECT_NE(with({"--ro", "etc"}).find("absolute"), std::string::npos);
  EXPECT_NE(with({"--rw", "/a/../etc"}).find("'..'"), std::string::npos);
  EXPECT_NE(with({"--dev", "/etc/passwd"}).find("not under /dev"), std::string::npos);
  EXPECT_NE(with({"--cgroup", "memory.max"}).find("FILE=VALUE"), std::string::npos);
  EXPECT_NE(with({"--cgroup", "cgroup.procs=1"}).find("controller file"), std::string::npos);
  EXPECT_NE(with({"--cgroup", "../x.max=1"}).find("controller file"), std::string::npos);
  EXPECT_NE(with({"--userns", "maybe"}).find("auto, on or off"), std::string::npos);
  EXPECT_NE(with({"--rlimit", "stack=1"}).find("unknown limit"), std::string::npos);
  EXPECT_NE(with({"--rlimit", "nofile=x"}).find("not a number"), std::string::npos);
}

}  // namespace
}  // namespace clonevm::jailer
