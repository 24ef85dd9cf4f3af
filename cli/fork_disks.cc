#include "cli/fork_disks.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <charconv>

#include <fmt/format.h>

#include "common/error.h"
#include "dev-block/image/block_image.h"

namespace clonevm::cli {
namespace {

// No template has more (clone-block's serials are clone-disk0..; PCI slots run out first).
constexpr size_t kMaxForkDisks = 64;

}  // namespace

ForkDiskOption parseForkDiskOption(const std::string& value) {
  ForkDiskOption option;
  size_t comma = value.find(',');
  std::string index = value.substr(0, comma);
  auto [end, ec] = std::from_chars(index.data(), index.data() + index.size(), option.index);
  require(ec == std::errc() && end == index.data() + index.size() && !index.empty() &&
              option.index < kMaxForkDisks,
          "--disk {}: '{}' is not a disk number of the template (0, 1, ...)", value, index);
  while (comma != std::string::npos) {
    size_t next = value.find(',', comma + 1);
    std::string item = value.substr(comma + 1, next == std::string::npos ? next : next - comma - 1);
    comma = next;
    if (item.starts_with("overlay=") && item.size() > 8) {
      option.overlay = item.substr(8);
    } else {
      throw Error(fmt::format("--disk {}: unknown option '{}' (overlay=PATH)", value, item));
    }
  }
  require(!option.overlay.empty(), "--disk {}: nothing to change (overlay=PATH)", value);
  return option;
}

std::string forkDiskOverlayPath(const std::string& apiSocket, size_t index) {
  return fmt::format("{}.disk{}.qcow2", socketFileBase(apiSocket), index);
}

std::string forkDiskLogPath(const std::string& apiSocket, size_t index) {
  return fmt::format("{}.disk{}.log", socketFileBase(apiSocket), index);
}

std::vector<int> ForkDisks::keepFds() const {
  std::vector<int> fds;
  for (const auto& fd : coreEnds) fds.push_back(fd.get());
  return fds;
}

ForkDisks startForkDisks(ProcessLauncher& launcher, const std::string& blockProgram,
                         const std::string& forkId, const std::string& templateDir,
                         const vmm::snapshot::Manifest& manifest, const std::string& apiSocket,
                         const std::vector<ForkDiskOption>& options, unsigned forkNumber,
                         unsigned count, bool postcopy) {
  require(manifest.disks.size() <= kMaxForkDisks, "{}: {} disks, at most {}", templateDir,
          manifest.disks.size(), kMaxForkDisks);
  for (const auto& option : options) {
    require(option.index < manifest.disks.size(), "--disk {}: the template has {} disks",
            option.index, manifest.disks.size());
  }
  ForkDisks disks;
  try {
    for (size_t i = 0; i < manifest.disks.size(); ++i) {
      const auto& disk = manifest.disks[i];
      std::string base = templateDir + "/" + disk.file;
      ProcessSpec spec;
      spec.kind = "block";
      spec.id = fmt::format("{}-block{}", forkId, i);
      spec.program = blockProgram;
      spec.readPaths.push_back(base);
      std::string image = base;
      std::string format = "raw";
      if (disk.readOnly) {
        // The guest knows the disk is read-only: the fork serves the template's file as is.
        spec.args = {"--image", base, "--format", "raw", "--readonly"};
      } else {
        std::string overlay = forkDiskOverlayPath(apiSocket, i);
        bool own = true;
        for (const auto& option : options) {
          if (option.index != i) continue;
          overlay = count > 1 ? fmt::format("{}.{}", option.overlay, forkNumber) : option.overlay;
          own = false;
        }
        block::createQcow2Overlay(overlay, base, block::ImageFormat::kRaw);
        if (own) disks.createdOverlays.push_back(overlay);
        spec.args = {"--image", overlay, "--format", "qcow2"};
        spec.writePaths.push_back(overlay);
        image = overlay;
        format = "qcow2";
      }
      // The guest's driver had this many queues and this serial in the template.
      spec.args.insert(spec.args.end(), {"--queues", std::to_string(disk.queues), "--serial",
                                         vmm::snapshot::blockDiskSerial(i)});
      // Postcopy: the fork's memory is filled lazily, and the core resolves the pages this
      // disk's process touches first through a userfaultfd it makes (docs/FORK.md).
      if (postcopy) {
        spec.args.push_back("--userfaultfd");
        spec.devices.push_back("/dev/userfaultfd");
      }
      require(image.find(',') == std::string::npos,
              "{}: a disk path with a comma cannot be given to clone-vmm", image);
      int pair[2];
      CLONE_SYSCALL(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair),
                    "socketpair for the disk of", forkId);
      UniqueFd coreEnd(pair[0]);
      UniqueFd blockEnd(pair[1]);
      spec.args.insert(spec.args.end(), {"--fd", std::to_string(blockEnd.get())});
      spec.keepFds = {blockEnd.get()};
      spec.detachedOutput = forkDiskLogPath(apiSocket, i);
      disks.logs.push_back(spec.detachedOutput);
      launcher.launch(spec);
      disks.vmmArgs.insert(disks.vmmArgs.end(),
                           {"--vhost-user-blk",
                            fmt::format("fd={},image={},format={}", coreEnd.get(), image, format)});
      disks.coreEnds.push_back(std::move(coreEnd));
      disks.images.push_back({image, format});
    }
  } catch (...) {
    // The started clone-blocks end when their core ends of the socket pairs close (now).
    disks.coreEnds.clear();
    for (const auto& overlay : disks.createdOverlays) ::unlink(overlay.c_str());
    throw;
  }
  return disks;
}

void removeForkDiskFiles(const std::string& apiSocket) {
  removeDiskRecord(apiSocket);
  for (size_t i = 0; i < kMaxForkDisks; ++i) {
    ::unlink(forkDiskOverlayPath(apiSocket, i).c_str());
    ::unlink(forkDiskLogPath(apiSocket, i).c_str());
  }
}

}  // namespace clonevm::cli
