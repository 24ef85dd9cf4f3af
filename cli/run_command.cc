#include "cli/run_command.h"

#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <optional>

#include "cli/direct_launcher.h"
#include "cli/disk_record.h"
#include "cli/disks.h"
#include "cli/program_path.h"
#include "cli/vmm_process.h"
#include "common/error.h"
#include "common/unique_fd.h"
#include "ipc/capnp/rpc_socket.h"


namespace clonevm::cli {
namespace {

// The image= and format= of each --vhost-user-blk value, as the core records them (format
// "auto" when not given; no image: the core refuses to snapshot that disk anyway).
std::vector<RecordedDisk> recordedDisks(const std::vector<std::string>& vhostUserBlk) {
  std::vector<RecordedDisk> disks;
  for (const auto& value : vhostUserBlk) {
    RecordedDisk disk{"", "auto"};
    size_t at = value.find(',');
    while (at != std::string::npos) {
      size_t end = value.find(',', at + 1);
      std::string option = value.substr(at + 1, end == std::string::npos ? end : end - at - 1);
      if (option.starts_with("image=")) disk.image = option.substr(6);
      if (option.starts_with("format=")) disk.format = option.substr(7);
      at = end;
    }
    disks.push_back(disk);
  }
  return disks;
}

int waitForExit(pid_t pid, const std::string& program) {
  int status = 0;
  CLONE_SYSCALL(::waitpid(pid, &status, 0), "wait for", program);
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + WTERMSIG(status);
}

}  // namespace

std::vector<std::string> vmmArguments(const RunOptions& options,
                                      const std::vector<std::string>& globalArgs) {
  std::vector<std::string> args = globalArgs;
  args.insert(args.end(), {"--kernel", options.kernel, "--mem-mb",
                           std::to_string(options.memoryMib), "--vcpus",
                           std::to_string(options.vcpus)});
  if (!options.initrd.empty()) args.insert(args.end(), {"--initrd", options.initrd});
  if (!options.cmdline.empty()) args.insert(args.end(), {"--cmdline", options.cmdline});
  if (options.verbose) args.push_back("--verbose");
  if (options.seccomp != "kill") args.insert(args.end(), {"--seccomp", options.seccomp});
  if (!options.apiSocket.empty()) args.insert(args.end(), {"--api-socket", options.apiSocket});
  for (const auto& value : options.vhostUserBlk) args.insert(args.end(), {"--vhost-user-blk", value});
  for (const auto& value : options.vhostUserFs) args.insert(args.end(), {"--vhost-user-fs", value});
  if (options.vsockCid != 0) args.insert(args.end(), {"--vsock-cid", std::to_string(options.vsockCid)});
  if (options.noVsock) args.push_back("--no-vsock");
  return args;
}

void addRunCommand(CLI::App& app, RunOptions& options, const GlobalOptions& global,
                   Streams streams, int& exitCode, ProcessLauncher& jailed) {
  auto* run = app.add_subcommand("run", "boot a VM from a Linux kernel; its serial console is this terminal");
  run->add_option("--kernel", options.kernel, "bzImage or ELF vmlinux")->required();
  run->add_option("--initrd", options.initrd, "initial ramdisk");
  run->add_option("--cmdline", options.cmdline, "kernel command line (default: console=ttyS0 panic=-1)");
  run->add_option("--mem-mb", options.memoryMib, "guest memory in MiB")->capture_default_str();
  run->add_option("--vcpus", options.vcpus, "number of vCPUs")->capture_default_str();
  run->add_flag("--no-jail", options.noJail, "run every process unjailed (debugging only)");
  run->add_option("--api-socket", options.apiSocket,
                  "serve the VM control API here (clone status|pause|resume|shutdown --vm)");
  run->add_option("--vhost-user-blk", options.vhostUserBlk,
                  "SOCKET[,queues=N]: a disk served by a vhost-user-blk back-end; repeatable")
      ->allow_extra_args(false);
  run->add_option("--vhost-user-fs", options.vhostUserFs,
                  "SOCKET:TAG[,queues=N]: a virtio-fs share served by a vhost-user-fs back-end "
                  "(mount -t virtiofs TAG in the guest); repeatable")
      ->allow_extra_args(false);
  run->add_option("--disk", options.disks,
                  "PATH[,readonly][,overlay][,format=raw|qcow2|auto]: a disk served by clone-block "
                  "(overlay: writes go to a temporary qcow2 over PATH); repeatable")
      ->allow_extra_args(false);
  run->add_option("--vsock-cid", options.vsockCid,
                  "the guest's vsock CID, 3..4294967294 (default: a free one, automatically)");
  run->add_flag("--no-vsock", options.noVsock, "no vsock device (no guest agent, no clone exec)");
  run->add_flag("--verbose", options.verbose, "print a boot-time breakdown to stderr");
  run->add_option("--seccomp", options.seccomp,
                  "kill|log|off: what a syscall outside a process's seccomp policy does "
                  "(log: allowed and logged to the kernel audit log; docs/JAILER.md)")
      ->capture_default_str();
  run->callback([&options, &global, streams, &exitCode, &jailed] {
    DirectLauncher direct;
    ProcessLauncher* launcher = options.noJail ? static_cast<ProcessLauncher*>(&direct) : &jailed;
    if (options.noJail) {
      streams.err << "clone: warning: --no-jail: the VMM runs without its sandbox\n";
    }
    // Device processes first (each through the same launcher as the core), then the core.
    RunOptions vmmOptions = options;
    std::optional<DiskProcesses> disks;
    if (!options.disks.empty()) {
      auto blockArgs = global.toArgs();
      if (options.seccomp != "kill") blockArgs.insert(blockArgs.end(), {"--seccomp", options.seccomp});
      disks.emplace(*launcher, siblingProgram("clone-block"), fmt::format("vm-{}", ::getpid()),
                    std::move(blockArgs));
      for (const auto& value : options.disks) {
        std::string socket = disks->start(parseDiskOption(value));
        const auto& served = disks->lastServed();
        vmmOptions.vhostUserBlk.push_back(
            fmt::format("{},image={},format={}", socket, served.path, served.format));
      }
    }
    // The API socket is bound here and inherited by the core (docs/JAILER.md); removed when
    // the VM has ended.
    UniqueFd api;
    std::string apiSocket;
    if (!options.apiSocket.empty()) {
      apiSocket = std::filesystem::absolute(options.apiSocket).lexically_normal().string();
      api = rpc::bindUnixListener(apiSocket);
      // Which images the disks are, where the core cannot write: `clone snapshot` copies
      // only these (cli/disk_record.h).
      if (!vmmOptions.vhostUserBlk.empty()) writeDiskRecord(apiSocket, recordedDisks(vmmOptions.vhostUserBlk));
    }
    auto spec = vmmProcessSpec(vmmOptions, global.toArgs(), siblingProgram("clone-vmm"), api.get());
    auto removeApiFiles = [&apiSocket] {
      if (apiSocket.empty()) return;
      ::unlink(apiSocket.c_str());
      removeDiskRecord(apiSocket);
    };
    pid_t pid = -1;
    try {
      pid = launcher->launch(spec);
    } catch (...) {
      removeApiFiles();
      throw;
    }
    api = UniqueFd();
    exitCode = waitForExit(pid, options.noJail ? spec.program : "clone-jailer");
    removeApiFiles();
  });
}

}  // namespace clonevm::cli
