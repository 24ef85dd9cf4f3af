#include "dev-block/image/raw_image.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <unistd.h>

#include "common/error.h"
#include "dev-block/image/image_io.h"

namespace clonevm::block {

std::unique_ptr<RawImage> RawImage::open(const std::string& path, bool readOnly) {
  UniqueFd fd(CLONE_SYSCALL(::open(path.c_str(), (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC),
                            "open raw image", path));
  uint64_t size = fileSizeOf(fd.get(), path);
  return std::make_unique<RawImage>(std::move(fd), path, size, readOnly);
}

RawImage::RawImage(UniqueFd fd, std::string path, uint64_t size, bool readOnly)
    : fd_(std::move(fd)), path_(std::move(path)), size_(size), readOnly_(readOnly) {}

std::string RawImage::describe() const { return fmt::format("raw {}", path_); }

void RawImage::mapRead(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) {
  appendExtent(out, fileExtent(fd_.get(), offset, length));
}

void RawImage::mapWrite(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) {
  require(!readOnly_, "raw image {} is read-only", path_);
  appendExtent(out, fileExtent(fd_.get(), offset, length));
}

void RawImage::flush() {
  if (!readOnly_) CLONE_SYSCALL(::fdatasync(fd_.get()), "flush raw image", path_);
}

void RawImage::discard(uint64_t offset, uint64_t length) {
  require(!readOnly_, "raw image {} is read-only", path_);
  int rc;
  do {
    rc = ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                     static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (rc < 0 && errno == EINTR);
  // Discard is a hint: a file system without hole punching keeps the data, which virtio allows.
  if (rc < 0 && errno != EOPNOTSUPP && errno != ENODEV) {
    throwSystemError(errno, "discard in raw image", path_);
  }
}

void RawImage::writeZeroes(uint64_t offset, uint64_t length, bool mayUnmap) {
  require(!readOnly_, "raw image {} is read-only", path_);
  if (mayUnmap) {
    int rc;
    do {
      rc = ::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                       static_cast<off_t>(offset), static_cast<off_t>(length));
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) return;
    if (errno != EOPNOTSUPP && errno != ENODEV) throwSystemError(errno, "punch hole in raw image", path_);
  }
  writeZeroBytes(fd_.get(), offset, length, path_);
}

}  // namespace clonevm::block
