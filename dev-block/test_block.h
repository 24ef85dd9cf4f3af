#pragma once
// Test-only: a fake BlockImage over a memfd, with extents of every kind, and helpers that lay
// out virtio-blk requests on a TestRing the way a driver does.

#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <set>
#include <vector>

#include "common/error.h"
#include "dev-block/image/block_image.h"
#include "dev-block/virtio_blk_request.h"
#include "ipc/vhost-user/test_guest.h"

namespace clonevm::block::testing {

// The image's bytes live in a memfd. mapRead() splits at 4 KiB "clusters": clusters in
// `zeroClusters` map as kZero, those in `bufferClusters` as kBuffer (their bytes from the
// file, copied), the rest as kFile. mapWrite() turns a cluster back into kFile.
class FakeImage : public BlockImage {
 public:
  static constexpr uint64_t kCluster = 4096;

  explicit FakeImage(uint64_t size, bool readOnly = false) : size_(size), readOnly_(readOnly) {
    fd_ = UniqueFd(CLONE_SYSCALL(::memfd_create("fake-image", MFD_CLOEXEC), "memfd_create"));
    CLONE_SYSCALL(::ftruncate(fd_.get(), static_cast<off_t>(size)), "ftruncate");
  }

  uint64_t virtualSize() const override { return size_; }
  bool readOnly() const override { return readOnly_; }
  uint32_t clusterSize() const override { return kCluster; }
  std::string describe() const override { return "fake"; }

  void mapRead(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) override {
    require(!failMaps, "fake image: injected failure");
    require(offset + length <= size_, "fake image: read beyond the end");
    while (length > 0) {
      uint64_t cluster = offset / kCluster;
      uint64_t n = std::min(length, (cluster + 1) * kCluster - offset);
      ImageExtent extent;
      extent.length = n;
      if (zeroClusters.count(cluster) != 0) {
        extent.kind = ImageExtent::Kind::kZero;
      } else if (bufferClusters.count(cluster) != 0) {
        extent.kind = ImageExtent::Kind::kBuffer;
        auto buffer = std::make_shared<std::vector<uint8_t>>(n);
        require(::pread(fd_.get(), buffer->data(), n, static_cast<off_t>(offset)) ==
                    static_cast<ssize_t>(n), "fake image: pread");
        extent.buffer = buffer;
      } else {
        extent.kind = ImageExtent::Kind::kFile;
        extent.fd = fd_.get();
        extent.fileOffset = offset;
      }
      // Merge with the previous file extent when contiguous, as a format would.
      if (!out.empty() && extent.kind == ImageExtent::Kind::kFile &&
          out.back().kind == ImageExtent::Kind::kFile &&
          out.back().fileOffset + out.back().length == offset) {
        out.back().length += n;
      } else {
        out.push_back(extent);
      }
      offset += n;
      length -= n;
    }
  }
  void mapWrite(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) override {
    require(!failMaps, "fake image: injected failure");
    require(!readOnly_, "fake image: write to a read-only image");
    for (uint64_t c = offset / kCluster; c * kCluster < offset + length; ++c) {
      zeroClusters.erase(c);
      bufferClusters.erase(c);
    }
    ImageExtent extent;
    extent.kind = ImageExtent::Kind::kFile;
    extent.length = length;
    extent.fd = fd_.get();
    extent.fileOffset = offset;
    out.push_back(extent);
  }
  void flush() override { ++flushes; }
  void discard(uint64_t offset, uint64_t length) override {
    discards.push_back({offset, length, false});
  }
  void writeZeroes(uint64_t offset, uint64_t length, bool mayUnmap) override {
    std::vector<uint8_t> zeros(length);
    require(::pwrite(fd_.get(), zeros.data(), length, static_cast<off_t>(offset)) ==
                static_cast<ssize_t>(length), "fake image: pwrite");
    zeroWrites.push_back({offset, length, mayUnmap});
  }

  // Direct access to the image bytes.
  std::vector<uint8_t> bytes(uint64_t offset, uint64_t length) const {
    std::vector<uint8_t> out(length);
    require(::pread(fd_.get(), out.data(), length, static_cast<off_t>(offset)) ==
                static_cast<ssize_t>(length), "fake image: pread");
    return out;
  }
  void fill(uint64_t offset, const std::vector<uint8_t>& data) {
    require(::pwrite(fd_.get(), data.data(), data.size(), static_cast<off_t>(offset)) ==
                static_cast<ssize_t>(data.size()), "fake image: pwrite");
  }

  std::set<uint64_t> zeroClusters;
  std::set<uint64_t> bufferClusters;
  bool failMaps = false;
  int flushes = 0;
  std::vector<BlkRange> discards;
  std::vector<BlkRange> zeroWrites;

 private:
  UniqueFd fd_;
  uint64_t size_;
  bool readOnly_;
};

// One buffer of a descriptor chain.
struct ChainBuffer {
  uint64_t guestAddress;
  uint32_t length;
  bool writable;
};

// Writes the chain at descriptors head, head+1, ... and publishes it.
inline void publishChain(ipc::vhost::testing::TestRing& ring, uint16_t head,
                         const std::vector<ChainBuffer>& buffers) {
  for (size_t i = 0; i < buffers.size(); ++i) {
    uint16_t flags = buffers[i].writable ? ipc::vhost::kDescFlagWrite : 0;
    uint16_t next = 0;
    if (i + 1 < buffers.size()) {
      flags |= ipc::vhost::kDescFlagNext;
      next = static_cast<uint16_t>((head + i + 1) % ring.size());
    }
    ring.setDescriptor(static_cast<uint16_t>((head + i) % ring.size()), buffers[i].guestAddress,
                       buffers[i].length, flags, next);
  }
  ring.publish(head);
}

inline std::vector<uint8_t> blkHeader(uint32_t type, uint64_t sector) {
  std::vector<uint8_t> header(16, 0);
  std::memcpy(header.data(), &type, 4);
  std::memcpy(header.data() + 8, &sector, 8);
  return header;
}

inline std::vector<uint8_t> blkSegment(uint64_t sector, uint32_t sectors, uint32_t flags) {
  std::vector<uint8_t> segment(16, 0);
  std::memcpy(segment.data(), &sector, 8);
  std::memcpy(segment.data() + 8, &sectors, 4);
  std::memcpy(segment.data() + 12, &flags, 4);
  return segment;
}

}  // namespace clonevm::block::testing
