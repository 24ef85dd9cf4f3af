#pragma once
// Disks of a fork server's forks. A core never opens a disk image; a fork's clone-block, which
// does, is started by `clone fork` for a fork of its own process. A fork server's spare is
// prepared before any command asks for it, so it starts its disks' processes itself, before its
// restore, inside the server's jail: one clone-block per disk, which makes its own qcow2
// overlay over the template's disk file (clone-block --overlay-over) in the one directory of
// that jail a process may write, and serves it on a socket pair whose other end the restore
// takes. `clone fork` moves the overlays out of that directory to the fork's own names once the
// spare is a fork (docs/FORK.md, "Disks through the fork server").

#include <sys/types.h>

#include <string>
#include <vector>

#include <spdlog/logger.h>

#include "ipc/fork-server/fork_request.h"
#include "vmm-core/snapshot/template_files.h"
#include "vmm-core/virtio/vhost_user_backend.h"

namespace clonevm::vmm {

struct SpareDiskOptions {
  std::string blockProgram;  // clone-block, as the server's jail sees it
  std::string overlayDir;    // writable in the server's jail
  // Each clone-block offers vhost-user postcopy (--userfaultfd), so the spare's memory stays
  // lazy and its core resolves the disk's first touches; false: the spare fills its memory up
  // front (docs/FORK.md).
  bool postcopy = true;
};

// Starts one clone-block per template disk, in the template's order, each a child of this
// process; returns the --vhost-user-blk devices for the restore, whose `socketFd`s (the core's
// ends of the socket pairs) the restore takes over. A disk the template had read-only is
// served from the template's file as it is. On failure it throws, and the processes already
// started end (their sockets close) and their overlays are removed.
std::vector<VhostUserDeviceConfig> startSpareDisks(const SpareDiskOptions& options,
                                                   const std::string& templateDir,
                                                   const std::vector<snapshot::TemplateDisk>& disks,
                                                   spdlog::logger& log);

// Removes spare `spare`'s overlays, for a spare that ended without a request.
void removeSpareOverlays(const std::string& overlayDir, pid_t spare, size_t disks);

}  // namespace clonevm::vmm
