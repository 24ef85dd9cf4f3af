#pragma once
// The disks of a fork (docs/FORK.md): for each disk of the template, `clone fork` creates a
// qcow2 overlay over the template's diskN.raw and starts a clone-block (through the same
// launcher as the fork's core, so jailed by default) that serves it on one end of a socket
// pair; the core gets the other end as `--vhost-user-blk fd=N,image=OVERLAY,format=qcow2`, in
// the template's disk order. clone-block ends when the core closes its end.
//
// Files, next to the fork's API socket (BASE = the socket path without ".sock"):
// BASE.diskN.qcow2 (the overlay, removed by `clone destroy`) and BASE.diskN.log (clone-block's
// output, removed with it). `--disk N,overlay=PATH` puts disk N's overlay at PATH instead,
// which is the user's and is kept.

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "cli/disk_record.h"
#include "cli/process_launcher.h"
#include "common/unique_fd.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::cli {

// `clone fork --disk N,overlay=PATH`: disk N's overlay at PATH (with --count K > 1,
// PATH.1 .. PATH.K), created there (it must not exist) and kept after the fork ends.
struct ForkDiskOption {
  size_t index = 0;
  std::string overlay;
};
ForkDiskOption parseForkDiskOption(const std::string& value);

std::string forkDiskOverlayPath(const std::string& apiSocket, size_t index);
std::string forkDiskLogPath(const std::string& apiSocket, size_t index);

// The disks of one fork, started. The core's spec gets `vmmArgs` and `keepFds`; after the
// core is launched, closeCoreEnds() drops this process's copies.
struct ForkDisks {
  std::vector<std::string> vmmArgs;  // --vhost-user-blk fd=N,image=...,format=qcow2 ...
  std::vector<UniqueFd> coreEnds;
  std::vector<int> keepFds() const;
  void closeCoreEnds() { coreEnds.clear(); }
  std::vector<std::string> createdOverlays;  // removed if the fork fails
  std::vector<std::string> logs;
  std::vector<RecordedDisk> images;  // what the core is given as image= and format=
};

// Starts one clone-block per disk of `manifest` for the fork `forkId` (number `forkNumber` of
// `count`, for --disk overlay=PATH.K). With `postcopy` (the default), each clone-block offers
// vhost-user postcopy (`--userfaultfd`, /dev/userfaultfd in its jail) and the fork's memory
// stays lazy; without (--disk-fill-up-front), the core fills the fork's memory before the
// disks start (docs/FORK.md). Throws
// clonevm::Error (an overlay that exists already, a launch that fails); what was created is
// removed then.
ForkDisks startForkDisks(ProcessLauncher& launcher, const std::string& blockProgram,
                         const std::string& forkId, const std::string& templateDir,
                         const vmm::snapshot::Manifest& manifest, const std::string& apiSocket,
                         const std::vector<ForkDiskOption>& options, unsigned forkNumber,
                         unsigned count, bool postcopy = true);

// Removes BASE.diskN.qcow2 and BASE.diskN.log of the fork whose API socket is `apiSocket`
// (clone destroy, a failed fork).
void removeForkDiskFiles(const std::string& apiSocket);

}  // namespace clonevm::cli
