#pragma once
// Small helpers shared by the image formats: whole-buffer pread/pwrite that name the file in
// their errors, big-endian field access, and extent lists that merge neighbours.

#include <endian.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "dev-block/image/block_image.h"

namespace clonevm::block {

// Reads exactly `length` bytes; bytes past the end of the file read as zeros.
void preadFull(int fd, void* data, uint64_t length, uint64_t offset, const std::string& path);
void pwriteFull(int fd, const void* data, uint64_t length, uint64_t offset, const std::string& path);
// Writes `length` zero bytes at `offset` (fallocate ZERO_RANGE, or plain writes when unsupported).
void writeZeroBytes(int fd, uint64_t offset, uint64_t length, const std::string& path);
uint64_t fileSizeOf(int fd, const std::string& path);

inline uint64_t loadBe64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return be64toh(v); }
inline uint32_t loadBe32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return be32toh(v); }
inline uint16_t loadBe16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return be16toh(v); }
inline void storeBe64(uint8_t* p, uint64_t v) { v = htobe64(v); std::memcpy(p, &v, 8); }
inline void storeBe32(uint8_t* p, uint32_t v) { v = htobe32(v); std::memcpy(p, &v, 4); }
inline void storeBe16(uint8_t* p, uint16_t v) { v = htobe16(v); std::memcpy(p, &v, 2); }

// Appends `extent`, extending the last extent instead when it continues it (same fd and
// contiguous file offsets, or both zero), so contiguous host clusters become one I/O.
inline void appendExtent(std::vector<ImageExtent>& out, ImageExtent extent) {
  if (extent.length == 0) return;
  if (!out.empty()) {
    ImageExtent& last = out.back();
    if (last.kind == extent.kind) {
      if (extent.kind == ImageExtent::Kind::kZero ||
          (extent.kind == ImageExtent::Kind::kFile && last.fd == extent.fd &&
           last.fileOffset + last.length == extent.fileOffset) ||
          (extent.kind == ImageExtent::Kind::kBuffer && last.buffer == extent.buffer &&
           last.bufferOffset + last.length == extent.bufferOffset)) {
        last.length += extent.length;
        return;
      }
    }
  }
  out.push_back(std::move(extent));
}

inline ImageExtent zeroExtent(uint64_t length) {
  ImageExtent e;
  e.kind = ImageExtent::Kind::kZero;
  e.length = length;
  return e;
}

inline ImageExtent fileExtent(int fd, uint64_t fileOffset, uint64_t length) {
  ImageExtent e;
  e.kind = ImageExtent::Kind::kFile;
  e.fd = fd;
  e.fileOffset = fileOffset;
  e.length = length;
  return e;
}

// Copies the bytes described by `extents` into `fd` at `offset` (copy-on-write from a backing
// file). Zero extents are written as zeros unless `skipZeros` (the target already reads zeros).
void copyExtentsTo(const std::vector<ImageExtent>& extents, int fd, uint64_t offset,
                   const std::string& path, bool skipZeros);
// Reads the bytes described by `extents` into `data` (tests, compressed-cluster copy-on-write).
void readExtents(const std::vector<ImageExtent>& extents, uint8_t* data);

}  // namespace clonevm::block
