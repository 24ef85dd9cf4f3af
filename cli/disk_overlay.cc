// createDiskOverlay: the one part of `--disk` that needs the image formats library.
#include "cli/disks.h"

#include <filesystem>

#include "common/error.h"
#include "dev-block/image/block_image.h"
#include "dev-block/image/open_image.h"

namespace clonevm::cli {

std::string createDiskOverlay(const std::string& runtimeDir, size_t index, const DiskSpec& disk) {
  std::string path = fmt::format("{}/disk{}-overlay.qcow2", runtimeDir, index);
  block::ImageFormat format =
      disk.format == "auto" ? block::ImageFormat::kAuto : block::parseImageFormat(disk.format);
  block::createQcow2Overlay(path, std::filesystem::absolute(disk.path).string(), format);
  return path;
}

}  // namespace clonevm::cli
