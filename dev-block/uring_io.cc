#include "dev-block/uring_io.h"

#include <sys/uio.h>

#include <cerrno>
#include <cstring>

#include "common/error.h"

namespace clonevm::block {

struct UringQueue::Op {
  Request* request = nullptr;
  bool isRead = false;
  int fd = -1;
  uint64_t fileOffset = 0;
  std::vector<iovec> iov;  // what is left to transfer
};

struct UringQueue::Request {
  Done done;
  std::vector<std::unique_ptr<Op>> ops;
  size_t opsLeft = 0;
  bool ok = true;
};

namespace {

uint64_t iovBytes(const std::vector<iovec>& iov) {
  uint64_t total = 0;
  for (const auto& v : iov) total += v.iov_len;
  return total;
}

// Drops the first `bytes` of `iov`.
void advance(std::vector<iovec>& iov, uint64_t bytes) {
  size_t i = 0;
  while (i < iov.size() && bytes >= iov[i].iov_len) {
    bytes -= iov[i].iov_len;
    ++i;
  }
  iov.erase(iov.begin(), iov.begin() + static_cast<std::ptrdiff_t>(i));
  if (!iov.empty() && bytes > 0) {
    iov[0].iov_base = static_cast<uint8_t*>(iov[0].iov_base) + bytes;
    iov[0].iov_len -= bytes;
  }
}

// Walks guest buffers in order, handing out the next `length` bytes as iovecs.
class BufferCursor {
 public:
  explicit BufferCursor(std::span<const ipc::vhost::GuestSpan> buffers) : buffers_(buffers) {}
  void take(uint64_t length, std::vector<iovec>& out) {
    while (length > 0) {
      require(index_ < buffers_.size(), "image extents cover more than the request's buffers");
      const auto& span = buffers_[index_];
      uint64_t n = std::min<uint64_t>(span.size() - offset_, length);
      out.push_back({span.data() + offset_, n});
      length -= n;
      offset_ += n;
      if (offset_ == span.size()) {
        ++index_;
        offset_ = 0;
      }
    }
  }

 private:
  std::span<const ipc::vhost::GuestSpan> buffers_;
  size_t index_ = 0;
  uint64_t offset_ = 0;
};

}  // namespace

UringQueue::UringQueue(BlockImage& image, unsigned entries, int eventFd) : image_(image) {
  io_uring_params params{};
  params.flags = IORING_SETUP_CQSIZE;
  params.cq_entries = entries * 4;
  int rc = io_uring_queue_init_params(entries, &ring_, &params);
  if (rc < 0) throwSystemError(-rc, "create io_uring for the block queue");
  rc = io_uring_register_eventfd(&ring_, eventFd);
  if (rc < 0) {
    io_uring_queue_exit(&ring_);
    throwSystemError(-rc, "register the completion eventfd with io_uring");
  }
}

UringQueue::~UringQueue() {
  try {
    drain();
  } catch (...) {
    // The ring goes away with the process's view of the requests; nothing left to tell.
  }
  io_uring_queue_exit(&ring_);
}

void UringQueue::read(uint64_t offset, uint64_t length,
                      std::span<const ipc::vhost::GuestSpan> buffers, Done done) {
  start(true, offset, length, buffers, std::move(done));
}

void UringQueue::write(uint64_t offset, uint64_t length,
                       std::span<const ipc::vhost::GuestSpan> buffers, Done done) {
  start(false, offset, length, buffers, std::move(done));
}

void UringQueue::start(bool isRead, uint64_t offset, uint64_t length,
                       std::span<const ipc::vhost::GuestSpan> buffers, Done done) {
  auto request = std::make_unique<Request>();
  try {
    extents_.clear();
    if (isRead) {
      image_.mapRead(offset, length, extents_);
    } else {
      image_.mapWrite(offset, length, extents_);
    }
    uint64_t covered = 0;
    for (const auto& e : extents_) covered += e.length;
    require(covered == length, "the image mapped {} bytes of a {}-byte request", covered, length);
    BufferCursor cursor(buffers);
    for (const auto& extent : extents_) {
      std::vector<iovec> iov;
      cursor.take(extent.length, iov);
      switch (extent.kind) {
        case ImageExtent::Kind::kFile: {
          auto op = std::make_unique<Op>();
          op->request = request.get();
          op->isRead = isRead;
          op->fd = extent.fd;
          op->fileOffset = extent.fileOffset;
          op->iov = std::move(iov);
          request->ops.push_back(std::move(op));
          break;
        }
        case ImageExtent::Kind::kZero:
          require(isRead, "the image mapped a write onto a zero extent");
          for (const auto& v : iov) std::memset(v.iov_base, 0, v.iov_len);
          break;
        case ImageExtent::Kind::kBuffer: {
          require(isRead && extent.buffer &&
                      extent.bufferOffset <= extent.buffer->size() &&
                      extent.length <= extent.buffer->size() - extent.bufferOffset,
                  "the image mapped a request onto a bad buffer extent");
          const uint8_t* source = extent.buffer->data() + extent.bufferOffset;
          for (const auto& v : iov) {
            std::memcpy(v.iov_base, source, v.iov_len);
            source += v.iov_len;
          }
          break;
        }
      }
    }
  } catch (const Error&) {
    done(false);
    return;
  }
  if (request->ops.empty()) {
    done(true);
    return;
  }
  request->done = std::move(done);
  // One extra count while queueing, so an op that fails at once cannot finish the request
  // under the loop.
  request->opsLeft = request->ops.size() + 1;
  Request* raw = request.release();
  ++inFlight_;
  for (auto& op : raw->ops) queueOp(*op);
  io_uring_submit(&ring_);
  Op guard;
  guard.request = raw;
  finishOp(guard, true);
}

void UringQueue::queueOp(Op& op) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    io_uring_submit(&ring_);  // makes room: submitted entries leave the submission queue
    sqe = io_uring_get_sqe(&ring_);
  }
  if (sqe == nullptr) {
    finishOp(op, false);
    return;
  }
  if (op.isRead) {
    io_uring_prep_readv(sqe, op.fd, op.iov.data(), static_cast<unsigned>(op.iov.size()),
                        op.fileOffset);
  } else {
    io_uring_prep_writev(sqe, op.fd, op.iov.data(), static_cast<unsigned>(op.iov.size()),
                         op.fileOffset);
  }
  io_uring_sqe_set_data(sqe, &op);
}

void UringQueue::handle(io_uring_cqe* cqe) {
  auto* op = static_cast<Op*>(io_uring_cqe_get_data(cqe));
  int res = cqe->res;
  if (res == -EINTR || res == -EAGAIN) {
    queueOp(*op);
    io_uring_submit(&ring_);
    return;
  }
  if (res < 0) {
    finishOp(*op, false);
    return;
  }
  uint64_t done = static_cast<uint64_t>(res);
  uint64_t wanted = iovBytes(op->iov);
  if (done >= wanted) {
    finishOp(*op, true);
    return;
  }
  if (done == 0) {
    if (!op->isRead) {
      finishOp(*op, false);  // a write that makes no progress
      return;
    }
    for (const auto& v : op->iov) std::memset(v.iov_base, 0, v.iov_len);  // past end of file
    finishOp(*op, true);
    return;
  }
  advance(op->iov, done);
  op->fileOffset += done;
  queueOp(*op);
  io_uring_submit(&ring_);
}

void UringQueue::finishOp(Op& op, bool ok) {
  Request* request = op.request;
  if (!ok) request->ok = false;
  if (--request->opsLeft > 0) return;
  std::unique_ptr<Request> owned(request);
  --inFlight_;
  owned->done(owned->ok);
}

void UringQueue::reap() {
  io_uring_cqe* cqe = nullptr;
  while (io_uring_peek_cqe(&ring_, &cqe) == 0 && cqe != nullptr) {
    io_uring_cqe copy = *cqe;
    io_uring_cqe_seen(&ring_, cqe);
    handle(&copy);
  }
}

void UringQueue::drain() {
  while (inFlight_ > 0) {
    io_uring_cqe* cqe = nullptr;
    int rc = io_uring_wait_cqe(&ring_, &cqe);
    if (rc == -EINTR) continue;
    if (rc < 0) throwSystemError(-rc, "wait for block I/O to finish");
    io_uring_cqe copy = *cqe;
    io_uring_cqe_seen(&ring_, cqe);
    handle(&copy);
  }
}

}  // namespace clonevm::block
