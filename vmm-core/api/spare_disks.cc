#include "vmm-core/api/spare_disks.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>

#include "common/error.h"
#include "common/unique_fd.h"

extern char** environ;

namespace clonevm::vmm {
namespace {

// The fd number clone-block is given its end of the socket pair on.
constexpr int kBlockSocketFd = 3;

pid_t spawnBlock(const std::vector<std::string>& args, int socket) {
  std::vector<char*> argv;
  for (const auto& arg : args) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  // dup2 onto fd 3 clears close-on-exec there (the caller keeps `socket` off fd 3: a dup2 of
  // an fd onto itself would not).
  posix_spawn_file_actions_adddup2(&actions, socket, kBlockSocketFd);
  // Nothing else of the core's reaches the disk process, whether close-on-exec or not.
  posix_spawn_file_actions_addclosefrom_np(&actions, kBlockSocketFd + 1);
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, args[0].c_str(), &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throwSystemError(rc, "spare: start the disk process", args[0]);
  return pid;
}

}  // namespace

std::vector<VhostUserDeviceConfig> startSpareDisks(const SpareDiskOptions& options,
                                                   const std::string& templateDir,
                                                   const std::vector<snapshot::TemplateDisk>& disks,
                                                   spdlog::logger& log) {
  require(!options.blockProgram.empty() && !options.overlayDir.empty(),
          "{}: a template with disks needs --fork-server-block and --fork-server-overlays", templateDir);
  std::vector<VhostUserDeviceConfig> devices;
  std::vector<UniqueFd> coreEnds;
  try {
    for (size_t i = 0; i < disks.size(); ++i) {
      const auto& disk = disks[i];
      std::string base = templateDir + "/" + disk.file;
      VhostUserDeviceConfig device;
      device.kind = VhostUserDeviceKind::kBlock;
      device.queues = disk.queues;
      std::vector<std::string> args = {options.blockProgram};
      if (disk.readOnly) {
        device.imagePath = base;
        device.imageFormat = "raw";
        args.insert(args.end(), {"--image", base, "--format", "raw", "--readonly"});
      } else {
        device.imagePath = ipc::spareOverlayPath(options.overlayDir, ::getpid(), i);
        device.imageFormat = "qcow2";
        args.insert(args.end(), {"--image", device.imagePath, "--format", "qcow2", "--overlay-over", base});
      }
      // The guest's driver had this many queues and this serial in the template.
      args.insert(args.end(), {"--queues", std::to_string(disk.queues), "--serial",
                               snapshot::blockDiskSerial(i), "--fd", std::to_string(kBlockSocketFd)});
      // /dev/userfaultfd is in the server's jail: its memfd forks need it too.
      if (options.postcopy) args.push_back("--userfaultfd");
      int pair[2];
      CLONE_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair), "spare: socketpair for disk",
                    base);
      UniqueFd coreEnd(pair[0]);
      UniqueFd blockEnd(pair[1]);
      if (blockEnd.get() == kBlockSocketFd) {
        // dup2 of an fd onto itself would leave it close-on-exec: move it elsewhere first.
        blockEnd = UniqueFd(CLONE_SYSCALL(::fcntl(blockEnd.get(), F_DUPFD_CLOEXEC, kBlockSocketFd + 1),
                                          "spare: move the disk's socket", base));
      }
      pid_t pid = spawnBlock(args, blockEnd.get());
      log.info("spare: disk {} served by clone-block (pid {}): {}", i, pid, device.imagePath);
      device.socketFd = coreEnd.get();
      device.socketPath = fmt::format("fd={}", coreEnd.get());
      devices.push_back(device);
      coreEnds.push_back(std::move(coreEnd));
    }
  } catch (...) {
    // The clone-blocks started end when their sockets close (now); their overlays go.
    coreEnds.clear();
    removeSpareOverlays(options.overlayDir, ::getpid(), disks.size());
    throw;
  }
  for (auto& fd : coreEnds) (void)fd.release();  // the restore owns them now
  return devices;
}

void removeSpareOverlays(const std::string& overlayDir, pid_t spare, size_t disks) {
  for (size_t i = 0; i < disks; ++i) ::unlink(ipc::spareOverlayPath(overlayDir, spare, i).c_str());
}

}  // namespace clonevm::vmm
