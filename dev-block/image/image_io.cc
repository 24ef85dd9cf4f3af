#include "dev-block/image/image_io.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/error.h"

namespace clonevm::block {

void preadFull(int fd, void* data, uint64_t length, uint64_t offset, const std::string& path) {
  auto* p = static_cast<uint8_t*>(data);
  while (length > 0) {
    ssize_t n = CLONE_SYSCALL(::pread(fd, p, length, static_cast<off_t>(offset)), "read image", path);
    if (n == 0) {
      std::memset(p, 0, length);
      return;
    }
    p += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void pwriteFull(int fd, const void* data, uint64_t length, uint64_t offset, const std::string& path) {
  auto* p = static_cast<const uint8_t*>(data);
  while (length > 0) {
    ssize_t n = CLONE_SYSCALL(::pwrite(fd, p, length, static_cast<off_t>(offset)), "write image", path);
    p += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void writeZeroBytes(int fd, uint64_t offset, uint64_t length, const std::string& path) {
  if (length == 0) return;
  int rc;
  do {
    rc = ::fallocate(fd, FALLOC_FL_ZERO_RANGE, static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (rc < 0 && errno == EINTR);
  if (rc == 0) return;
  if (errno != EOPNOTSUPP && errno != EINVAL && errno != ENODEV) {
    throwSystemError(errno, "zero range in image", path);
  }
  static const std::vector<uint8_t> zeros(1 << 20, 0);
  while (length > 0) {
    uint64_t n = std::min<uint64_t>(length, zeros.size());
    pwriteFull(fd, zeros.data(), n, offset, path);
    offset += n;
    length -= n;
  }
}

uint64_t fileSizeOf(int fd, const std::string& path) {
  struct stat st {};
  CLONE_SYSCALL(::fstat(fd, &st), "stat image", path);
  if (S_ISBLK(st.st_mode)) {
    uint64_t size = 0;
    CLONE_SYSCALL(::ioctl(fd, BLKGETSIZE64, &size), "get block device size", path);
    return size;
  }
  return static_cast<uint64_t>(st.st_size);
}

void copyExtentsTo(const std::vector<ImageExtent>& extents, int fd, uint64_t offset,
                   const std::string& path, bool skipZeros) {
  std::vector<uint8_t> bounce;
  for (const ImageExtent& e : extents) {
    switch (e.kind) {
      case ImageExtent::Kind::kZero:
        if (!skipZeros) writeZeroBytes(fd, offset, e.length, path);
        break;
      case ImageExtent::Kind::kBuffer:
        pwriteFull(fd, e.buffer->data() + e.bufferOffset, e.length, offset, path);
        break;
      case ImageExtent::Kind::kFile:
        bounce.resize(e.length);
        preadFull(e.fd, bounce.data(), e.length, e.fileOffset, "backing file");
        pwriteFull(fd, bounce.data(), e.length, offset, path);
        break;
    }
    offset += e.length;
  }
}

void readExtents(const std::vector<ImageExtent>& extents, uint8_t* data) {
  for (const ImageExtent& e : extents) {
    switch (e.kind) {
      case ImageExtent::Kind::kZero:
        std::memset(data, 0, e.length);
        break;
      case ImageExtent::Kind::kBuffer:
        std::memcpy(data, e.buffer->data() + e.bufferOffset, e.length);
        break;
      case ImageExtent::Kind::kFile:
        preadFull(e.fd, data, e.length, e.fileOffset, "image extent");
        break;
    }
    data += e.length;
  }
}

}  // namespace clonevm::block
