#pragma once
// The data path of one virtqueue: an io_uring that moves guest data between guest memory and
// the image's files, with no copy (readv/writev straight on the guest buffers). The image
// maps a request onto extents (BlockImage::mapRead/mapWrite); each file extent becomes one
// readv/writev, zero and buffer extents are filled in place.
//
// The ring posts completions to an eventfd (shared by every queue of the device), watched by
// the back-end's loop; reap() then finishes requests whose I/O is done. Everything runs on the
// loop thread. Short transfers are resubmitted for the rest; a read that reaches the end of
// a file reads zeros beyond it.

#include <liburing.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "dev-block/image/block_image.h"
#include "ipc/vhost-user/guest_memory_map.h"

namespace clonevm::block {

class UringQueue {
 public:
  // `ok`: every byte was transferred.
  using Done = std::function<void(bool ok)>;

  UringQueue(BlockImage& image, unsigned entries, int eventFd);
  ~UringQueue();
  UringQueue(const UringQueue&) = delete;
  UringQueue& operator=(const UringQueue&) = delete;

  // Reads [offset, offset + length) of the image into `buffers` (exactly `length` bytes), or
  // writes them from `buffers`. `done` runs once: from reap() or drain(), or before this
  // returns when the image cannot map the range.
  void read(uint64_t offset, uint64_t length, std::span<const ipc::vhost::GuestSpan> buffers,
            Done done);
  void write(uint64_t offset, uint64_t length, std::span<const ipc::vhost::GuestSpan> buffers,
             Done done);

  // Finishes the requests whose I/O completed, without waiting.
  void reap();
  // Waits until every request in flight has finished.
  void drain();
  size_t inFlight() const { return inFlight_; }

 private:
  struct Request;
  struct Op;
  void start(bool isRead, uint64_t offset, uint64_t length,
             std::span<const ipc::vhost::GuestSpan> buffers, Done done);
  void queueOp(Op& op);
  void handle(io_uring_cqe* cqe);
  void finishOp(Op& op, bool ok);

  BlockImage& image_;
  io_uring ring_{};
  size_t inFlight_ = 0;  // requests
  std::vector<ImageExtent> extents_;  // scratch
};

}  // namespace clonevm::block
