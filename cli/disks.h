#pragma once
// `clone run --disk PATH[,readonly][,overlay][,format=FMT]`: one clone-block process per disk,
// each on a vhost-user socket in a private runtime directory, handed to clone-vmm as
// --vhost-user-blk SOCKET,image=IMAGE,format=FORMAT (the image clone-block serves, for
// `clone snapshot`). `overlay` serves a new qcow2 overlay (in the runtime directory)
// over PATH, which is then only read; the overlay is deleted with the VM.

#include <sys/types.h>

#include <chrono>
#include <string>
#include <vector>

#include "cli/process_launcher.h"

namespace clonevm::cli {

struct DiskSpec {
  std::string path;
  bool readOnly = false;
  bool overlay = false;
  std::string format = "auto";  // raw|qcow2|auto
};

// Parses one --disk value. Throws clonevm::Error naming the bad part.
DiskSpec parseDiskOption(const std::string& value);

// Creates `runtimeDir/diskN.qcow2` over the base (used for `overlay`); returns its path.
using OverlayCreator = std::string (*)(const std::string& runtimeDir, size_t index,
                                       const DiskSpec& disk);
std::string createDiskOverlay(const std::string& runtimeDir, size_t index, const DiskSpec& disk);

// The clone-block processes of one VM. Stops them (SIGTERM, then SIGKILL after a grace
// period) and removes the runtime directory when destroyed.
class DiskProcesses {
 public:
  DiskProcesses(ProcessLauncher& launcher, std::string blockProgram, std::string vmId,
                std::vector<std::string> logArgs, OverlayCreator overlay = createDiskOverlay);
  ~DiskProcesses();
  DiskProcesses(const DiskProcesses&) = delete;
  DiskProcesses& operator=(const DiskProcesses&) = delete;

  // Starts clone-block for `disk` and waits until its socket accepts connections. Returns
  // the socket path. Throws if the process exits or does not listen within `timeout`.
  std::string start(const DiskSpec& disk,
                    std::chrono::milliseconds timeout = std::chrono::seconds(10));
  const std::string& runtimeDir() const { return runtimeDir_; }
  // The spec the last start() launched (tests).
  const ProcessSpec& lastSpec() const { return lastSpec_; }
  // What the last start()'s clone-block serves: the image itself, or the overlay (qcow2).
  // clone-vmm gets it as image=,format= so that `clone snapshot` can copy the disk.
  struct ServedImage {
    std::string path;
    std::string format;  // raw|qcow2|auto
  };
  const ServedImage& lastServed() const { return lastServed_; }
  void stopAll();

 private:
  ProcessLauncher& launcher_;
  std::string blockProgram_;
  std::string vmId_;
  std::vector<std::string> logArgs_;
  OverlayCreator overlay_;
  std::string runtimeDir_;
  std::vector<pid_t> pids_;
  std::vector<std::string> files_;  // sockets and overlays to delete
  ProcessSpec lastSpec_;
  ServedImage lastServed_;
};

}  // namespace clonevm::cli
