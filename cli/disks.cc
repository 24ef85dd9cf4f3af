#include "cli/disks.h"

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include "common/error.h"
#include "dev-block/image/block_image.h"
#include "dev-block/image/open_image.h"
#include "ipc/vhost-user/channel.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::cli {
namespace {

std::vector<std::string> split(const std::string& text, char separator) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t end = text.find(separator, start);
    parts.push_back(text.substr(start, end - start));
    if (end == std::string::npos) return parts;
    start = end + 1;
  }
}

std::string makeRuntimeDir() {
  const char* base = std::getenv("XDG_RUNTIME_DIR");
  std::string pattern = std::string(base != nullptr && *base != '\0' ? base : "/tmp") +
                        "/clone-vm-XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) {
    throwSystemError(errno, "create the VM's runtime directory", pattern);
  }
  return pattern;  // mkdtemp makes it 0700
}

// Whether `pid` has exited; reaps it and stores its exit code if so.
bool exited(pid_t pid, int& code) {
  int status = 0;
  pid_t rc = ::waitpid(pid, &status, WNOHANG);
  if (rc != pid) return false;
  code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return true;
}

}  // namespace

DiskSpec parseDiskOption(const std::string& value) {
  auto parts = split(value, ',');
  DiskSpec disk;
  disk.path = parts[0];
  require(!disk.path.empty(), "--disk {}: the image path is empty", value);
  for (size_t i = 1; i < parts.size(); ++i) {
    const std::string& part = parts[i];
    if (part == "readonly") {
      disk.readOnly = true;
    } else if (part == "overlay") {
      disk.overlay = true;
    } else if (part.rfind("format=", 0) == 0) {
      disk.format = part.substr(7);
      require(disk.format == "raw" || disk.format == "qcow2" || disk.format == "auto",
              "--disk {}: format must be raw, qcow2 or auto, not '{}'", value, disk.format);
    } else {
      throw Error(fmt::format(
          "--disk {}: unknown option '{}' (readonly, overlay, format=raw|qcow2|auto)", value,
          part));
    }
  }
  require(!(disk.readOnly && disk.overlay),
          "--disk {}: readonly and overlay do not go together (an overlay exists to be written)",
          value);
  return disk;
}

DiskProcesses::DiskProcesses(ProcessLauncher& launcher, std::string blockProgram,
                             std::string vmId, std::vector<std::string> logArgs,
                             OverlayCreator overlay)
    : launcher_(launcher),
      blockProgram_(std::move(blockProgram)),
      vmId_(std::move(vmId)),
      logArgs_(std::move(logArgs)),
      overlay_(overlay),
      runtimeDir_(makeRuntimeDir()) {}

DiskProcesses::~DiskProcesses() { stopAll(); }

std::string DiskProcesses::start(const DiskSpec& disk, std::chrono::milliseconds timeout) {
  size_t index = pids_.size();
  std::string socket = fmt::format("{}/disk{}.sock", runtimeDir_, index);
  ProcessSpec spec;
  spec.kind = "block";
  spec.id = fmt::format("{}-block{}", vmId_, index);
  spec.program = blockProgram_;
  spec.args = logArgs_;
  spec.args.insert(spec.args.end(), {"--socket-path", socket, "--serial",
                                     vmm::snapshot::blockDiskSerial(index)});
  spec.writePaths.push_back(runtimeDir_);  // the socket
  std::string absolute = std::filesystem::absolute(disk.path).string();
  if (disk.overlay) {
    std::string overlay = overlay_(runtimeDir_, index, disk);
    files_.push_back(overlay);
    spec.args.insert(spec.args.end(), {"--image", overlay, "--format", "qcow2"});
    spec.readPaths.push_back(absolute);  // the base, opened read-only through the overlay
    lastServed_ = {overlay, "qcow2"};
  } else {
    spec.args.insert(spec.args.end(), {"--image", absolute, "--format", disk.format});
    lastServed_ = {absolute, disk.format};
    if (disk.readOnly) {
      spec.args.push_back("--readonly");
      spec.readPaths.push_back(absolute);
    } else {
      spec.writePaths.push_back(absolute);
    }
  }
  // A qcow2 image's backing files, wherever they are, must be visible (read-only) in the jail:
  // the image library lists the chain as clone-block will open it.
  // A missing or corrupt image is left for clone-block to report (it exits with the reason).
  if (disk.overlay || disk.format != "raw") {
    try {
      auto format = disk.format == "auto" ? block::ImageFormat::kAuto
                                          : block::parseImageFormat(disk.format);
      for (const auto& path : block::imageChainPaths(absolute, format)) {
        std::string file = std::filesystem::absolute(path).string();
        if (file != absolute) spec.readPaths.push_back(file);
      }
    } catch (const Error&) {
    }
  }
  lastSpec_ = spec;

  pid_t pid = launcher_.launch(spec);
  pids_.push_back(pid);
  files_.push_back(socket);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    int code = 0;
    if (exited(pid, code)) {
      pids_.back() = -1;
      throw Error(fmt::format("clone-block for --disk {} exited with code {} before it listened",
                              disk.path, code));
    }
    try {
      // A probe connection: the back-end serves it, sees it close, and waits for the VMM.
      ipc::vhost::connectUnixSocket(socket);
      return socket;
    } catch (const Error&) {
      // not listening yet
    }
    if (std::chrono::steady_clock::now() > deadline) {
      throw Error(fmt::format("clone-block for --disk {} did not listen on {} within {} ms",
                              disk.path, socket, timeout.count()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
}

void DiskProcesses::stopAll() {
  for (pid_t pid : pids_) {
    if (pid > 0) ::kill(pid, SIGTERM);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (pid_t& pid : pids_) {
    if (pid <= 0) continue;
    int code = 0;
    bool gone = exited(pid, code);
    while (!gone && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      gone = exited(pid, code);
    }
    if (!gone) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    pid = -1;
  }
  pids_.clear();
  for (const auto& file : files_) ::unlink(file.c_str());
  files_.clear();
  if (!runtimeDir_.empty()) ::rmdir(runtimeDir_.c_str());
}

}  // namespace clonevm::cli
