#include "cli/fork_commands.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "cli/direct_launcher.h"
#include "cli/disk_record.h"
#include "cli/fork_disks.h"
#include "cli/program_path.h"
#include "cli/template_disks.h"
#include "cli/vm_client.h"
#include "ipc/fork-server/fork_request.h"
#include "ipc/capnp/directory_fd.h"
#include "common/error.h"
#include "common/unique_fd.h"
#include "vmm-core/snapshot/template_files.h"
#include "vmm-core/snapshot/working_set_file.h"

extern char** environ;

namespace clonevm::cli {
namespace {

using namespace std::chrono_literals;

constexpr auto kForkReadyTimeout = 20s;
// From the API's first answer until the agent answered IDENTITY (connect and round trip).
constexpr auto kAgentTimeout = 20s;
constexpr size_t kSeedBytes = 32;

std::string randomId() {
  std::random_device device;
  return fmt::format("fork-{:08x}", device());
}

std::string tail(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return "";
  char buffer[2048];
  off_t size = ::lseek(fd.get(), 0, SEEK_END);
  off_t from = std::max<off_t>(0, size - static_cast<off_t>(sizeof(buffer)));
  ssize_t n = ::pread(fd.get(), buffer, sizeof(buffer), from);
  return n > 0 ? std::string(buffer, static_cast<size_t>(n)) : "";
}

bool processAlive(pid_t pid) {
  // Our own child until we exit: reap it if it ended, so kill(0) does not see a zombie.
  int status = 0;
  if (::waitpid(pid, &status, WNOHANG) == pid) return false;
  return ::kill(pid, 0) == 0;
}

// Waits until the fork answers on its API socket; returns its vsock CID (0: no vsock device).
// The socket listens from the start (bound by us, inherited by the core): a connection waits
// in its backlog until the core serves, so the status call is polled while the process is
// checked for an early end and the deadline.
// A fork of a fork server has no pid here (nullopt): nobody listening on its socket (the fork
// held the only listening fd) is how its end shows.
uint32_t waitReady(std::optional<pid_t> pid, const std::string& socket, const std::string& consoleLog) {
  auto deadline = std::chrono::steady_clock::now() + kForkReadyTimeout;
  bool refusedMeansEnded = !pid;
  auto ended = [&] {
    return Error(fmt::format("ended during restore{}:\n{}", pid ? fmt::format(" (pid {})", *pid) : "",
                             tail(consoleLog)));
  };
  auto alive = [&] { return !pid || processAlive(*pid); };
  while (std::chrono::steady_clock::now() < deadline) {
    if (!alive()) throw ended();
    std::optional<uint32_t> cid;
    bool processEnded = false;
    try {
      auto io = kj::setupAsyncIo();
      auto connection = rpc::connectUnix(io, socket);
      capnp::TwoPartyClient client(*connection, rpc::kMaxFdsPerMessage);
      auto status = client.bootstrap().castAs<rpc::VmControl>().statusRequest().send();
      while (!status.poll(io.waitScope)) {
        if (!alive()) {
          processEnded = true;
          break;
        }
        if (std::chrono::steady_clock::now() >= deadline) break;
        std::this_thread::sleep_for(1ms);
      }
      if (!processEnded && std::chrono::steady_clock::now() < deadline) {
        cid = status.wait(io.waitScope).getStatus().getVsockCid();
      }
    } catch (const kj::Exception&) {
      // The connection was dropped: the core is gone, or its jailer has not noticed yet.
    } catch (const Error&) {
      // Refused: the socket's only listener, the core, has ended.
      processEnded = refusedMeansEnded;
    }
    if (cid) return *cid;
    if (processEnded) throw ended();
    std::this_thread::sleep_for(2ms);
  }
  throw Error(fmt::format("did not answer on {} within {} s", socket, kForkReadyTimeout.count()));
}

// The snapshot's output, created here (or an existing empty directory) and opened: the core
// writes into the fd it is sent, needing no path of its own (a jailed core has none).
struct OutputDirectory {
  UniqueFd fd;
  bool created = false;  // removed again if the snapshot is refused before writing anything
};
OutputDirectory openOutputDirectory(const std::string& dir) {
  OutputDirectory output;
  output.created = ::mkdir(dir.c_str(), 0755) == 0;
  if (!output.created && errno != EEXIST) throwSystemError(errno, "create template directory", dir);
  output.fd = UniqueFd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  std::error_code error;
  require(output.fd && std::filesystem::is_empty(dir, error),
          "{}: exists and is not an empty directory", dir);
  return output;
}

}  // namespace

void saveTemplateWorkingSet(const std::string& templateDir, uint64_t memorySize,
                            const std::string& forkId, const std::string& socket, std::ostream& err) {
  try {
    vmm::snapshot::WorkingSet set;
    withVm(socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
      auto reply = vm.recordedWorkingSetRequest().send().wait(waitScope);
      for (uint64_t page : reply.getPages()) set.pages.push_back(page);
      for (uint64_t page : reply.getWrittenPages()) set.written.push_back(page);
    });
    vmm::snapshot::checkWorkingSet(set, memorySize);
    if (set.pages.empty()) {
      // An empty file would only stop a later fork from recording one.
      err << fmt::format("clone fork: fork {} recorded an empty working set: none saved\n", forkId);
      return;
    }
    if (!vmm::snapshot::linkWorkingSetFile(AT_FDCWD, templateDir, set, "clone-fork")) return;
    err << fmt::format("clone fork: saved the working set fork {} recorded ({} pages, {} written) "
                       "in {}/{}: later forks prefetch it\n", forkId, set.pages.size(),
                       set.written.size(), templateDir, vmm::snapshot::kWorkingSetFile);
  } catch (const std::exception& error) {
    err << fmt::format("clone fork: warning: the template's working set was not saved, later forks "
                       "start slower: {}\n", error.what());
  }
}

namespace {

std::vector<uint8_t> randomSeed(size_t size) {
  std::vector<uint8_t> seed(size);
  size_t got = 0;
  while (got < size) {
    ssize_t n = ::getrandom(seed.data() + got, size - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throwSystemError(errno, "getrandom for a fork's RNG seed");
    }
    got += static_cast<size_t>(n);
  }
  return seed;
}

std::string joined(const std::vector<std::string>& parts) {
  std::string text;
  for (const auto& part : parts) text += (text.empty() ? "" : "; ") + part;
  return text;
}

// Shuts `fd` down (so a blocked read returns) unless disarmed before `deadline`.
class ConnectionWatchdog {
 public:
  ConnectionWatchdog(int fd, std::chrono::steady_clock::time_point deadline)
      : thread_([this, fd, deadline] {
          std::unique_lock lock(mutex_);
          if (!finished_.wait_until(lock, deadline, [this] { return done_; })) {
            fired_ = true;
            ::shutdown(fd, SHUT_RDWR);
          }
        }) {}
  ~ConnectionWatchdog() { disarm(); }
  // Returns whether it fired.
  bool disarm() {
    if (thread_.joinable()) {
      {
        std::lock_guard lock(mutex_);
        done_ = true;
      }
      finished_.notify_one();
      thread_.join();
    }
    return fired_;
  }

 private:
  std::mutex mutex_;
  std::condition_variable finished_;
  bool done_ = false, fired_ = false;
  std::thread thread_;  // last: starts once the members above exist
};

// One IDENTITY request on its own connection (the protocol's one request per connection), all
// before `deadline`. The client's call has no deadline of its own: the watchdog cuts the
// connection if the guest accepted it but never answers.
IdentityResult sendIdentity(uint32_t cid, const Identity& identity,
                            std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  AgentConnection connection = AgentConnection::connect(cid, kAgentPort, std::max(left, 1ms));
  ConnectionWatchdog watchdog(connection.fd(), deadline);
  try {
    return applyIdentity(connection, identity);
  } catch (const Error& error) {
    if (watchdog.disarm()) {
      throw Error(fmt::format("the guest agent (vsock CID {}) did not answer IDENTITY in time", cid));
    }
    throw Error(fmt::format("IDENTITY to the guest agent (vsock CID {}): {}", cid, error.what()));
  }
}

// Applies the fork's identity and checks the read-back, all within `timeout`.
void applyForkIdentity(const std::string& forkId, uint32_t cid, std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  Identity identity = forkIdentity(forkId);
  IdentityResult result = sendIdentity(cid, identity, deadline);
  auto answeredAt = std::chrono::system_clock::now();
  // The guest's clock is set to the host's time at sending. A fresh fork's first answer can
  // take seconds (its agent faults its pages in from the template), so the clock may be that
  // late: step it again, now that the agent answers fast.
  auto late = [&] {
    auto off = result.guestClock - answeredAt;
    return result.clockApplied && (off > kGuestClockTolerance || -off > kGuestClockTolerance);
  };
  for (int step = 0; step < 2 && late(); ++step) {
    Identity clockOnly;
    clockOnly.clock = std::chrono::system_clock::now();
    auto again = sendIdentity(cid, clockOnly, deadline);
    answeredAt = std::chrono::system_clock::now();
    result.clockApplied = again.clockApplied;
    result.clockError = again.clockError;
    result.guestClock = again.guestClock;
  }
  auto problems = identityProblems(identity, result, answeredAt);
  require(problems.empty(), "identity not applied as asked (vsock CID {}): {}", cid, joined(problems));
}

// Runs `true` in a fork through its agent, for the working set it records; a failure costs
// later forks only speed, so it is a warning.
void execTrueForTheRecord(const std::string& forkId, uint32_t cid, std::ostream& err) {
  try {
    auto connection = AgentConnection::connect(cid, kAgentPort, kAgentTimeout);
    auto result = exec(connection, {.argv = {"true"}}, -1, -1, -1, kAgentTimeout);
    require(result.exitCode() == 0, "`true` ended with {}", result.exitCode());
  } catch (const std::exception& error) {
    err << fmt::format("clone fork: warning: fork {} ran no command for its working set, later "
                       "forks' first commands fault more: {}\n", forkId, error.what());
  }
}

// Ends a fork that could not be brought up: through its API if it answers, else SIGKILL
// (`pid` is its own process: not for a fork server's fork, whose server serves others).
void stopFork(std::optional<pid_t> pid, const std::string& socket) {
  try {
    withVm(socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
      auto request = vm.shutdownRequest();
      request.setGraceful(false);
      request.send().wait(waitScope);
    });
  } catch (const Error&) {
    // Not answering: killed below.
  }
  auto deadline = std::chrono::steady_clock::now() + 5s;
  auto running = [&] { return pid ? processAlive(*pid) : rpc::someoneListens(socket); };
  while (running() && std::chrono::steady_clock::now() < deadline) std::this_thread::sleep_for(5ms);
  if (pid && processAlive(*pid)) {
    ::kill(*pid, SIGKILL);
    ::waitpid(*pid, nullptr, 0);
  }
  ::unlink(socket.c_str());
}

// One fork being brought up by `clone fork`.
struct Fork {
  std::string id, socket, log;
  std::optional<pid_t> pid;  // its jailer or core; none for a fork server's fork
  std::chrono::steady_clock::time_point spawnedAt;
  // Filled by the fork's own thread.
  uint32_t cid = 0;
  bool identityApplied = false;
  double apiMs = 0, readyMs = 0;
  std::string error;
  std::vector<std::string> diskLogs;  // clone-block's output, one per disk
};

std::string forkSocketPath(const ForkCommandOptions& options, const std::string& runtime,
                           const std::string& id, unsigned index) {
  return options.apiSocket.empty() ? fmt::format("{}/{}.sock", runtime, id)
         : options.count == 1      ? options.apiSocket
                                   : fmt::format("{}.{}", options.apiSocket, index + 1);
}

void makeDirectory(const std::string& path) {
  if (::mkdir(path.c_str(), 0700) != 0 && errno != EEXIST) {
    throwSystemError(errno, "create runtime directory", path);
  }
}

// The one directory a fork server's jail may write: where its spares' clone-blocks make the
// disks' overlays (vmm-core/api/spare_disks.h).
std::string forkServerOverlayDir(const std::string& serverBase) { return serverBase + ".overlays"; }

// A fork server's fork of a template with disks: its spare's overlays move out of the server's
// jail to the fork's own names (where `clone destroy` removes them), and the disk record says
// which name its core knows each by.
void takeSpareDisks(const std::string& templateDir, const vmm::snapshot::Manifest& manifest,
                    const std::string& overlayDir, pid_t pid, const std::string& socket) {
  std::vector<RecordedDisk> images;
  for (size_t i = 0; i < manifest.disks.size(); ++i) {
    const auto& disk = manifest.disks[i];
    if (disk.readOnly) {
      images.push_back({templateDir + "/" + disk.file, "raw"});
      continue;
    }
    std::string spareName = ipc::spareOverlayPath(overlayDir, pid, i);
    std::string forkName = forkDiskOverlayPath(socket, i);
    CLONE_SYSCALL(::rename(spareName.c_str(), forkName.c_str()), "move the spare's overlay", spareName);
    images.push_back({forkName, "qcow2", spareName});
  }
  writeDiskRecord(socket, images);
}

// Connects to this template's fork server, starting it first if none listens. Binding the
// socket decides which of two commands starts it; a socket nobody listens on is a server that
// ended (it cannot remove its socket: nothing in its jail is writable).
UniqueFd connectForkServer(ProcessLauncher& launcher, const std::string& program, const std::string& dir,
                           const vmm::snapshot::VerifiedTemplate& verified, bool copyOnWrite,
                           const ForkCommandOptions& options, const std::string& base) {
  std::string path = base + ".forkserver";
  sockaddr_un address = rpc::unixAddress(path);
  for (int attempt = 0; attempt < 5; ++attempt) {
    UniqueFd client(CLONE_SYSCALL(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0), "create socket", path));
    if (::connect(client.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0) return client;
    if (errno == ECONNREFUSED) {
      ::unlink(path.c_str());
    } else if (errno != ENOENT) {
      throwSystemError(errno, "connect to the fork server", path);
    }
    UniqueFd listener(CLONE_SYSCALL(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0), "create socket", path));
    mode_t oldMask = ::umask(0077);  // only its owner may connect, as bindUnixListener's
    int bound = ::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address));
    int bindError = errno;
    ::umask(oldMask);
    if (bound != 0) {
      if (bindError == EADDRINUSE) continue;  // another command's: connect to it
      throwSystemError(bindError, "bind the fork server's socket", path);
    }
    CLONE_SYSCALL(::listen(listener.get(), 64), "listen", path);
    ForkServerDisks disks;
    if (!verified.manifest.disks.empty()) {
      disks = {siblingProgram("clone-block"), forkServerOverlayDir(base), options.diskFillUpFront};
      makeDirectory(disks.overlayDir);
    }
    auto spec = forkServerProcessSpec("fork-server-" + randomId().substr(5), dir, verified.manifest, base + ".console",
                                      program, copyOnWrite, listener.get(), options.forkServerMaxForks, disks);
    spec.args.insert(spec.args.end(), {"--fork-server-linger", fmt::format("{}", options.forkServerLinger),
                                       "--fork-server-max-forks", std::to_string(options.forkServerMaxForks)});
    try {
      launcher.launch(spec);
    } catch (...) {
      ::unlink(path.c_str());
      throw;
    }
  }
  throw Error(fmt::format("could not reach or start the fork server at {}", path));
}

}  // namespace

void removeEndedForkServers(const std::string& runtime, std::chrono::seconds minAge) {
  std::error_code error;
  auto now = std::filesystem::file_time_type::clock::now();
  for (const auto& entry : std::filesystem::directory_iterator(runtime, error)) {
    std::string name = entry.path().filename().string();
    constexpr std::string_view kSuffix = ".forkserver";
    if (!name.starts_with("fork-server-") || !name.ends_with(kSuffix) || !entry.is_socket(error)) continue;
    auto modified = entry.last_write_time(error);
    if (error || now - modified < minAge) continue;
    std::string path = entry.path().string();
    UniqueFd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    sockaddr_un address = rpc::unixAddress(path);
    if (!probe || ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&address), sizeof(address)) == 0 ||
        errno != ECONNREFUSED) {
      continue;
    }
    ::unlink(path.c_str());
    ::rmdir(forkServerOverlayDir(path.substr(0, path.size() - kSuffix.size())).c_str());  // only if empty
  }
}

namespace {

// --fork-server: this template's fork server (started if none runs) fork()s every fork of
// this command. Each fork's API socket and console log are made here and sent with its request.
std::vector<Fork> startServedForks(ProcessLauncher& launcher, const std::string& program,
                                   const std::string& dir, const vmm::snapshot::VerifiedTemplate& verified,
                                   bool copyOnWrite, const ForkCommandOptions& options,
                                   const std::string& runtime) {
  // --disk-fill-up-front changes only how a template with disks is forked.
  std::string base = forkServerBase(runtime, dir, verified.memoryFile, options.forkMemory, !options.noJail,
                                    options.diskFillUpFront && !verified.manifest.disks.empty());
  std::string serverLog = base + ".console";
  std::string overlayDir = forkServerOverlayDir(base);
  removeEndedForkServers(runtime, std::chrono::seconds(10));
  UniqueFd client = connectForkServer(launcher, program, dir, verified, copyOnWrite, options, base);
  std::vector<Fork> forks;
  std::string serverGone;  // why no more requests can be sent
  for (unsigned i = 0; i < options.count; ++i) {
    std::string id = randomId();
    Fork fork{id, forkSocketPath(options, runtime, id, i), fmt::format("{}/{}.console", runtime, id),
              std::nullopt, std::chrono::steady_clock::now()};
    if (!serverGone.empty()) {
      fork.error = serverGone;
      forks.push_back(std::move(fork));
      continue;
    }
    ipc::ForkRequest request;
    request.forkId = fork.id;
    request.apiSocketName = fork.socket;
    try {
      request.apiListener = rpc::bindUnixListener(fork.socket);
      request.output = UniqueFd(CLONE_SYSCALL(
          ::open(fork.log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600), "create console log", fork.log));
      ipc::sendForkRequest(client.get(), request);
      auto reply = ipc::receiveForkReply(client.get());
      if (!reply.error.empty()) {
        fork.error = "the fork server refused it: " + reply.error;
      } else if (!verified.manifest.disks.empty()) {
        try {
          takeSpareDisks(dir, verified.manifest, overlayDir, reply.pid, fork.socket);
        } catch (const Error& error) {
          // It runs: stopped through its API socket with the other failed forks.
          fork.error = fmt::format("its disks: {}", error.what());
          forks.push_back(std::move(fork));
          continue;
        }
      }
    } catch (const Error& error) {
      serverGone = fmt::format("the fork server did not answer: {}; its log {}:\n{}", error.what(),
                               serverLog, tail(serverLog));
      fork.error = serverGone;
    }
    if (!fork.error.empty()) ::unlink(fork.socket.c_str());
    forks.push_back(std::move(fork));
  }
  return forks;  // hangs up; the server lingers after its last fork and client
}

}  // namespace

Identity forkIdentity(const std::string& forkId) {
  Identity identity;
  identity.hostname = forkId;
  identity.rngSeed = randomSeed(kSeedBytes);
  identity.clock = std::chrono::system_clock::now();
  return identity;
}

std::vector<std::string> identityProblems(const Identity& sent, const IdentityResult& result,
                                          std::chrono::system_clock::time_point hostNow,
                                          std::chrono::milliseconds clockTolerance) {
  std::vector<std::string> problems;
  auto guestErrno = [](int code) { return fmt::format("guest errno {} ({})", code, std::strerror(code)); };
  if (sent.hostname) {
    if (!result.hostnameApplied) {
      problems.push_back("hostname not set: " + guestErrno(result.hostnameError));
    } else if (result.guestHostname != *sent.hostname) {
      problems.push_back(fmt::format("the guest reads hostname '{}', not '{}'", result.guestHostname,
                                     *sent.hostname));
    }
  }
  if (!sent.rngSeed.empty()) {
    // Without the reseed, forks of one template would go on drawing the same random bytes.
    if (!result.seedApplied) {
      problems.push_back("RNG seed not added (RNDADDENTROPY): " + guestErrno(result.seedError));
    } else if (result.reseedError != 0) {
      problems.push_back("CRNG not reseeded (RNDRESEEDCRNG): " + guestErrno(result.reseedError));
    } else if (result.crngReady != 1) {
      problems.push_back(fmt::format("the guest's CRNG is not ready after the seed (crng_ready {})",
                                     result.crngReady));
    }
  }
  if (sent.clock) {
    if (!result.clockApplied) {
      problems.push_back("clock not set: " + guestErrno(result.clockError));
    } else {
      auto off = result.guestClock - hostNow;
      if (off > clockTolerance || -off > clockTolerance) {
        problems.push_back(fmt::format("the guest's clock reads {:.3f} s off the host's",
                                       std::chrono::duration<double>(off).count()));
      }
    }
  }
  return problems;
}

namespace {

// The jail of a core that restores `templateDir`, without its arguments for how it serves.
ProcessSpec restoringCoreSpec(const std::string& id, const std::string& templateDir,
                              const vmm::snapshot::Manifest& manifest, const std::string& consoleLog,
                              const std::string& program, bool copyOnWriteMemory) {
  ProcessSpec spec;
  spec.kind = "vmm";
  spec.id = id;
  spec.program = program;
  spec.readPaths = {templateDir};
  spec.devices = {"/dev/kvm"};
  if (!copyOnWriteMemory) spec.devices.push_back("/dev/userfaultfd");
  if (manifest.hasDevice(vmm::snapshot::kVsockDeviceName)) spec.devices.push_back("/dev/vhost-vsock");
  spec.memoryBytes = manifest.memoryBytes;
  spec.detachedOutput = consoleLog;
  return spec;
}

}  // namespace

ProcessSpec forkProcessSpec(const std::string& forkId, const std::string& templateDir,
                            const vmm::snapshot::Manifest& manifest, const std::string& socket,
                            const std::string& consoleLog, const std::string& program,
                            bool copyOnWriteMemory, int apiFd) {
  ProcessSpec spec = restoringCoreSpec(forkId, templateDir, manifest, consoleLog, program, copyOnWriteMemory);
  // The API socket is bound here and inherited: nothing in the jail is writable, so a
  // compromised core cannot reach other forks' sockets, logs or overlays beside its own.
  spec.args = {"--restore", templateDir, "--api-fd", std::to_string(apiFd), "--api-socket", socket};
  if (copyOnWriteMemory) spec.args.insert(spec.args.end(), {"--fork-memory", "cow"});
  spec.keepFds = {apiFd};
  return spec;
}

std::string forkServerBase(const std::string& runtime, const std::string& templateDir,
                           const vmm::snapshot::FileIdentity& memoryFile, const std::string& forkMemory,
                           bool jailed, bool disksFilledUpFront) {
  // FNV-1a: stable across builds and runs, unlike std::hash.
  std::string key = fmt::format("{}\n{}:{}:{}\n{}\n{}", templateDir, memoryFile.device, memoryFile.inode,
                                memoryFile.ctimeNs, forkMemory, jailed ? "jailed" : "unjailed");
  if (disksFilledUpFront) key += "\ndisks filled up front";
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : key) hash = (hash ^ c) * 0x100000001b3ull;
  return fmt::format("{}/fork-server-{:016x}", runtime, hash);
}

ProcessSpec forkServerProcessSpec(const std::string& serverId, const std::string& templateDir,
                                  const vmm::snapshot::Manifest& manifest,
                                  const std::string& consoleLog, const std::string& program,
                                  bool copyOnWriteMemory, int serverFd, unsigned forks,
                                  const ForkServerDisks& disks) {
  ProcessSpec spec = restoringCoreSpec(serverId, templateDir, manifest, consoleLog, program, copyOnWriteMemory);
  spec.args = {"--restore", templateDir, "--fork-server-fd", std::to_string(serverFd)};
  if (copyOnWriteMemory) spec.args.insert(spec.args.end(), {"--fork-memory", "cow"});
  spec.keepFds = {serverFd};
  if (!manifest.disks.empty()) {
    require(!disks.blockProgram.empty() && !disks.overlayDir.empty(),
            "{} has disks: its fork server needs the disk program and an overlay directory", templateDir);
    spec.args.insert(spec.args.end(), {"--fork-server-block", disks.blockProgram, "--fork-server-overlays",
                                       disks.overlayDir});
    if (disks.fillUpFront) spec.args.push_back("--fork-server-disks-filled-up-front");
    spec.readPaths.push_back(disks.blockProgram);
    spec.writePaths.push_back(disks.overlayDir);
  }
  // Every fork's API socket and log come as fds with its request: still nothing writable.
  spec.memoryBytes = manifest.memoryBytes * forks;
  spec.processes = forks + 1;
  return spec;
}

std::string runtimeDir() {
  std::string dir;
  if (const char* explicitDir = std::getenv("CLONE_RUNTIME_DIR"); explicitDir && *explicitDir) {
    dir = explicitDir;
  } else if (const char* xdg = std::getenv("XDG_RUNTIME_DIR"); xdg && *xdg) {
    dir = std::string(xdg) + "/clone";
  } else {
    dir = fmt::format("/tmp/clone-{}", ::getuid());
  }
  makeDirectory(dir);
  return dir;
}

void addForkCommands(CLI::App& app, ForkCommandOptions& options, Streams streams,
                     ProcessLauncher& jailed) {
  auto* snapshot = app.add_subcommand("snapshot", "write a template of a running VM (pauses it meanwhile)");
  snapshot->add_option("--vm", options.socket, "the VM's API socket")->required();
  snapshot->add_option("--output", options.output, "the template directory to create")->required();
  snapshot->add_flag("--leave-paused", options.leavePaused, "do not resume the VM afterwards");
  snapshot->callback([&options, streams] {
    char resolved[PATH_MAX];
    std::string output = options.output;
    // The VMM may run in another directory: give it an absolute path.
    if (!output.empty() && output[0] != '/' && ::getcwd(resolved, sizeof(resolved)) != nullptr) {
      output = std::string(resolved) + "/" + output;
    }
    // A VM with disks stays paused, its disk queues stopped, until their images are copied
    // into the template; then it runs again (unless --leave-paused or it was paused before).
    bool wasPaused = false;
    uint32_t vhostUserDevices = 0;
    withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
      auto status = vm.statusRequest().send().wait(waitScope).getStatus();
      wasPaused = status.getState() == rpc::VmState::PAUSED;
      vhostUserDevices = status.getVhostUserDevices();
    });
    bool copyDisks = vhostUserDevices > 0;
    OutputDirectory outputDir = openOutputDirectory(output);
    auto start = std::chrono::steady_clock::now();
    try {
      withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
        auto request = vm.snapshotRequest();
        request.setOutputDir(output);
        request.setDirectory(kj::heap<rpc::DirectoryFd>(outputDir.fd.get()));
        request.setLeavePaused(options.leavePaused || copyDisks);
        auto result = request.send().wait(waitScope).getResult();
        streams.out << fmt::format("template {}: {} MiB of memory data, state {} bytes, paused {:.1f} ms\n",
                                   output, result.getMemoryDataBytes() >> 20, result.getStateBytes(),
                                   result.getPausedMs());
      });
    } catch (...) {
      if (outputDir.created) ::rmdir(output.c_str());  // only while still empty
      throw;
    }
    if (!copyDisks) return;
    auto resumeVm = [&] {
      if (options.leavePaused || wasPaused) return;
      withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
        vm.resumeRequest().send().wait(waitScope);
      });
    };
    TemplateDiskCopies copies;
    try {
      copies = copyTemplateDisks(output, readDiskRecord(options.socket), diskRecordPath(options.socket));
    } catch (const std::exception& error) {
      resumeVm();
      throw Error(fmt::format("copying the VM's disks into {}: {} (the template is incomplete and "
                              "cannot be forked)", output, error.what()));
    }
    resumeVm();
    double pausedMs = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    streams.out << fmt::format("template {}: {} disks copied, {} MiB of data; the VM was paused {:.1f} ms in all{}\n",
                               output, copies.disks, copies.dataBytes >> 20, pausedMs,
                               options.leavePaused || wasPaused ? " (and stays paused)" : "");
  });

  auto* forkVerb = app.add_subcommand(
      "fork", "start forks of a template and apply each one's identity in its guest; prints one line per fork: ID SOCKET");
  forkVerb->add_option("--template", options.templateDir, "a directory written by clone snapshot")->required();
  forkVerb->add_option("--count", options.count, "how many forks")->capture_default_str()->check(CLI::Range(1u, 1000u));
  forkVerb->add_option("--api-socket", options.apiSocket,
                   "the fork's API socket (with --count N: PATH.1 .. PATH.N); default: in the runtime directory");
  forkVerb->add_flag("--no-identity", options.noIdentity,
                 "do not apply hostname, RNG seed and clock through the guest agent (forks share the template's)");
  forkVerb->add_flag("--no-jail", options.noJail, "run the forks' cores and disks unjailed (debugging only)");
  forkVerb->add_flag("--disk-fill-up-front", options.diskFillUpFront,
                     "a fork with disks gets all of the template's memory data before its disks "
                     "start, instead of keeping its memory lazy with its core resolving the disks' "
                     "first touches (vhost-user postcopy, the default; docs/FORK.md)");
  forkVerb->add_option("--fork-memory", options.forkMemory,
                       "memfd: each fork's memory is a memfd of its own, filled lazily from the "
                       "template; cow: a copy-on-write mapping of the template's memory file, "
                       "whose pages forks share until they write them (templates without disks "
                       "only; docs/FORK.md)")
      ->check(CLI::IsMember({"memfd", "cow"}))
      ->capture_default_str();
  forkVerb->add_flag("--fork-server", options.forkServer,
                     "fork through this template's fork server, a jailed core that checked the "
                     "template once and fork()s each fork (started if none runs; faster, less memory "
                     "per fork; its forks share its jail; templates without disks; docs/FORK.md)");
  forkVerb->add_option("--fork-server-linger", options.forkServerLinger,
                       "a fork server started by this command ends this many seconds after its last "
                       "fork and client")
      ->check(CLI::Range(0.0, 86400.0))
      ->capture_default_str();
  forkVerb->add_option("--fork-server-max-forks", options.forkServerMaxForks,
                       "forks a fork server started by this command runs at once (its jail's memory "
                       "and pids limits are sized for them)")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  forkVerb->add_option("--disk", options.disks,
                       "N,overlay=PATH: put the fork's overlay of the template's disk N at PATH "
                       "(PATH.1 .. PATH.K with --count K), kept after the fork ends; repeatable")
      ->allow_extra_args(false);
  forkVerb->callback([&options, streams, &jailed] {
    std::string dir = options.templateDir;
    char resolved[PATH_MAX];
    if (::realpath(dir.c_str(), resolved) != nullptr) dir = resolved;
    // Refuse a damaged template here, with the reason, before any fork starts.
    auto verified = vmm::snapshot::verifyTemplate(dir);
    bool copyOnWrite = options.forkMemory == "cow";
    require(!copyOnWrite || verified.manifest.disks.empty(),
            "--fork-memory cow: {} has {} disks, whose clone-block processes must map the fork's "
            "memory; fork it with --fork-memory memfd",
            dir, verified.manifest.disks.size());
    std::string runtime = runtimeDir();
    DirectLauncher direct;
    ProcessLauncher& launcher = options.noJail ? static_cast<ProcessLauncher&>(direct) : jailed;
    if (options.noJail) streams.err << "clone: warning: --no-jail: the forks run without their sandbox\n";
    std::string program = siblingProgram("clone-vmm");
    std::vector<ForkDiskOption> diskOptions;
    for (const auto& value : options.disks) diskOptions.push_back(parseForkDiskOption(value));
    std::vector<Fork> forks;
    if (options.forkServer) {
      require(diskOptions.empty(),
              "--fork-server: --disk is for forks started one core each: a server's forks get "
              "overlays of their own in the server's directory (docs/FORK.md)");
      forks = startServedForks(launcher, program, dir, verified, copyOnWrite, options, runtime);
    }
    for (unsigned i = 0; i < options.count && !options.forkServer; ++i) {
      std::string id = randomId();
      std::string socket = forkSocketPath(options, runtime, id, i);
      std::string log = fmt::format("{}/{}.console", runtime, id);
      auto spawnedAt = std::chrono::steady_clock::now();
      // Each disk: an overlay of its own and a clone-block serving it, before the core.
      ForkDisks disks = startForkDisks(launcher, siblingProgram("clone-block"), id, dir,
                                       verified.manifest, socket, diskOptions, i + 1, options.count,
                                       !options.diskFillUpFront);
      auto abandonDisks = [&disks] {
        disks.closeCoreEnds();
        for (const auto& overlay : disks.createdOverlays) ::unlink(overlay.c_str());
      };
      UniqueFd api;
      try {
        api = rpc::bindUnixListener(socket);
        if (!disks.images.empty()) writeDiskRecord(socket, disks.images);
      } catch (...) {
        abandonDisks();
        throw;
      }
      auto spec = forkProcessSpec(id, dir, verified.manifest, socket, log, program, copyOnWrite,
                                  api.get());
      spec.args.insert(spec.args.end(), disks.vmmArgs.begin(), disks.vmmArgs.end());
      for (int fd : disks.keepFds()) spec.keepFds.push_back(fd);
      pid_t pid = -1;
      try {
        pid = launcher.launch(spec);
      } catch (...) {
        abandonDisks();
        ::unlink(socket.c_str());
        removeDiskRecord(socket);
        throw;
      }
      disks.closeCoreEnds();
      api = UniqueFd();  // the core's now: the socket closes when the core ends
      forks.push_back({id, socket, log, pid, spawnedAt});
      forks.back().diskLogs = disks.logs;
    }
    // Each fork is brought up on its own thread: one slow guest does not hold up the others.
    std::vector<std::thread> threads;
    for (auto& fork : forks) {
      if (!fork.error.empty()) continue;  // the fork server refused it
      threads.emplace_back([&fork, applyIdentity = !options.noIdentity] {
        try {
          auto sinceSpawn = [&] {
            return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() -
                                                             fork.spawnedAt).count();
          };
          fork.cid = waitReady(fork.pid, fork.socket, fork.log);
          fork.apiMs = sinceSpawn();
          if (applyIdentity && fork.cid != 0) {
            applyForkIdentity(fork.id, fork.cid, kAgentTimeout);
            fork.identityApplied = true;
          }
          fork.readyMs = sinceSpawn();
        } catch (const std::exception& error) {
          fork.error = error.what();
        }
      });
    }
    for (auto& thread : threads) thread.join();
    // Before the forks are handed out: the record then holds only what the template's own
    // code touched, nothing a tenant's commands did.
    std::string workingSetPath = dir + "/" + vmm::snapshot::kWorkingSetFile;
    if (::access(workingSetPath.c_str(), F_OK) != 0) {
      auto recorder = std::find_if(forks.begin(), forks.end(),
                                   [](const Fork& f) { return f.error.empty(); });
      if (recorder != forks.end()) {
        // Later forks are asked for identity and then for commands: the record holds the
        // guest's exec path too (without it, each disk fork met ~130 nested page faults in
        // the lab after its request: docs/FORK.md).
        if (recorder->cid != 0) execTrueForTheRecord(recorder->id, recorder->cid, streams.err);
        // A fork without a jail writes the file itself, once this ends its window.
        saveTemplateWorkingSet(dir, verified.manifest.memorySize, recorder->id, recorder->socket,
                               streams.err);
      }
    }

    if (!options.noIdentity &&
        std::any_of(forks.begin(), forks.end(), [](const Fork& f) { return f.error.empty() && f.cid == 0; })) {
      streams.err << "clone fork: the template has no vsock device (started with --no-vsock?): "
                     "identity not applied, forks keep the template's hostname, RNG state and clock\n";
    }
    unsigned failed = 0;
    for (auto& fork : forks) {
      if (!fork.error.empty()) {
        ++failed;
        stopFork(fork.pid, fork.socket);
        streams.err << fmt::format("clone fork: {} failed and was stopped (console log {}): {}\n",
                                   fork.id, fork.log, fork.error);
        streams.err << fmt::format("clone fork: {}: the end of its console log:\n{}\n", fork.id,
                                   tail(fork.log));
        for (const auto& diskLog : fork.diskLogs) {
          streams.err << fmt::format("clone fork: {}: its disk's log {}:\n{}\n", fork.id, diskLog,
                                     tail(diskLog));
        }
        // Its overlays and disk record go; the logs stay to be read.
        for (size_t d = 0; d < verified.manifest.disks.size(); ++d) {
          ::unlink(forkDiskOverlayPath(fork.socket, d).c_str());
        }
        removeDiskRecord(fork.socket);
        continue;
      }
      // Latency on stderr, stdout stays "ID SOCKET" for scripts.
      if (fork.identityApplied) {
        streams.err << fmt::format(
            "fork {}: ready (agent answered, identity applied) {:.1f} ms after spawn; API answered after {:.1f} ms\n",
            fork.id, fork.readyMs, fork.apiMs);
      } else {
        streams.err << fmt::format("fork {}: ready (API answered, no identity) {:.1f} ms after spawn\n",
                                   fork.id, fork.readyMs);
      }
      streams.out << fork.id << " " << fork.socket << "\n";
    }
    streams.out.flush();
    require(failed == 0, "{} of {} forks failed (see above); the others run", failed, forks.size());
  });

  auto* list = app.add_subcommand("list", "list the VMs whose API sockets are in the runtime directory");
  list->callback([streams] {
    std::string runtime = runtimeDir();
    DIR* dir = ::opendir(runtime.c_str());
    if (dir == nullptr) throwSystemError(errno, "open runtime directory", runtime);
    std::vector<std::string> sockets;
    while (dirent* entry = ::readdir(dir)) {
      std::string name = entry->d_name;
      if (name.size() > 5 && name.ends_with(".sock")) sockets.push_back(name);
    }
    ::closedir(dir);
    std::sort(sockets.begin(), sockets.end());
    streams.out << fmt::format("{:<16} {:<9} {:>7} {:>8} {}\n", "ID", "STATE", "PID", "MEM_MIB", "SOCKET");
    for (const auto& name : sockets) {
      std::string path = runtime + "/" + name;
      std::string id = name.substr(0, name.size() - 5);
      try {
        withVm(path, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
          auto status = vm.statusRequest().send().wait(waitScope).getStatus();
          streams.out << fmt::format("{:<16} {:<9} {:>7} {:>8} {}\n", id, stateName(status.getState()),
                                     status.getPid(), status.getMemoryMib(), path);
        });
      } catch (const Error&) {
        streams.out << fmt::format("{:<16} {:<9} {:>7} {:>8} {}\n", id, "gone", "-", "-", path);
      }
    }
  });

  auto* destroy = app.add_subcommand("destroy", "end a VM now (no guest shutdown) and wait for it to go");
  destroy->add_option("--vm", options.socket, "the VM's API socket")->required();
  destroy->callback([&options, streams] {
    // A VM that ended by itself (`clone list` says "gone") left its socket and files: remove them.
    struct stat info {};
    bool ended = ::lstat(options.socket.c_str(), &info) == 0 && S_ISSOCK(info.st_mode) &&
                 !rpc::someoneListens(options.socket);
    if (!ended) {
      withVm(options.socket, [&](rpc::VmControl::Client& vm, kj::WaitScope& waitScope) {
        auto request = vm.shutdownRequest();
        request.setGraceful(false);
        request.send().wait(waitScope);
      });
    }
    // Gone when nobody listens on its API socket any more: the core held the only listening
    // fd. (Its pid would not do: a jailed core is pid 1 of its own namespace.) A socket bound
    // by `clone fork` or `clone run` is removed here; a core that made its own removed it.
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (rpc::someoneListens(options.socket) && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(5ms);
    }
    require(!rpc::someoneListens(options.socket), "{}: the VM did not end within 10 s",
            options.socket);
    ::unlink(options.socket.c_str());
    // The log of a fork started by `clone fork` is not needed once it is gone.
    std::string socket = options.socket;
    if (socket.ends_with(".sock")) ::unlink((socketFileBase(socket) + ".console").c_str());
    // Its disks' overlays and logs (clone-block ends with the core).
    removeForkDiskFiles(socket);
    streams.out << (ended ? "destroyed (it had already ended)\n" : "destroyed\n");
  });
}

}  // namespace clonevm::cli
