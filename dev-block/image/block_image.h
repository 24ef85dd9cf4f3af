#pragma once
// The contract between clone-block's virtio-blk device and its image formats (raw, qcow2).
//
// A format never moves guest data itself on the fast path. It maps a guest byte range onto
// extents of its files, and the device does the data I/O (io_uring) on those extents. So raw and
// qcow2 share one data path, and qcow2 costs only its metadata lookups.
//
//   reads:  mapRead()  -> kFile extents are read from fd/fileOffset, kZero filled with zeros,
//                         kBuffer copied from memory (a decompressed cluster).
//   writes: mapWrite() -> allocates (and copies on write from the backing file) as needed, then
//                         returns only kFile extents; the device writes the guest data there.
//   flush:  after every write the device completed, flush() makes data and metadata durable.
//
// Guest offsets and lengths are already checked against virtualSize() by the device (one place:
// the request parser). An image is used from one thread only.
//
// Errors: clonevm::Error (corrupt image, refused feature) and clonevm::SystemError (I/O). A
// failing request becomes VIRTIO_BLK_S_IOERR; a failing open refuses to start the device.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace clonevm::block {

struct ImageExtent {
  enum class Kind : uint8_t {
    kFile,    // the bytes live in `fd` at `fileOffset`
    kZero,    // the bytes read as zeros (hole, unallocated without backing, zero cluster)
    kBuffer,  // the bytes are buffer[bufferOffset, +length) (e.g. a decompressed cluster)
  };
  Kind kind = Kind::kZero;
  uint64_t length = 0;
  int fd = -1;
  uint64_t fileOffset = 0;
  std::shared_ptr<const std::vector<uint8_t>> buffer;
  uint64_t bufferOffset = 0;
};

class BlockImage {
 public:
  virtual ~BlockImage() = default;

  virtual uint64_t virtualSize() const = 0;
  virtual bool readOnly() const = 0;
  // Allocation unit (qcow2 cluster size; 4096 for raw): the discard granularity.
  virtual uint32_t clusterSize() const = 0;
  // One line for logs: "qcow2 v3, 64 KiB clusters, backing raw /path/base.img".
  virtual std::string describe() const = 0;

  // Appends extents covering [offset, offset + length) exactly, in order.
  virtual void mapRead(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) = 0;
  // Makes [offset, offset + length) writable in place and appends kFile extents covering it
  // exactly. Allocation metadata is written (not synced) before this returns, ordered so that a
  // crash can leak clusters but never point at a cluster whose refcount is zero.
  virtual void mapWrite(uint64_t offset, uint64_t length, std::vector<ImageExtent>& out) = 0;
  // Data, then metadata, made durable (fdatasync): every write completed before is kept.
  virtual void flush() = 0;
  // Guest discard: may free whole clusters; reads of the range afterwards return zeros or the
  // old data, as virtio allows.
  virtual void discard(uint64_t offset, uint64_t length) = 0;
  // Reads of the range return zeros afterwards. `mayUnmap`: the guest allows deallocation.
  virtual void writeZeroes(uint64_t offset, uint64_t length, bool mayUnmap) = 0;
};

enum class ImageFormat { kAuto, kRaw, kQcow2 };

struct ImageOpenOptions {
  std::string path;
  ImageFormat format = ImageFormat::kAuto;
  bool readOnly = false;
};

// Opens an image and, for qcow2, its whole backing chain (read-only; at most 64 deep, no loops).
// kAuto probes the qcow2 magic. Defined by the formats library (dev-block/image/, docs/BLOCK.md).
std::unique_ptr<BlockImage> openImage(const ImageOpenOptions& options);

// The files of an image's chain, top first: `path`, then each backing file as the chain opens it
// (opened read-only to find them). A jail must make all of them visible (cli/disks.cc).
std::vector<std::string> imageChainPaths(const std::string& path, ImageFormat format);

// Creates a qcow2 v3 image at `path` whose backing file is `backingPath` (recorded as an absolute
// path, with its format), with the backing file's virtual size. Used for
// `clone run --disk PATH,overlay`. Refuses to overwrite an existing `path`.
void createQcow2Overlay(const std::string& path, const std::string& backingPath,
                        ImageFormat backingFormat);

}  // namespace clonevm::block
