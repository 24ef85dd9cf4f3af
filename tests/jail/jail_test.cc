// Issue 6: clone-jailer runs jail-probe; the test checks from outside, through /proc, that the
// jail holds (seccomp, no_new_privs, capabilities, namespaces, cgroup, root contents) and that
// forbidden acts end the probe or fail.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace {

using namespace std::chrono_literals;
namespace fs = std::filesystem;

constexpr int kKilledBySeccomp = 128 + SIGSYS;
constexpr char kUid[] = "65534";

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string cgroup2Mount() {
  std::ifstream mountinfo("/proc/self/mountinfo");
  std::string line;
  while (std::getline(mountinfo, line)) {
    auto dash = line.find(" - cgroup2 ");
    if (dash == std::string::npos) continue;
    std::istringstream fields(line);
    std::string skip, mountPoint;
    fields >> skip >> skip >> skip >> skip >> mountPoint;
    return mountPoint;
  }
  return "";
}

std::string testCgroupParent() { return cgroup2Mount() + "/clone-jail-test"; }

bool cgroupControllersAvailable() {
  std::string controllers = readFile(cgroup2Mount() + "/cgroup.controllers");
  return controllers.find("memory") != std::string::npos &&
         controllers.find("pids") != std::string::npos && controllers.find("cpu") != std::string::npos;
}

// "Key:\tvalue" from /proc/PID/status.
std::string statusField(pid_t pid, const std::string& key) {
  std::istringstream status(readFile("/proc/" + std::to_string(pid) + "/status"));
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with(key + ":")) {
      auto value = line.substr(key.size() + 1);
      auto start = value.find_first_not_of(" \t");
      return start == std::string::npos ? "" : value.substr(start);
    }
  }
  return "<missing>";
}

std::string nsLink(const std::string& pid, const std::string& ns) {
  std::error_code error;
  return fs::read_symlink("/proc/" + pid + "/ns/" + ns, error).string();
}

// clone-jailer running jail-probe, with the probe's stdin and stdout/stderr on pipes.
class JailedProbe {
 public:
  JailedProbe(const std::vector<std::string>& jailerArgs, std::vector<int> extraFds = {}) {
    int in[2], out[2];
    EXPECT_EQ(::pipe2(in, O_CLOEXEC), 0);
    EXPECT_EQ(::pipe2(out, O_CLOEXEC), 0);
    jailer_ = ::fork();
    if (jailer_ == 0) {
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      ::dup2(out[1], 2);
      for (int fd : extraFds) ::fcntl(fd, F_SETFD, 0);
      std::vector<char*> argv{const_cast<char*>(CLONE_JAILER)};
      for (const auto& arg : jailerArgs) argv.push_back(const_cast<char*>(arg.c_str()));
      argv.push_back(nullptr);
      ::execv(CLONE_JAILER, argv.data());
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    stdin_ = in[1];
    stdout_ = out[0];
  }
  ~JailedProbe() {
    if (jailer_ > 0 && !exited_) {
      ::kill(jailer_, SIGKILL);
      ::waitpid(jailer_, nullptr, 0);
    }
    ::close(stdin_);
    ::close(stdout_);
  }

  // Reads output until a line starts with `prefix`; returns that line.
  std::optional<std::string> expectLine(const std::string& prefix, std::chrono::milliseconds timeout = 10s) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      size_t start = 0;
      while (true) {
        auto end = output_.find('\n', start);
        if (end == std::string::npos) break;
        std::string line = output_.substr(start, end - start);
        start = end + 1;
        if (line.starts_with(prefix) && !seen_.contains(start)) {
          seen_[start] = true;
          return line;
        }
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      if (left <= 0ms) return std::nullopt;
      pollfd p{stdout_, POLLIN, 0};
      if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) return std::nullopt;
      char buf[4096];
      ssize_t n = ::read(stdout_, buf, sizeof(buf));
      if (n <= 0) return std::nullopt;
      output_.append(buf, static_cast<size_t>(n));
    }
  }

  void send(const std::string& line) {
    std::string text = line + "\n";
    ASSERT_EQ(::write(stdin_, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  }

  // The jailed process: the jailer's only child.
  pid_t probePid() {
    std::string children = readFile("/proc/" + std::to_string(jailer_) + "/task/" +
                                    std::to_string(jailer_) + "/children");
    return children.empty() ? -1 : std::stoi(children);
  }

  int waitExit() {
    ::close(stdin_);
    stdin_ = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    char buf[4096];
    ssize_t n;
    while ((n = ::read(stdout_, buf, sizeof(buf))) > 0) output_.append(buf, static_cast<size_t>(n));
    int status = 0;
    ::waitpid(jailer_, &status, 0);
    exited_ = true;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }

  const std::string& output() const { return output_; }

 private:
  pid_t jailer_ = -1;
  bool exited_ = false;
  int stdin_ = -1;
  int stdout_ = -1;
  std::string output_;
  std::map<size_t, bool> seen_;
};

std::vector<std::string> jailArgs(const std::string& id, const std::string& kind,
                                  const std::string& mode = "kill",
                                  std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--id", id, "--exec-file", CLONE_JAIL_PROBE, "--uid", kUid, "--gid",
                                kUid, "--cgroup-parent", testCgroupParent()};
  args.insert(args.end(), extra.begin(), extra.end());
  args.insert(args.end(), {"--", kind, mode});
  return args;
}

// The top-level entries the jail's root must hold, and nothing else: libraries, ld.so.cache,
// the probe's own directory tree, /dev and /proc.
std::string expectedRoot() {
  std::string top = fs::path(CLONE_JAIL_PROBE).begin()->string() == "/"
                        ? (++fs::path(CLONE_JAIL_PROBE).begin())->string()
                        : "";
  std::vector<std::string> names{"dev", "proc", "usr", "etc", top};
  for (const char* link : {"lib", "lib64"}) {
    if (fs::exists(std::string("/") + link)) names.push_back(link);
  }
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  std::string joined;
  for (const auto& name : names) joined += " " + name;
  return joined;
}

std::string sortedWords(const std::string& line) {
  std::istringstream in(line.substr(line.find(':') + 1));
  std::vector<std::string> words;
  for (std::string word; in >> word;) words.push_back(word);
  std::sort(words.begin(), words.end());
  std::string joined;
  for (const auto& word : words) joined += " " + word;
  return joined;
}

class PolicyTest : public ::testing::TestWithParam<std::string> {};

TEST_P(PolicyTest, ProbeRunsLockedDownInItsOwnNamespacesAndCgroup) {
  std::string kind = GetParam();
  std::string id = "probe-" + kind;
  JailedProbe probe(jailArgs(id, kind));
  auto root = probe.expectLine("root:");
  ASSERT_TRUE(root) << probe.output();
  EXPECT_EQ(sortedWords(*root), expectedRoot());
  auto dev = probe.expectLine("dev:");
  ASSERT_TRUE(dev);
  EXPECT_EQ(sortedWords(*dev), " null urandom zero");
  ASSERT_TRUE(probe.expectLine("ready")) << probe.output();
  pid_t pid = probe.probePid();
  ASSERT_GT(pid, 0);
  EXPECT_EQ(statusField(pid, "Seccomp"), "2");
  EXPECT_EQ(statusField(pid, "NoNewPrivs"), "1");
  EXPECT_EQ(statusField(pid, "CapEff"), "0000000000000000");
  EXPECT_EQ(statusField(pid, "CapPrm"), "0000000000000000");
  EXPECT_EQ(statusField(pid, "CapBnd"), "0000000000000000");
  EXPECT_EQ(statusField(pid, "CapAmb"), "0000000000000000");
  EXPECT_EQ(statusField(pid, "Uid"), "65534\t65534\t65534\t65534");
  EXPECT_EQ(statusField(pid, "Gid"), "65534\t65534\t65534\t65534");
  EXPECT_EQ(statusField(pid, "Groups"), "");
  // PID 1 of its own pid namespace.
  EXPECT_EQ(statusField(pid, "NSpid"), std::to_string(pid) + "\t1");
  for (const char* ns : {"mnt", "pid", "ipc", "uts", "cgroup", "net"}) {
    EXPECT_NE(nsLink(std::to_string(pid), ns), nsLink("self", ns)) << ns;
    EXPECT_FALSE(nsLink(std::to_string(pid), ns).empty()) << ns;
  }
  // Root runs it without a user namespace by default (--userns auto).
  EXPECT_EQ(nsLink(std::to_string(pid), "user"), nsLink("self", "user"));
  std::string cgroup = readFile("/proc/" + std::to_string(pid) + "/cgroup");
  EXPECT_NE(cgroup.find("0::/clone-jail-test/" + id), std::string::npos) << cgroup;
  EXPECT_TRUE(fs::exists(testCgroupParent() + "/" + id));
  probe.send("exit");
  EXPECT_EQ(probe.waitExit(), 0) << probe.output();
  EXPECT_FALSE(fs::exists(testCgroupParent() + "/" + id)) << "the jailer removes the cgroup";
}

INSTANTIATE_TEST_SUITE_P(EveryKind, PolicyTest,
                         ::testing::Values("vmm", "block", "net", "fs", "vfio"));

TEST(JailTest, CgroupLimitsAreInForce) {
  if (!cgroupControllersAvailable()) {
    GTEST_SKIP() << "cgroup v2 at '" << cgroup2Mount()
                 << "' has no memory/pids/cpu controllers here; the lab runs this test";
  }
  JailedProbe probe(jailArgs("probe-limits", "block", "kill",
                             {"--cgroup", "memory.max=67108864", "--cgroup", "pids.max=16",
                              "--cgroup", "cpu.max=50000 100000"}));
  ASSERT_TRUE(probe.expectLine("ready")) << probe.output();
  std::string dir = testCgroupParent() + "/probe-limits";
  EXPECT_EQ(readFile(dir + "/memory.max"), "67108864\n");
  EXPECT_EQ(readFile(dir + "/pids.max"), "16\n");
  EXPECT_EQ(readFile(dir + "/cpu.max"), "50000 100000\n");
  EXPECT_EQ(readFile(dir + "/cgroup.procs"), std::to_string(probe.probePid()) + "\n");
  probe.send("exit");
  EXPECT_EQ(probe.waitExit(), 0) << probe.output();
}

struct ForbiddenCase {
  std::string kind;
  std::string command;
  std::optional<std::string> answer;  // nullopt: killed by seccomp
};

class ForbiddenTest : public ::testing::TestWithParam<ForbiddenCase> {};

TEST_P(ForbiddenTest, IsKilledOrDenied) {
  const auto& c = GetParam();
  // One jail id (and cgroup) per case: ctest runs the cases in parallel.
  JailedProbe probe(jailArgs("probe-forbidden-" + c.kind + "-" + c.command, c.kind));
  ASSERT_TRUE(probe.expectLine("ready")) << probe.output();
  probe.send(c.command);
  if (c.answer) {
    auto line = probe.expectLine(c.command + ":");
    ASSERT_TRUE(line) << probe.output();
    EXPECT_EQ(*line, c.command + ": " + *c.answer);
    probe.send("exit");
    EXPECT_EQ(probe.waitExit(), 0) << probe.output();
  } else {
    EXPECT_EQ(probe.waitExit(), kKilledBySeccomp) << probe.output();
    // The kill leaves no line of the probe's own: the jailer names it.
    EXPECT_NE(probe.output().find("killed by signal 31 (Bad system call): a syscall outside its "
                                  "seccomp policy"),
              std::string::npos)
        << probe.output();
  }
}

INSTANTIATE_TEST_SUITE_P(
    Acts, ForbiddenTest,
    ::testing::Values(ForbiddenCase{"block", "ptrace", std::nullopt},
                      ForbiddenCase{"block", "inet", std::nullopt},
                      ForbiddenCase{"block", "exec", std::nullopt},
                      ForbiddenCase{"block", "shadow", std::nullopt},
                      ForbiddenCase{"vmm", "exec", std::nullopt},
                      ForbiddenCase{"vmm", "ptrace", std::nullopt},
                      ForbiddenCase{"vmm", "inet", std::nullopt},
                      // Allowed by the policy, so the answer proves the filter is selective...
                      ForbiddenCase{"vmm", "unix", "ok"},
                      // ...and where open is allowed, the host's files are not in the jail.
                      ForbiddenCase{"fs", "shadow", "errno 2"}),
    // Names from the case, not its bytes (which hold pointers and differ between runs).
    [](const ::testing::TestParamInfo<ForbiddenCase>& info) {
      return info.param.kind + "_" + info.param.command;
    });

TEST(JailTest, SeccompLogModeLetsViolationsThrough) {
  JailedProbe probe(jailArgs("probe-log", "block", "log"));
  ASSERT_TRUE(probe.expectLine("ready")) << probe.output();
  probe.send("ptrace");
  auto line = probe.expectLine("ptrace:");
  ASSERT_TRUE(line) << probe.output();
  EXPECT_EQ(*line, "ptrace: ok");  // PTRACE_TRACEME succeeds once nothing kills it
  probe.send("exit");
  EXPECT_EQ(probe.waitExit(), 0);
}

TEST(JailTest, KeepsOnlyTheFdsItIsAsked) {
  int kept[2], leaked[2];
  ASSERT_EQ(::pipe(kept), 0);
  ASSERT_EQ(::pipe(leaked), 0);
  JailedProbe probe(jailArgs("probe-fds", "block", "kill", {"--keep-fd", std::to_string(kept[1])}),
                    {kept[1], leaked[1]});
  ASSERT_TRUE(probe.expectLine("ready")) << probe.output();
  std::vector<int> fds;
  for (const auto& entry : fs::directory_iterator("/proc/" + std::to_string(probe.probePid()) + "/fd")) {
    fds.push_back(std::stoi(entry.path().filename().string()));
  }
  std::sort(fds.begin(), fds.end());
  EXPECT_EQ(fds, (std::vector<int>{0, 1, 2, kept[1]}));
  probe.send("exit");
  EXPECT_EQ(probe.waitExit(), 0);
  for (int fd : {kept[0], kept[1], leaked[0], leaked[1]}) ::close(fd);
}

// The mount that decides access at `path` in process `pid`: the last one mounted at the
// path or at a directory above it. Returns its mount options ("" if none).
std::string effectiveMountOptions(const std::string& pid, const std::string& path) {
  std::ifstream mountinfo("/proc/" + pid + "/mountinfo");
  std::string options;
  for (std::string line; std::getline(mountinfo, line);) {
    std::istringstream fields(line);
    std::string id, parent, device, root, mountPoint, mountOptions;
    fields >> id >> parent >> device >> root >> mountPoint >> mountOptions;
    bool covers = mountPoint == "/" || path == mountPoint || path.starts_with(mountPoint + "/");
    if (covers) options = mountOptions;
  }
  return options;
}

TEST(JailTest, AReadOnlyPathStaysReadOnlyInsideAWritableOne) {
  // As a fork's jail has it: its template (read-only) inside its socket dir (writable),
  // given in that order.
  std::string dir = fs::temp_directory_path() / ("jail-nested-" + std::to_string(::getpid()));
  fs::create_directories(dir + "/template");
  JailedProbe probe(jailArgs("probe-nested", "block", "kill",
                             {"--ro", dir + "/template", "--rw", dir}));
  ASSERT_TRUE(probe.expectLine("ready")) << probe.output();
  std::string pid = std::to_string(probe.probePid());
  std::string templateOptions = effectiveMountOptions(pid, dir + "/template");
  std::string dirOptions = effectiveMountOptions(pid, dir);
  probe.send("exit");
  EXPECT_EQ(probe.waitExit(), 0) << probe.output();
  fs::remove_all(dir);
  EXPECT_TRUE(templateOptions.starts_with("ro")) << templateOptions;
  EXPECT_TRUE(dirOptions.starts_with("rw")) << dirOptions;
}

TEST(JailTest, UserNamespaceOnRequest) {
  JailedProbe probe(jailArgs("probe-userns", "block", "kill", {"--userns", "on"}));
  ASSERT_TRUE(probe.expectLine("ready")) << probe.output();
  std::string pid = std::to_string(probe.probePid());
  EXPECT_NE(nsLink(pid, "user"), nsLink("self", "user"));
  // Root inside is the jail's uid outside, and no other id exists in the namespace.
  EXPECT_EQ(sortedWords(":" + readFile("/proc/" + pid + "/uid_map")), " 0 1 65534");
  EXPECT_EQ(statusField(std::stoi(pid), "Seccomp"), "2");
  EXPECT_EQ(statusField(std::stoi(pid), "CapEff"), "0000000000000000");
  EXPECT_EQ(statusField(std::stoi(pid), "Uid"), "65534\t65534\t65534\t65534");
  probe.send("exit");
  EXPECT_EQ(probe.waitExit(), 0) << probe.output();
}

struct BadInput {
  std::vector<std::string> args;
  int code;
  std::string message;
};

class BadInputTest : public ::testing::TestWithParam<BadInput> {};

TEST_P(BadInputTest, FailsWithAClearError) {
  const auto& c = GetParam();
  JailedProbe jailer(c.args);
  EXPECT_EQ(jailer.waitExit(), c.code) << jailer.output();
  EXPECT_NE(jailer.output().find(c.message), std::string::npos) << jailer.output();
  EXPECT_NE(jailer.output().find("clone-jailer: "), std::string::npos) << jailer.output();
}

std::vector<std::string> probeArgs(std::string id, std::string exec, std::string uid,
                                   std::vector<std::string> extra = {}) {
  std::vector<std::string> args{"--id", id, "--exec-file", exec, "--uid", uid, "--gid", "0"};
  args.insert(args.end(), extra.begin(), extra.end());
  return args;
}

INSTANTIATE_TEST_SUITE_P(
    Cli, BadInputTest,
    ::testing::Values(
        BadInput{probeArgs("x", "/nonexistent/clone-vmm", "0"), 2, "/nonexistent/clone-vmm: No such file"},
        BadInput{probeArgs("a/b", CLONE_JAIL_PROBE, "0"), 2, "no '/'"},
        BadInput{probeArgs("..", CLONE_JAIL_PROBE, "0"), 2, "'..'"},
        BadInput{probeArgs("", CLONE_JAIL_PROBE, "0"), 2, "--id is empty"},
        BadInput{probeArgs("x", CLONE_JAIL_PROBE, "nosuchuser_zz"), 2, "no such user"},
        BadInput{probeArgs("x", CLONE_JAIL_PROBE, "4294967295"), 2, "out of range"},
        BadInput{probeArgs("x", CLONE_JAIL_PROBE, "0", {"--cgroup-parent", "/proc/clone"}), 1,
                 "cgroup v2"},
        BadInput{probeArgs("x", CLONE_JAIL_PROBE, "0", {"--keep-fd", "77"}), 1, "--keep-fd 77 is not open"},
        BadInput{probeArgs("x", CLONE_JAIL_PROBE, "0", {"--ro", "/nonexistent/file"}), 1,
                 "/nonexistent/file"}));

}  // namespace
