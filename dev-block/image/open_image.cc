#include "dev-block/image/open_image.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <utility>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"
#include "dev-block/image/image_io.h"
#include "dev-block/image/qcow2_create.h"
#include "dev-block/image/qcow2_header.h"
#include "dev-block/image/qcow2_image.h"
#include "dev-block/image/raw_image.h"

namespace clonevm::block {

namespace {

struct ChainState {
  int depth = 0;
  std::vector<std::pair<dev_t, ino_t>> files;  // every image of the chain so far
  std::vector<std::string> paths;               // as opened, top first
};

std::unique_ptr<BlockImage> openInChain(const std::string& path, ImageFormat format,
                                        bool readOnly, ChainState& chain) {
  require(chain.depth <= kMaxBackingChainDepth,
          "backing chain deeper than {} images at {} (is there a loop?)", kMaxBackingChainDepth,
          path);
  struct stat st {};
  CLONE_SYSCALL(::stat(path.c_str(), &st), "open image", path);
  for (const auto& [dev, ino] : chain.files) {
    require(!(dev == st.st_dev && ino == st.st_ino),
            "backing chain loop: {} is already part of the chain", path);
  }
  chain.files.emplace_back(st.st_dev, st.st_ino);
  chain.paths.push_back(path);
  if (format == ImageFormat::kAuto) format = probeImageFormat(path);
  if (format == ImageFormat::kRaw) return RawImage::open(path, readOnly);
  return Qcow2Image::open(path, readOnly, [&chain](const std::string& backing, const std::string& name) {
    ++chain.depth;
    return openInChain(backing, parseImageFormat(name), true, chain);
  });
}

}  // namespace

ImageFormat probeImageFormat(const std::string& path) {
  UniqueFd fd(CLONE_SYSCALL(::open(path.c_str(), O_RDONLY | O_CLOEXEC), "open image", path));
  uint8_t magic[4] = {};
  preadFull(fd.get(), magic, sizeof magic, 0, path);
  return loadBe32(magic) == kQcow2Magic ? ImageFormat::kQcow2 : ImageFormat::kRaw;
}

ImageFormat parseImageFormat(const std::string& name) {
  if (name.empty()) return ImageFormat::kAuto;
  if (name == "raw") return ImageFormat::kRaw;
  if (name == "qcow2") return ImageFormat::kQcow2;
  throw Error(fmt::format("image format '{}' is not supported (raw or qcow2)", name));
}

const char* imageFormatName(ImageFormat format) {
  switch (format) {
    case ImageFormat::kRaw: return "raw";
    case ImageFormat::kQcow2: return "qcow2";
    case ImageFormat::kAuto: break;
  }
  return "";
}

std::unique_ptr<BlockImage> openImage(const ImageOpenOptions& options) {
  ChainState chain;
  return openInChain(options.path, options.format, options.readOnly, chain);
}

void createQcow2Overlay(const std::string& path, const std::string& backingPath,
                        ImageFormat backingFormat) {
  if (backingFormat == ImageFormat::kAuto) backingFormat = probeImageFormat(backingPath);
  auto backing = openImage({backingPath, backingFormat, true});
  char resolved[PATH_MAX];
  require(::realpath(backingPath.c_str(), resolved) != nullptr, "cannot resolve backing file {}",
          backingPath);
  Qcow2CreateOptions options;
  options.size = backing->virtualSize();
  options.backingFile = resolved;
  options.backingFormat = imageFormatName(backingFormat);
  createQcow2(path, options);
}

std::vector<std::string> imageChainPaths(const std::string& path, ImageFormat format) {
  ChainState chain;
  openInChain(path, format, true, chain);
  return chain.paths;
}

}  // namespace clonevm::block
