#include "cli/template_disks.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"
#include "dev-block/image/block_image.h"
#include "dev-block/image/open_image.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::cli {
namespace {

namespace snapshot = vmm::snapshot;

constexpr uint64_t kBlock = 4096;
constexpr uint64_t kChunk = 1 << 20;

bool allZero(const uint8_t* data, size_t size) {
  // Word at a time; the tail byte by byte.
  size_t i = 0;
  for (; i + 8 <= size; i += 8) {
    uint64_t word;
    std::memcpy(&word, data + i, 8);
    if (word != 0) return false;
  }
  for (; i < size; ++i) {
    if (data[i] != 0) return false;
  }
  return true;
}

void preadAll(int fd, uint8_t* into, size_t size, uint64_t offset, const std::string& path) {
  size_t done = 0;
  while (done < size) {
    ssize_t n = ::pread(fd, into + done, size - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throwSystemError(errno, "read disk image", path);
    require(n > 0, "{}: ends at {:#x}, inside the data its format maps", path, offset + done);
    done += static_cast<size_t>(n);
  }
}

// Writes the target's blocks that are not all zero. `data` belongs at target offset `at`.
class SparseWriter {
 public:
  SparseWriter(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  void write(const uint8_t* data, uint64_t length, uint64_t at) {
    uint64_t end = at + length;
    uint64_t runStart = 0, runEnd = 0;  // a run of non-zero blocks, written with one pwrite
    auto flush = [&] {
      if (runEnd > runStart) pwriteAll(data + (runStart - at), runEnd - runStart, runStart);
      runStart = runEnd = 0;
    };
    for (uint64_t block = at; block < end;) {
      uint64_t blockEnd = std::min(end, (block / kBlock + 1) * kBlock);
      if (allZero(data + (block - at), blockEnd - block)) {
        flush();
      } else {
        if (runEnd != block) {
          flush();
          runStart = block;
        }
        runEnd = blockEnd;
      }
      block = blockEnd;
    }
    flush();
  }
  uint64_t written() const { return written_; }

 private:
  void pwriteAll(const uint8_t* data, uint64_t length, uint64_t at) {
    uint64_t done = 0;
    while (done < length) {
      ssize_t n = ::pwrite(fd_, data + done, length - done, static_cast<off_t>(at + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) throwSystemError(errno, "write template disk", path_);
      done += static_cast<uint64_t>(n);
    }
    written_ += length;
  }

  int fd_;
  std::string path_;
  uint64_t written_ = 0;
};

// Copies file bytes [fileOffset, fileOffset + length) to target offset `at`, skipping the
// file's holes (SEEK_DATA; a file that cannot tell, e.g. a block device, is read whole).
void copyFileBytes(int fd, uint64_t fileOffset, uint64_t length, uint64_t at, uint8_t* buffer,
                   SparseWriter& out, const std::string& path) {
  uint64_t end = fileOffset + length;
  uint64_t position = fileOffset;
  while (position < end) {
    uint64_t dataStart = position;
    uint64_t dataEnd = end;
    off_t data = ::lseek(fd, static_cast<off_t>(position), SEEK_DATA);
    if (data < 0 && errno == ENXIO) return;  // only a hole from here to the end of the file
    if (data >= 0) {
      dataStart = static_cast<uint64_t>(data);
      if (dataStart >= end) return;
      off_t hole = ::lseek(fd, data, SEEK_HOLE);
      if (hole >= 0) dataEnd = std::min(end, static_cast<uint64_t>(hole));
    } else if (errno != EINVAL) {
      throwSystemError(errno, "find the data of", path);
    }
    for (uint64_t from = dataStart; from < dataEnd;) {
      uint64_t n = std::min(kChunk, dataEnd - from);
      preadAll(fd, buffer, n, from, path);
      out.write(buffer, n, at + (from - fileOffset));
      from += n;
    }
    position = dataEnd;
  }
}

block::ImageFormat formatFor(const std::string& name) {
  return name.empty() || name == "auto" ? block::ImageFormat::kAuto
                                        : block::parseImageFormat(name);
}

}  // namespace

uint64_t copyDiskImage(const std::string& source, const std::string& format,
                       const std::string& target, uint64_t bytes) {
  auto image = block::openImage({source, formatFor(format), /*readOnly=*/true});
  require(image->virtualSize() == bytes,
          "{}: {} bytes, but the VM's disk had {} (was the image changed while the VM ran?)",
          source, image->virtualSize(), bytes);
  UniqueFd out(::open(target.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (!out) throwSystemError(errno, "create template disk", target);
  CLONE_SYSCALL(::ftruncate(out.get(), static_cast<off_t>(bytes)), "size template disk", target);
  SparseWriter writer(out.get(), target);
  std::vector<uint8_t> buffer(kChunk);
  std::vector<block::ImageExtent> extents;
  for (uint64_t offset = 0; offset < bytes;) {
    uint64_t length = std::min(kChunk, bytes - offset);
    extents.clear();
    image->mapRead(offset, length, extents);
    uint64_t at = offset;
    for (const auto& extent : extents) {
      switch (extent.kind) {
        case block::ImageExtent::Kind::kZero:
          break;
        case block::ImageExtent::Kind::kBuffer:
          writer.write(extent.buffer->data() + extent.bufferOffset, extent.length, at);
          break;
        case block::ImageExtent::Kind::kFile:
          copyFileBytes(extent.fd, extent.fileOffset, extent.length, at, buffer.data(), writer,
                        source);
          break;
      }
      at += extent.length;
    }
    require(at == offset + length, "{}: the image maps {} bytes at {:#x}, not {}", source,
            at - offset, offset, length);
    offset += length;
  }
  CLONE_SYSCALL(::fsync(out.get()), "sync template disk", target);
  CLONE_SYSCALL(::fchmod(out.get(), 0444), "make read-only", target);
  return writer.written();
}

TemplateDiskCopies copyTemplateDisks(const std::string& dir, const std::vector<RecordedDisk>& recorded,
                                     const std::string& recordPath) {
  std::string manifestPath = dir + "/" + snapshot::kManifestFile;
  std::ifstream in(manifestPath, std::ios::binary);
  require(in.good(), "{}: cannot be read", manifestPath);
  std::string text((std::istreambuf_iterator<char>(in)), {});
  snapshot::Manifest manifest = snapshot::manifestFromJson(text, manifestPath);
  requireRecordedDisks(manifest, recorded, recordPath);
  TemplateDiskCopies copies;
  for (size_t i = 0; i < manifest.disks.size(); ++i) {
    auto& disk = manifest.disks[i];
    if (!disk.sha256.empty()) continue;
    require(!disk.source.empty(), "{}: disk {} names no image to copy", manifestPath, disk.file);
    std::string target = dir + "/" + disk.file;
    try {
      // The recorded image: the manifest's name for it may be one the core knows it by.
      copies.dataBytes += copyDiskImage(recorded[i].image, disk.sourceFormat, target, disk.bytes);
    } catch (...) {
      ::unlink(target.c_str());  // no half-copied disk is left for a fork to find
      throw;
    }
    UniqueFd fd(CLONE_SYSCALL(::open(target.c_str(), O_RDONLY | O_CLOEXEC), "open", target));
    disk.sha256 = snapshot::templateDiskDigest(fd.get(), disk.bytes, target);
    ++copies.disks;
  }
  if (copies.disks > 0) snapshot::rewriteManifest(dir, manifest);
  return copies;
}

}  // namespace clonevm::cli
