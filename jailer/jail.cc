#include "jailer/jail.h"

#include <fcntl.h>
#include <grp.h>
#include <linux/magic.h>
#include <linux/securebits.h>
#include <linux/sched.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/capability.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <iterator>
#include <chrono>
#include <cstring>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

#include "common/error.h"
#include "common/unique_fd.h"

extern char** environ;

namespace clonevm::jailer {
namespace {

// Where the jail's root tmpfs is assembled, inside the jail's own mount namespace (the host
// never sees it). Every bind source is opened before this mount, so the tmpfs hiding this
// directory's contents does not matter.
constexpr char kStageDir[] = "/tmp";

// Shared libraries: bound read-only whole, not resolved per program (see docs/JAILER.md).
constexpr const char* kLibraryPaths[] = {"/lib", "/lib64", "/usr/lib", "/usr/lib64",
                                         "/etc/ld.so.cache"};
constexpr const char* kDefaultDevices[] = {"/dev/null", "/dev/zero", "/dev/urandom"};

constexpr int kForwardedSignals[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};

void writeFile(const std::string& path, std::string_view text, const char* step) {
  UniqueFd fd(CLONE_SYSCALL(::open(path.c_str(), O_WRONLY | O_CLOEXEC), step, path));
  CLONE_SYSCALL(::write(fd.get(), text.data(), text.size()), step, path);
}

std::string readFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// ---- cgroup v2 ----

// The first cgroup2 mount in this mount namespace.
std::string findCgroup2Mount() {
  std::ifstream mountinfo("/proc/self/mountinfo");
  std::string line;
  while (std::getline(mountinfo, line)) {
    // id parent major:minor root mountpoint options [optional...] - fstype source superopts
    std::istringstream fields(line);
    std::string id, parent, dev, root, mountPoint, field;
    fields >> id >> parent >> dev >> root >> mountPoint;
    while (fields >> field && field != "-") {
    }
    std::string fsType;
    fields >> fsType;
    if (fsType == "cgroup2") return mountPoint;
  }
  throw Error("cgroup v2 is unavailable: no cgroup2 file system is mounted (see docs/JAILER.md)");
}

class JailCgroup {
 public:
  explicit JailCgroup(const JailConfig& config) {
    std::string mount = findCgroup2Mount();
    std::string parent = config.cgroupParent.empty() ? mount + "/clone" : config.cgroupParent;
    require(parent == mount || parent.starts_with(mount + "/"),
            "--cgroup-parent {} is not inside the cgroup v2 mount {}", parent, mount);
    std::set<std::string> controllers;
    for (const auto& limit : config.cgroupLimits) {
      controllers.insert(limit.substr(0, limit.find('.')));
    }
    // Create the parent's missing directories and enable the controllers on the way down.
    std::string dir = mount;
    std::string rest = parent.substr(mount.size());
    size_t pos = 0;
    while (true) {
      requireCgroup2(dir);
      enableControllers(dir, controllers);
      if (pos >= rest.size()) break;
      size_t next = rest.find('/', pos + 1);
      if (next == std::string::npos) next = rest.size();
      dir += rest.substr(pos, next - pos);
      pos = next;
      if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
        throwSystemError(errno, "create cgroup", dir);
      }
    }
    path_ = parent + "/" + config.id;
    // A jailer killed by SIGKILL leaves its cgroup behind, empty: take it over.
    if (readFile(path_ + "/cgroup.events").find("populated 0") != std::string::npos) {
      ::rmdir(path_.c_str());
    }
    if (::mkdir(path_.c_str(), 0755) != 0) {
      if (errno == EEXIST) {
        throw Error(fmt::format("cgroup {} exists: is a jail with id '{}' running?", path_,
                                config.id));
      }
      throwSystemError(errno, "create cgroup", path_);
    }
    created_ = true;
    for (const auto& limit : config.cgroupLimits) {
      auto eq = limit.find('=');
      std::string file = path_ + "/" + limit.substr(0, eq);
      writeFile(file, limit.substr(eq + 1), "set cgroup limit");
    }
    dirFd_ = UniqueFd(
        CLONE_SYSCALL(::open(path_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC), "open cgroup", path_));
  }

  ~JailCgroup() { remove(); }
  JailCgroup(const JailCgroup&) = delete;
  JailCgroup& operator=(const JailCgroup&) = delete;

  const std::string& path() const { return path_; }
  int dirFd() const { return dirFd_.get(); }

  // The jailed process is gone; its pid namespace's last processes may take a moment to leave.
  void remove() {
    if (!created_) return;
    dirFd_ = UniqueFd();
    for (int attempt = 0; attempt < 200; ++attempt) {
      if (::rmdir(path_.c_str()) == 0 || errno == ENOENT) {
        created_ = false;
        return;
      }
      if (errno != EBUSY) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::cerr << "clone-jailer: remove cgroup " << path_ << ": " << std::strerror(errno) << "\n";
    created_ = false;
  }

 private:
  static void requireCgroup2(const std::string& dir) {
    struct statfs fs {};
    if (::statfs(dir.c_str(), &fs) != 0) throwSystemError(errno, "statfs cgroup", dir);
    require(fs.f_type == CGROUP2_SUPER_MAGIC, "cgroup v2 is unavailable: {} is not a cgroup2 mount",
            dir);
  }

  static void enableControllers(const std::string& dir, const std::set<std::string>& wanted) {
    if (wanted.empty()) return;
    std::string available = " " + readFile(dir + "/cgroup.controllers");
    std::string enabled = " " + readFile(dir + "/cgroup.subtree_control");
    std::replace(available.begin(), available.end(), '\n', ' ');
    std::replace(enabled.begin(), enabled.end(), '\n', ' ');
    for (const auto& controller : wanted) {
      require(available.find(" " + controller + " ") != std::string::npos,
              "cgroup v2 controller '{}' is not available in {} (cgroup.controllers: {})",
              controller, dir, available);
      if (enabled.find(" " + controller + " ") != std::string::npos) continue;
      writeFile(dir + "/cgroup.subtree_control", "+" + controller, "enable cgroup controller");
    }
  }

  std::string path_;
  bool created_ = false;
  UniqueFd dirFd_;
};

// ---- the new root ----

struct Bind {
  std::string path;        // the same inside and outside the jail
  UniqueFd source;         // O_PATH, opened before the stage tmpfs hides anything
  std::string linkTarget;  // non-empty: recreate a symlink instead of binding
  bool writable = false;
  bool device = false;
  bool directory = false;
};

Bind openBind(const std::string& path, bool writable, bool device) {
  Bind bind{path, UniqueFd(), {}, writable, device, false};
  struct stat st {};
  CLONE_SYSCALL(::lstat(path.c_str(), &st), "find jail path", path);
  if (S_ISLNK(st.st_mode)) {
    char target[4096];
    ssize_t n = CLONE_SYSCALL(::readlink(path.c_str(), target, sizeof(target) - 1), "read link", path);
    bind.linkTarget.assign(target, static_cast<size_t>(n));
    return bind;
  }
  if (device) {
    require(S_ISCHR(st.st_mode), "--dev {} is not a character device", path);
  }
  bind.directory = S_ISDIR(st.st_mode);
  bind.source = UniqueFd(CLONE_SYSCALL(::open(path.c_str(), O_PATH | O_CLOEXEC), "open jail path", path));
  return bind;
}

void makeParents(const std::string& path) {
  for (size_t slash = path.find('/', 1); slash != std::string::npos; slash = path.find('/', slash + 1)) {
    std::string dir = path.substr(0, slash);
    if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
      throwSystemError(errno, "create jail directory", dir);
    }
  }
}

unsigned long lockedFlags(const std::string& path) {
  struct statvfs vfs {};
  CLONE_SYSCALL(::statvfs(path.c_str(), &vfs), "statvfs", path);
  unsigned long flags = 0;
  if (vfs.f_flag & ST_NOSUID) flags |= MS_NOSUID;
  if (vfs.f_flag & ST_NODEV) flags |= MS_NODEV;
  if (vfs.f_flag & ST_NOEXEC) flags |= MS_NOEXEC;
  if (vfs.f_flag & ST_NOATIME) flags |= MS_NOATIME;
  if (vfs.f_flag & ST_NODIRATIME) flags |= MS_NODIRATIME;
  if (vfs.f_flag & ST_RELATIME) flags |= MS_RELATIME;
  return flags;
}

void placeBind(const std::string& root, const Bind& bind) {
  std::string target = root + bind.path;
  makeParents(target);
  if (!bind.linkTarget.empty()) {
    if (::symlink(bind.linkTarget.c_str(), target.c_str()) != 0 && errno != EEXIST) {
      throwSystemError(errno, "create symlink", bind.path);
    }
    return;
  }
  if (bind.directory) {
    if (::mkdir(target.c_str(), 0755) != 0 && errno != EEXIST) {
      throwSystemError(errno, "create bind target", bind.path);
    }
  } else {
    // O_EXCL: the target may already be visible through an earlier bind of a parent directory,
    // and may be a socket, which a plain open cannot open (ENXIO).
    UniqueFd file(::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!file.valid() && errno != EEXIST && errno != EISDIR) {
      throwSystemError(errno, "create bind target", bind.path);
    }
  }
  std::string source = "/proc/self/fd/" + std::to_string(bind.source.get());
  CLONE_SYSCALL(::mount(source.c_str(), target.c_str(), nullptr, MS_BIND | MS_REC, nullptr),
                "bind into jail", bind.path);
  unsigned long flags = MS_BIND | MS_REMOUNT | MS_NOSUID | lockedFlags(target);
  if (!bind.writable) flags |= MS_RDONLY;
  if (bind.device) flags |= MS_NOEXEC;
  CLONE_SYSCALL(::mount(nullptr, target.c_str(), nullptr, flags, nullptr),
                bind.writable ? "remount nosuid in jail" : "remount read-only in jail", bind.path);
}

// ---- the jailed process, between clone and exec ----

struct BindRequest {
  std::string path;
  bool writable;
  bool device;
};

struct ChildPlan {
  const JailConfig* config;
  std::vector<BindRequest> binds;
  bool userNamespace;
  bool mayCallSetgroups;
  int syncRead;
};

void setLimit(int resource, uint64_t value, const char* name) {
  rlimit limit{value, value};
  CLONE_SYSCALL(::setrlimit(resource, &limit), "set rlimit", name);
}

void buildRoot(ChildPlan& plan) {
  CLONE_SYSCALL(::mount(nullptr, "/", nullptr, MS_SLAVE | MS_REC, nullptr), "make / a slave mount", "/");
  // Opened here, in the new mount namespace (a bind source must belong to it), and before the
  // stage tmpfs hides anything.
  std::vector<Bind> binds;
  for (const auto& request : plan.binds) {
    binds.push_back(openBind(request.path, request.writable, request.device));
  }
  CLONE_SYSCALL(::mount("tmpfs", kStageDir, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m"),
                "mount the jail root tmpfs", kStageDir);
  std::string root = kStageDir;
  for (const auto& bind : binds) placeBind(root, bind);
  std::string proc = root + "/proc";
  CLONE_SYSCALL(::mkdir(proc.c_str(), 0555), "create jail directory", "/proc");
  if (::mount("proc", proc.c_str(), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) != 0) {
    // A user namespace may not mount proc where the host's /proc has parts masked
    // (containers): the process then runs without /proc.
    if (!(plan.userNamespace && errno == EPERM)) throwSystemError(errno, "mount proc", "/proc");
  }
  CLONE_SYSCALL(::mount(nullptr, root.c_str(), nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
                        "mode=0755,size=1m"),
                "remount the jail root read-only", "/");
  CLONE_SYSCALL(::chdir(root.c_str()), "enter the jail root", root);
  CLONE_SYSCALL(::syscall(SYS_pivot_root, ".", "."), "pivot_root", root);
  CLONE_SYSCALL(::umount2(".", MNT_DETACH), "detach the old root", "/");
  CLONE_SYSCALL(::chdir("/"), "enter the jail root", "/");
}

void dropPrivileges(const ChildPlan& plan) {
  const JailConfig& config = *plan.config;
  // Bounding set first (needs CAP_SETPCAP), so that not even an exec of a set-uid file or of a
  // uid-0 program can gain a capability back.
  for (int cap = 0; cap <= CAP_LAST_CAP; ++cap) {
    if (CAP_IS_SUPPORTED(cap)) CLONE_SYSCALL(::cap_drop_bound(cap), "drop bounding capability", cap_to_name(cap));
  }
  CLONE_SYSCALL(::cap_reset_ambient(), "clear ambient capabilities");
  CLONE_SYSCALL(::cap_set_secbits(SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP_LOCKED |
                                  SECBIT_KEEP_CAPS_LOCKED),
                "set securebits");
  if (plan.mayCallSetgroups) CLONE_SYSCALL(::setgroups(0, nullptr), "setgroups", "");
  // In a user namespace --uid/--gid are mapped to 0 inside (see writeIdMaps).
  uid_t uid = plan.userNamespace ? 0 : config.uid;
  gid_t gid = plan.userNamespace ? 0 : config.gid;
  CLONE_SYSCALL(::setresgid(gid, gid, gid), "setresgid", std::to_string(config.gid));
  CLONE_SYSCALL(::setresuid(uid, uid, uid), "setresuid", std::to_string(config.uid));
  cap_t none = ::cap_init();
  require(none != nullptr, "cap_init failed");
  int rc = ::cap_set_proc(none);
  ::cap_free(none);
  CLONE_SYSCALL(rc, "drop capabilities");
  CLONE_SYSCALL(::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs");
  // After the credential change, which clears it.
  CLONE_SYSCALL(::prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "set parent-death signal");
  // The parent may have died before that: it holds the sync pipe's write end until it exits.
  pollfd parent{plan.syncRead, POLLIN, 0};
  if (::poll(&parent, 1, 0) > 0 && (parent.revents & POLLHUP)) {
    throw Error("the jailer exited before the jailed process started");
  }
}

[[noreturn]] void runChild(ChildPlan& plan) {
  try {
    char go = 0;
    ssize_t n = CLONE_SYSCALL(::read(plan.syncRead, &go, 1), "wait for the jailer");
    require(n == 1 && go == 'g', "the jailer failed before the jailed process could start");
    const JailConfig& config = *plan.config;
    if (plan.userNamespace) {
      // Become the namespace's root (the jail's uid outside), so that the files of the jail's
      // root are created by a mapped user; capabilities in the namespace stay.
      CLONE_SYSCALL(::setresgid(0, 0, 0), "setresgid in the user namespace", "0");
      CLONE_SYSCALL(::setresuid(0, 0, 0), "setresuid in the user namespace", "0");
    }
    setLimit(RLIMIT_NOFILE, config.rlimitNofile, "nofile");
    setLimit(RLIMIT_NPROC, config.rlimitNproc, "nproc");
    setLimit(RLIMIT_FSIZE, config.rlimitFsize.value_or(RLIM_INFINITY), "fsize");
    setLimit(RLIMIT_CORE, 0, "core");
    buildRoot(plan);
    CLONE_SYSCALL(::sethostname(config.id.data(), config.id.size()), "sethostname", config.id);
    dropPrivileges(plan);
    sigset_t none;
    sigemptyset(&none);
    CLONE_SYSCALL(::sigprocmask(SIG_SETMASK, &none, nullptr), "unblock signals");
    for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
    ::close(plan.syncRead);
    std::vector<char*> argv{const_cast<char*>(config.execFile.c_str())};
    for (const auto& arg : config.args) argv.push_back(const_cast<char*>(arg.c_str()));
    argv.push_back(nullptr);
    char* noEnvironment[] = {nullptr};
    ::execve(config.execFile.c_str(), argv.data(), noEnvironment);
    throwSystemError(errno, "exec", config.execFile);
  } catch (const std::exception& error) {
    std::cerr << "clone-jailer: " << error.what() << std::endl;
  }
  ::_exit(kExitJailSetupFailed);
}

// ---- the jailer, before and after the clone ----

void closeOtherFds(const std::vector<int>& keep) {
  std::set<int> kept{0, 1, 2};
  kept.insert(keep.begin(), keep.end());
  for (int fd : kept) {
    int flags = ::fcntl(fd, F_GETFD);
    require(flags >= 0 || fd <= 2, "--keep-fd {} is not open", fd);
    if (flags >= 0) CLONE_SYSCALL(::fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC), "keep fd", std::to_string(fd));
  }
  unsigned first = 0;
  for (int fd : kept) {
    if (static_cast<unsigned>(fd) > first) {
      CLONE_SYSCALL(::close_range(first, static_cast<unsigned>(fd) - 1, 0), "close inherited fds");
    }
    first = static_cast<unsigned>(fd) + 1;
  }
  CLONE_SYSCALL(::close_range(first, ~0u, 0), "close inherited fds");
}

void writeIdMaps(pid_t child, const JailConfig& config, bool root) {
  std::string proc = "/proc/" + std::to_string(child);
  if (!root) writeFile(proc + "/setgroups", "deny", "deny setgroups in the user namespace");
  // One id each: root inside is --uid/--gid outside. Nothing else exists in the namespace.
  writeFile(proc + "/uid_map", fmt::format("0 {} 1\n", config.uid), "write uid_map");
  writeFile(proc + "/gid_map", fmt::format("0 {} 1\n", config.gid), "write gid_map");
}

bool catchesSignal(pid_t pid, int sig) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.starts_with("SigCgt:")) {
      uint64_t mask = std::stoull(line.substr(7), nullptr, 16);
      return (mask >> (sig - 1)) & 1;
    }
  }
  return false;
}

int waitForChild(pid_t child, int pidFd, int signalFd) {
  pollfd fds[2] = {{pidFd, POLLIN, 0}, {signalFd, POLLIN, 0}};
  int forwarded = 0;
  while (true) {
    int ready = ::poll(fds, 2, -1);
    if (ready < 0 && errno == EINTR) continue;
    CLONE_SYSCALL(ready, "wait for the jailed process");
    if (fds[1].revents & POLLIN) {
      signalfd_siginfo info{};
      if (::read(signalFd, &info, sizeof(info)) == sizeof(info)) {
        int sig = static_cast<int>(info.ssi_signo);
        // As PID 1 of its namespace the process ignores signals it has no handler for.
        forwarded = catchesSignal(child, sig) ? sig : SIGKILL;
        ::kill(child, forwarded);
      }
    }
    if (fds[0].revents & POLLIN) break;
  }
  int status = 0;
  CLONE_SYSCALL(::waitpid(child, &status, 0), "wait for the jailed process");
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  int sig = WTERMSIG(status);
  // A death the jailer did not ask for may have left no line of its own (seccomp kills silently).
  if (sig != forwarded) {
    std::cerr << "clone-jailer: the jailed process was killed by signal " << sig << " ("
              << ::strsignal(sig) << ")"
              << (sig == SIGSYS ? ": a syscall outside its seccomp policy" : "") << std::endl;
  }
  return 128 + sig;
}

}  // namespace

int runJailed(const JailConfig& config) {
  validate(config);
  bool root = ::geteuid() == 0;
  bool userNamespace = config.userNamespace == UserNamespace::kOn ||
                       (config.userNamespace == UserNamespace::kAuto && !root);
  require(root || userNamespace, "--userns off needs root: without a user namespace an "
                                 "unprivileged jailer cannot build the jail");
  require(root || (config.uid == ::getuid() && config.gid == ::getgid()),
          "--uid/--gid {}/{}: an unprivileged jailer can only run the process as itself ({}/{})",
          config.uid, config.gid, ::getuid(), ::getgid());

  // 1-2. Fds and environment.
  closeOtherFds(config.keepFds);
  ::clearenv();

  // Check every bind source now, for a clear error before anything is created.
  ChildPlan plan{&config, {}, userNamespace, root, -1};
  auto addBind = [&plan](const std::string& path, bool writable, bool device) {
    struct stat st {};
    CLONE_SYSCALL(::lstat(path.c_str(), &st), "find jail path", path);
    require(!device || S_ISCHR(st.st_mode), "--dev {} is not a character device", path);
    plan.binds.push_back({path, writable, device});
  };
  for (const char* path : kLibraryPaths) {
    if (::access(path, F_OK) == 0) addBind(path, false, false);
  }
  addBind(config.execFile, false, false);
  for (const auto& path : config.readPaths) addBind(path, false, false);
  for (const auto& path : config.writePaths) addBind(path, true, false);
  for (const char* path : kDefaultDevices) addBind(path, true, true);
  for (const auto& path : config.devices) addBind(path, true, true);
  // A bind placed later covers any placed earlier below it: a writable directory (a fork's
  // socket dir) placed after a read-only one inside it (its template) made the template
  // writable in the jail. Parents first, so the narrower bind always wins.
  auto depth = [](const std::string& path) {
    auto normal = std::filesystem::path(path).lexically_normal();
    return std::distance(normal.begin(), normal.end()) - (normal.filename().empty() ? 1 : 0);
  };
  std::stable_sort(plan.binds.begin(), plan.binds.end(),
                   [&](const BindRequest& a, const BindRequest& b) { return depth(a.path) < depth(b.path); });

  // 4. The cgroup, with its limits written before the process enters it.
  JailCgroup cgroup(config);

  int syncPipe[2];
  CLONE_SYSCALL(::pipe2(syncPipe, O_CLOEXEC), "create the sync pipe");
  UniqueFd syncRead(syncPipe[0]);
  UniqueFd syncWrite(syncPipe[1]);
  plan.syncRead = syncRead.get();

  sigset_t forwarded;
  sigemptyset(&forwarded);
  for (int sig : kForwardedSignals) sigaddset(&forwarded, sig);
  CLONE_SYSCALL(::sigprocmask(SIG_BLOCK, &forwarded, nullptr), "block signals");
  UniqueFd signalFd(CLONE_SYSCALL(::signalfd(-1, &forwarded, SFD_CLOEXEC), "create signalfd"));

  // 5, 9. New namespaces and the cgroup, at once.
  uint64_t flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP |
                   CLONE_PIDFD | CLONE_INTO_CGROUP;
  if (!config.network) flags |= CLONE_NEWNET;
  if (userNamespace) flags |= CLONE_NEWUSER;
  int pidFd = -1;
  clone_args args{};
  args.flags = flags;
  args.pidfd = reinterpret_cast<uint64_t>(&pidFd);
  args.exit_signal = SIGCHLD;
  args.cgroup = static_cast<uint64_t>(cgroup.dirFd());
  long pid = ::syscall(SYS_clone3, &args, sizeof(args));
  bool intoCgroup = true;
  if (pid < 0 && (errno == ENOSYS || errno == E2BIG || errno == EINVAL)) {
    // Kernels before 5.7: clone, then move the process before it runs anything.
    args.flags &= ~static_cast<uint64_t>(CLONE_INTO_CGROUP);
    args.cgroup = 0;
    intoCgroup = false;
    pid = ::syscall(SYS_clone3, &args, sizeof(args));
  }
  if (pid == 0) {
    syncWrite = UniqueFd();
    runChild(plan);
  }
  CLONE_SYSCALL(pid, "clone3 into new namespaces", cgroup.path());
  UniqueFd childFd(pidFd);
  auto child = static_cast<pid_t>(pid);
  try {
    if (!intoCgroup) {
      writeFile(cgroup.path() + "/cgroup.procs", std::to_string(child), "move into cgroup");
    }
    if (userNamespace) writeIdMaps(child, config, root);
    CLONE_SYSCALL(::write(syncWrite.get(), "g", 1), "start the jailed process");
  } catch (...) {
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    throw;
  }
  // The jailed process holds its own copies; the jailer must not keep its sockets open.
  for (int fd : config.keepFds) {
    if (fd > 2) ::close(fd);
  }
  int code = waitForChild(child, childFd.get(), signalFd.get());
  cgroup.remove();
  return code;
}

}  // namespace clonevm::jailer
