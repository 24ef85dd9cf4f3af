// clone-vmm: the core process of one VM.
//
// Exit codes (docs/VMM.md): 0 guest powered off; 1 error (bad input or setup failure);
// 2 bad command line; 3 guest reset (reboot); 4 guest triple fault; 5 internal error.
#include <fcntl.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

#include <fstream>
#include <iostream>
#include <optional>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "common/error.h"
#include "common/log.h"
#include "common/unique_fd.h"
#include "jailer/seccomp/seccomp_policy.h"
#include "vmm-core/api/fork_server.h"
#include "vmm-core/api/spare_disks.h"
#include "vmm-core/api/vm_api_server.h"
#include "vmm-core/snapshot/template_files.h"
#include "vmm-core/vm/machine.h"
#include "vmm-core/vm/vmm_exit_codes.h"

namespace clonevm::vmm {
namespace {

uint64_t hostMemoryBytes() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t kib = 0;
  while (meminfo >> key >> kib) {
    if (key == "MemTotal:") return kib * 1024;
    meminfo.ignore(64, '\n');
  }
  return 0;
}

void validate(const MachineConfig& config, const KvmSystem& kvm) {
  constexpr uint64_t kMinMemory = 32ull << 20;
  require(config.memoryBytes >= kMinMemory, "--mem-mb {} is too small (minimum {})",
          config.memoryBytes >> 20, kMinMemory >> 20);
  uint64_t host = hostMemoryBytes();
  require(host == 0 || config.memoryBytes <= host,
          "--mem-mb {} is more than this host's memory ({} MiB)", config.memoryBytes >> 20,
          host >> 20);
  // xAPIC ids are 8 bits and 0xff is broadcast.
  uint32_t maxVcpus = std::min<uint32_t>(static_cast<uint32_t>(kvm.maxVcpus()), 254);
  require(config.vcpuCount >= 1 && config.vcpuCount <= maxVcpus,
          "--vcpus {} is out of range (1 to {} on this host)", config.vcpuCount, maxVcpus);
}

void printTimings(const BootTimings& t) {
  std::cerr << fmt::format(
      "clone-vmm: boot timing (ms since start): memory {:.2f}, irqchip {:.2f}, kernel loaded "
      "{:.2f}, ACPI {:.2f}, vCPUs {:.2f}, first vCPU entry {:.2f}\n",
      t.memoryReady, t.irqchipReady, t.kernelLoaded, t.acpiWritten, t.vcpusReady,
      t.firstVcpuEntry);
}

int runVmm(int argc, char** argv) {
  auto start = Machine::Clock::now();
  CLI::App app{"clone-vmm: the core process of one Clone VM", "clone-vmm"};
  MachineConfig config;
  uint64_t memoryMib = 512;
  std::string logLevel = "info";
  bool logJson = false;
  bool verbose = false;
  std::string restoreDir;
  auto* kernel = app.add_option("--kernel", config.kernelPath, "bzImage or ELF vmlinux");
  app.add_option("--restore", restoreDir,
                 "build the VM from this template directory (clone snapshot) instead of "
                 "booting a kernel: a fork")
      ->excludes(kernel);
  std::string forkMemory = "memfd";
  app.add_option("--fork-memory", forkMemory,
                 "memfd|cow: with --restore, guest RAM is a memfd of the fork's own filled "
                 "lazily from the template (memfd), or a copy-on-write mapping of the template's "
                 "memory file whose unwritten pages every fork shares (cow; no disks) "
                 "(docs/FORK.md)")
      ->check(CLI::IsMember({"memfd", "cow"}))
      ->capture_default_str();
  app.add_option("--initrd", config.initrdPath, "initial ramdisk");
  app.add_option("--cmdline", config.cmdline, "kernel command line")->capture_default_str();
  app.add_option("--mem-mb", memoryMib, "guest memory in MiB")->capture_default_str();
  app.add_option("--vcpus", config.vcpuCount, "number of vCPUs")->capture_default_str();
  std::vector<std::string> vhostUserBlk;
  std::vector<std::string> vhostUserFs;
  app.add_option("--vhost-user-blk", vhostUserBlk,
                 "SOCKET[,queues=N]: a virtio-blk disk served by a vhost-user back-end "
                 "(qemu-storage-daemon, ...); repeatable")
      ->allow_extra_args(false);
  app.add_option("--vhost-user-fs", vhostUserFs,
                 "SOCKET:TAG[,queues=N]: a virtio-fs share served by a vhost-user back-end "
                 "(virtiofsd, ...), mounted in the guest as TAG; repeatable")
      ->allow_extra_args(false);
  uint64_t vsockCid = 0;
  bool noVsock = false;
  app.add_option("--vsock-cid", vsockCid,
                 "the guest's vsock CID, 3..4294967294 (default: a free one chosen automatically)");
  app.add_flag("--no-vsock", noVsock, "no virtio-vsock device (and so no guest agent)");
  std::string apiSocket;
  app.add_option("--api-socket", apiSocket,
                 "serve the VM control API (Cap'n Proto) on this unix socket (created here, removed "
                 "on exit); with --api-fd, only that socket's name");
  int apiFd = -1;
  app.add_option("--api-fd", apiFd,
                 "serve the API on this inherited listening unix socket instead (clone run and "
                 "clone fork bind it, so that a jailed core needs no writable directory)")
      ->check(CLI::Range(3, 1 << 20));
  int forkServerFd = -1;
  app.add_option("--fork-server-fd", forkServerFd,
                 "with --restore: serve fork requests on this inherited SOCK_SEQPACKET socket, "
                 "listening or connected; each one fork()s a VM from the template, which this "
                 "process checked once (docs/FORK.md); ends when its forks have ended and, connected, "
                 "its client hung up, or, listening, --fork-server-linger after its last client")
      ->check(CLI::Range(3, 1 << 20))
      ->needs("--restore")
      ->excludes("--api-fd")
      ->excludes("--api-socket")
      ->excludes("--vsock-cid");
  double forkServerLinger = 60;
  ForkServerLimits forkServerLimits;
  app.add_option("--fork-server-linger", forkServerLinger,
                 "with a listening --fork-server-fd: seconds the server waits with no fork and no "
                 "client before it ends")
      ->check(CLI::Range(0.0, 86400.0))
      ->capture_default_str();
  app.add_option("--fork-server-max-forks", forkServerLimits.maxForks,
                 "forks a fork server runs at once; further requests are refused")
      ->check(CLI::Range(1u, 4096u))
      ->capture_default_str();
  app.add_option("--fork-server-spare", forkServerLimits.keepSpare,
                 "true|false: the fork server keeps one fork prepared ahead (VM restored, not run) "
                 "that the next request makes a fork")
      ->capture_default_str();
  unsigned spareDelayMs = 300;
  app.add_option("--fork-server-spare-delay-ms", spareDelayMs,
                 "a fork server prepares its next spare this long after handing out a fork, so "
                 "that the spare's restore does not compete with that fork's first answers; a "
                 "request that comes meanwhile starts its spare at once (docs/FORK.md)")
      ->check(CLI::Range(0u, 60000u))
      ->capture_default_str();
  bool sparePrefault = true;
  app.add_option("--fork-server-prefault", sparePrefault,
                 "true|false: a fork server's spare reads the template's working set into KVM's "
                 "nested page tables while it waits (docs/FORK.md)")
      ->capture_default_str();
  SpareDiskOptions spareDisks;
  app.add_option("--fork-server-block", spareDisks.blockProgram,
                 "with --fork-server-fd and a template with disks: the clone-block each spare "
                 "starts for each disk, inside this jail (docs/FORK.md)")
      ->needs("--fork-server-fd");
  app.add_option("--fork-server-overlays", spareDisks.overlayDir,
                 "with --fork-server-block: the writable directory where those clone-blocks make "
                 "the disks' overlays")
      ->needs("--fork-server-block");
  bool spareDisksFilledUpFront = false;
  app.add_flag("--fork-server-disks-filled-up-front", spareDisksFilledUpFront,
               "with --fork-server-block: the spares' clone-blocks do not do vhost-user postcopy, "
               "and each spare fills all of its memory up front (docs/FORK.md)")
      ->needs("--fork-server-block");
  bool spareRuns = true;
  app.add_option("--fork-server-spare-runs", spareRuns,
                 "true|false: a fork server's spare runs its guest (under the seccomp policy, with a "
                 "CID of its own) while it waits, so that its request finds the guest running; "
                 "false: the guest runs only once the request has come (docs/FORK.md)")
      ->capture_default_str();
  app.add_option("--log-level", logLevel, "trace|debug|info|warn|error|off");
  app.add_flag("--log-json", logJson, "log one JSON object a line");
  app.add_flag("--verbose", verbose, "print a boot-time breakdown to stderr");
  std::string seccompMode = "kill";
  app.add_option("--seccomp", seccompMode,
                 "kill|log|off: the seccomp policy installed before the vCPUs run; log lets "
                 "violations through and logs them to the kernel audit log (docs/JAILER.md)")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    int code = app.exit(error);
    return code == 0 ? 0 : kExitUsage;
  }

  try {
    auto log = makeLogger("vmm", {parseLogLevel(logLevel), logJson ? LogFormat::kJson : LogFormat::kText});
    require(memoryMib <= (1ull << 34), "--mem-mb {} is out of range", memoryMib);
    config.memoryBytes = ((memoryMib + 1) / 2 * 2) << 20;  // whole 2 MiB pages
    for (const auto& value : vhostUserBlk) {
      config.vhostUserDevices.push_back(parseVhostUserBlkOption(value));
    }
    for (const auto& value : vhostUserFs) {
      config.vhostUserDevices.push_back(parseVhostUserFsOption(value));
    }
    require(!(noVsock && vsockCid != 0), "--vsock-cid and --no-vsock exclude each other");
    config.vsock.enabled = !noVsock;
    config.vsock.guestCid = vsockCid;
    // Without the module the VM still boots, unless a CID was asked for.
    if (config.vsock.enabled && vsockCid == 0 && ::access(config.vsock.devicePath.c_str(), F_OK) != 0) {
      log->warn("{} is missing (modprobe vhost_vsock): no vsock device, so no guest agent",
                config.vsock.devicePath);
      config.vsock.enabled = false;
    }
    auto seccomp = seccomp::parseMode(seccompMode);
    std::optional<snapshot::VerifiedTemplate> source;
    bool sparesStartDisks = false;  // a fork server's spares start the template's disks
    if (!restoreDir.empty()) {
      require(vhostUserFs.empty(), "--restore: templates hold no virtio-fs shares (docs/FORK.md)");
      source = snapshot::verifyTemplate(restoreDir);
      // One --vhost-user-blk a template disk, in its order: the fork's clone-block serving an
      // overlay over that disk (clone fork does this).
      const auto& disks = source->manifest.disks;
      // A fork server's spares start their own (--fork-server-block).
      sparesStartDisks = forkServerFd >= 0 && config.vhostUserDevices.empty() && !disks.empty();
      require(sparesStartDisks || config.vhostUserDevices.size() == disks.size(),
              "--restore {}: the template has {} disks, {} --vhost-user-blk given (one each, in "
              "order)", restoreDir, disks.size(), config.vhostUserDevices.size());
      if (sparesStartDisks) {
        require(!spareDisks.blockProgram.empty() && !spareDisks.overlayDir.empty(),
                "--fork-server-fd: {} has {} disks; its spares start them, given --fork-server-block "
                "and --fork-server-overlays", restoreDir, disks.size());
        spareDisks.postcopy = !spareDisksFilledUpFront;
        forkServerLimits.spareEnded = [dir = spareDisks.overlayDir, count = disks.size()](pid_t pid) {
          removeSpareOverlays(dir, pid, count);
        };
      } else {
        for (size_t i = 0; i < disks.size(); ++i) config.vhostUserDevices[i].queues = disks[i].queues;
      }
      config.memoryBytes = source->manifest.memoryBytes;
      config.vcpuCount = source->manifest.vcpus;
      config.cmdline = source->manifest.cmdline;
      config.kernelPath = source->manifest.kernel;
      config.initrdPath = source->manifest.initrd;
      config.restoreFrom = &*source;
      config.copyOnWriteMemory = forkMemory == "cow";  // Machine refuses it with disks
      // The fork has the template's devices; its vsock device gets a CID of its own.
      config.vsock.enabled = source->manifest.hasDevice(snapshot::kVsockDeviceName);
      config.vsock.guestCid = vsockCid;
      require(!(noVsock && config.vsock.enabled),
              "--no-vsock: the template has a vsock device, so its forks need one");
    } else {
      require(!config.kernelPath.empty(), "--kernel or --restore is required");
      require(forkMemory == "memfd", "--fork-memory {} needs --restore", forkMemory);
    }
    KvmSystem kvm;
    validate(config, kvm);
    std::optional<SpareFork> spare;
    if (forkServerFd >= 0) {
      forkServerLimits.linger = std::chrono::milliseconds(static_cast<int64_t>(forkServerLinger * 1000));
      forkServerLimits.spareDelay = std::chrono::milliseconds(spareDelayMs);
      spare = serveForks(forkServerFd, forkServerLimits, *log);
      if (!spare) return kExitPowerOff;  // the server is done
      // A spare: it restores the VM now, with a CID of its own until its request names the
      // fork's; its timings start here. No input, as a detached core has none.
      start = Machine::Clock::now();
      config.vsock.guestCid = 0;
      config.vsockCidLater = true;
      if (sparesStartDisks) {
        config.vhostUserDevices = startSpareDisks(spareDisks, restoreDir, source->manifest.disks, *log);
      }
      UniqueFd noInput(CLONE_SYSCALL(::open("/dev/null", O_RDONLY | O_CLOEXEC), "spare: open", "/dev/null"));
      CLONE_SYSCALL(::dup2(noInput.get(), STDIN_FILENO), "spare: take /dev/null as its input");
    }
    std::optional<Machine> restored;
    std::string restoreError;  // a spare's: reported in the log of the fork it was for
    try {
      restored.emplace(config, kvm, *log, start);
    } catch (const std::exception& error) {
      if (!spare) throw;
      restoreError = error.what();
      log->error("spare: the restore failed; the fork it is for will end with the reason: {}", restoreError);
    }
    auto lockdown = [seccomp] { seccomp::install(seccomp::Kind::kVmm, seccomp); };
    // A running spare's event loop for the API it serves once it is a fork: set up before the
    // seccomp policy, which lacks the calls kj::setupAsyncIo() makes.
    std::optional<kj::AsyncIoContext> spareIo;
    double runningSinceMs = 0;
    if (spare) {
      spare->announce(restoreError.empty() && restored->vsock() ? restored->vsock()->guestCid() : 0);
      if (restoreError.empty() && sparePrefault) {
        restored->prefaultWorkingSet([&] { return spare->requestWaiting(); });
      }
      if (restoreError.empty() && spareRuns && !spare->requestWaiting()) {
        restored->assignForkVsockCid(0);  // the guest learns the spare's CID now
        spareIo.emplace(kj::setupAsyncIo());
        restored->setLockdown(lockdown);
        restored->startAhead();
        runningSinceMs = std::chrono::duration<double, std::milli>(Machine::Clock::now() - start).count();
        log->info("spare: its guest runs ({:.1f} ms after the fork server started this process)", runningSinceMs);
      }
      auto request = spare->takeRequest();
      if (!request) return kExitPowerOff;  // the server ended before it needed this spare
      // A fork now: its own output, API socket and CID. dup3: the seccomp policy has no dup2.
      CLONE_SYSCALL(::dup3(request->output.get(), STDOUT_FILENO, 0), "fork: take its output");
      CLONE_SYSCALL(::dup3(request->output.get(), STDERR_FILENO, 0), "fork: take its output");
      request->output.reset();
      if (!restoreError.empty()) {
        std::cerr << "clone-vmm: fork " << request->forkId << ": " << restoreError << "\n";
        return kExitError;
      }
      apiFd = request->apiListener.release();
      apiSocket = request->apiSocketName;
      log->info("fork {}: took its request {:.1f} ms after the fork server started this process (VM "
                "restored at {:.1f} ms{})", request->forkId,
                std::chrono::duration<double, std::milli>(Machine::Clock::now() - start).count(),
                restored->timings().vcpusReady,
                spareIo ? fmt::format(", its guest running since {:.1f} ms", runningSinceMs) : "");
      // The memory mapping was made from the file the server checked; refuse if it changed since.
      snapshot::recheckTemplate(*source);
      restored->assignForkVsockCid(request->vsockCid);
      if (spareIo) restored->recordWorkingSet();  // the fork's first second, if it records
    }
    Machine& machine = *restored;
    machine.setLockdown(lockdown);
    bool serveApi = !apiSocket.empty() || apiFd >= 0;
    std::string apiName = apiSocket.empty() ? fmt::format("fd {}", apiFd) : apiSocket;
    ExitReason reason = serveApi ? runWithApi(machine, {apiName, apiFd}, *log, spareIo ? &*spareIo : nullptr)
                                 : machine.run();
    if (verbose) printTimings(machine.timings());
    if (!machine.exitDetail().empty()) log->info("{}: {}", describe(reason), machine.exitDetail());
    return exitCodeFor(reason);
  } catch (const std::exception& error) {
    std::cerr << "clone-vmm: " << error.what() << "\n";
    return kExitError;
  }
}

}  // namespace
}  // namespace clonevm::vmm

// A fork's private memory is mostly what its process touches, so keep the VMM's own small:
// one malloc arena (its few threads allocate little), and 1 MiB thread stacks (std::thread
// takes the default): an 8 MiB stack can hold a 2 MiB-aligned range, which transparent huge
// pages back with 2 MiB on the first touch (measured: 2 MiB per fork).
void limitProcessMemory() {
  ::mallopt(M_ARENA_MAX, 1);
  pthread_attr_t attributes;
  if (::pthread_attr_init(&attributes) == 0) {
    ::pthread_attr_setstacksize(&attributes, 1 << 20);
    ::pthread_setattr_default_np(&attributes);
    ::pthread_attr_destroy(&attributes);
  }
}

// A core that dies of a signal says so on stderr (its log) before it dies: which signal and
// which address. Only async-signal-safe calls, and none the seccomp policy lacks: the handler
// returns, the faulting instruction runs again and the default action (SA_RESETHAND) kills
// the process with the same signal. (A stack overflow has no stack left to run this on and
// still dies silently.)
void reportFatalSignal(int signal, siginfo_t* info, void*) {
  char text[160];
  size_t length = 0;
  auto put = [&](const char* part) {
    while (*part != '\0' && length < sizeof(text) - 1) text[length++] = *part++;
  };
  auto putHex = [&](uintptr_t value) {
    char digits[2 + 2 * sizeof(value) + 1] = "0x";
    for (size_t i = 0; i < 2 * sizeof(value); ++i) {
      digits[2 + i] = "0123456789abcdef"[(value >> (4 * (2 * sizeof(value) - 1 - i))) & 0xf];
    }
    digits[sizeof(digits) - 1] = '\0';
    put(digits);
  };
  put("clone-vmm: fatal signal ");
  put(::sigabbrev_np(signal) != nullptr ? ::sigabbrev_np(signal) : "?");
  put(" at address ");
  putHex(reinterpret_cast<uintptr_t>(info->si_addr));
  put("\n");
  (void)!::write(STDERR_FILENO, text, length);
  // Sent, not raised by a fault (kill, abort): nothing runs again, so send it once more.
  if (info->si_code <= 0) ::raise(signal);
}

void reportFatalSignals() {
  struct sigaction action {};
  action.sa_sigaction = reportFatalSignal;
  action.sa_flags = SA_SIGINFO | SA_RESETHAND;
  for (int signal : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT}) ::sigaction(signal, &action, nullptr);
}

int main(int argc, char** argv) {
  reportFatalSignals();
  limitProcessMemory();
  return clonevm::vmm::runVmm(argc, argv);
}
