#include "dev-block/virtio_blk_device.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>

#include "common/error.h"

namespace clonevm::block {

using ipc::vhost::bit;
using ipc::vhost::hasBit;
using ipc::vhost::Virtqueue;
using ipc::vhost::VirtqueueRequest;

namespace {
// A hostile guest can fail requests in a loop; the log gets the first ones.
constexpr uint64_t kLoggedFailures = 20;
}  // namespace

VirtioBlkDevice::VirtioBlkDevice(BlockImage& image, BlkDeviceOptions options,
                                 spdlog::logger& log)
    : image_(image), options_(std::move(options)), log_(log) {
  require(options_.queues >= 1 && options_.queues <= 256, "--queues must be 1 to 256, not {}",
          options_.queues);
  require(options_.serial.size() <= blk::kIdBytes, "the serial is at most {} bytes",
          blk::kIdBytes);
  limits_.readOnly = options_.readOnly || image.readOnly();
  limits_.capacitySectors = image.virtualSize() / kSectorSize;
  limits_.maxDiscardSectors = kMaxDiscardSectors;
  limits_.maxDiscardSegments = kMaxDiscardSegments;
  limits_.maxWriteZeroesSectors = kMaxDiscardSectors;
  limits_.maxWriteZeroesSegments = kMaxDiscardSegments;

  config_.capacity = limits_.capacitySectors;
  config_.segMax = kSegMax;
  config_.blkSize = kSectorSize;
  config_.numQueues = options_.queues;
  config_.maxDiscardSectors = limits_.maxDiscardSectors;
  config_.maxDiscardSeg = limits_.maxDiscardSegments;
  config_.discardSectorAlignment = std::max<uint32_t>(image.clusterSize() / kSectorSize, 1);
  config_.maxWriteZeroesSectors = limits_.maxWriteZeroesSectors;
  config_.maxWriteZeroesSeg = limits_.maxWriteZeroesSegments;
  config_.writeZeroesMayUnmap = 1;

  eventFd_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                                    "create the block completion eventfd"));
  for (uint16_t i = 0; i < options_.queues; ++i) {
    rings_.push_back(std::make_unique<UringQueue>(image_, options_.ringEntries, eventFd_.get()));
    stats_.push_back(std::make_unique<BlkQueueStats>());
  }
}

VirtioBlkDevice::~VirtioBlkDevice() = default;

uint64_t VirtioBlkDevice::features() const {
  uint64_t features = ipc::vhost::kLibraryTransportFeatures | bit(blkfeature::kSegMax) |
                      bit(blkfeature::kBlkSize) | bit(blkfeature::kFlush) |
                      bit(blkfeature::kMq) | bit(blkfeature::kDiscard) |
                      bit(blkfeature::kWriteZeroes);
  if (limits_.readOnly) features |= bit(blkfeature::kReadOnly);
  return features;
}

void VirtioBlkDevice::readConfig(uint32_t offset, std::span<uint8_t> out) const {
  std::memcpy(out.data(), reinterpret_cast<const uint8_t*>(&config_) + offset, out.size());
}

void VirtioBlkDevice::onFeaturesAcked(uint64_t features) {
  limits_.discard = hasBit(features, blkfeature::kDiscard);
  limits_.writeZeroes = hasBit(features, blkfeature::kWriteZeroes);
  frontendConnected_ = true;
  log_.info("virtio-blk features acked {:#x}", features);
}

void VirtioBlkDevice::finish(Virtqueue& queue, const VirtqueueRequest& request,
                             std::span<uint8_t> status, uint8_t value, uint32_t dataWritten) {
  BlkQueueStats& stats = *stats_[queue.index()];
  if (value != blk::kStatusOk) stats.errors.fetch_add(1, std::memory_order_relaxed);
  if (status.empty()) {
    queue.complete(request, 0);
    return;
  }
  status[0] = value;
  queue.complete(request, dataWritten + 1);
}

uint8_t VirtioBlkDevice::runNow(const ParsedBlkRequest& parsed) {
  try {
    switch (parsed.op) {
      case BlkOp::kFlush:
        if (!limits_.readOnly) image_.flush();
        return blk::kStatusOk;
      case BlkOp::kDiscard:
      case BlkOp::kWriteZeroes:
        // A cluster freed here must not be under a read or write still in flight.
        drainAll();
        for (const auto& range : parsed.ranges) {
          if (parsed.op == BlkOp::kDiscard) {
            image_.discard(range.offset, range.length);
          } else {
            image_.writeZeroes(range.offset, range.length, range.unmap);
          }
        }
        return blk::kStatusOk;
      default:
        return blk::kStatusIoErr;
    }
  } catch (const Error& e) {
    if (loggedFailures_++ < kLoggedFailures) log_.error("virtio-blk: {}", e.what());
    return blk::kStatusIoErr;
  }
}

void VirtioBlkDevice::processQueue(Virtqueue& queue) {
  BlkQueueStats& stats = *stats_[queue.index()];
  UringQueue& ring = *rings_[queue.index()];
  while (auto popped = queue.pop()) {
    stats.requests.fetch_add(1, std::memory_order_relaxed);
    ParsedBlkRequest parsed = parseBlkRequest(*popped, limits_);
    switch (parsed.op) {
      case BlkOp::kFailed:
        if (loggedFailures_++ < kLoggedFailures) {
          log_.warn("virtio-blk queue {}: bad request: {}", queue.index(), parsed.failReason);
        }
        finish(queue, *popped, parsed.status, parsed.failStatus, 0);
        break;

      case BlkOp::kRead:
      case BlkOp::kWrite: {
        bool isRead = parsed.op == BlkOp::kRead;
        auto done = [this, &queue, request = std::move(*popped), status = parsed.status,
                     length = parsed.length, isRead](bool ok) {
          BlkQueueStats& s = *stats_[queue.index()];
          if (ok) {
            (isRead ? s.bytesRead : s.bytesWritten).fetch_add(length, std::memory_order_relaxed);
          } else if (loggedFailures_++ < kLoggedFailures) {
            log_.error("virtio-blk queue {}: {} of {} bytes failed", queue.index(),
                       isRead ? "read" : "write", length);
          }
          finish(queue, request, status, ok ? blk::kStatusOk : blk::kStatusIoErr,
                 ok && isRead ? static_cast<uint32_t>(length) : 0);
        };
        if (isRead) {
          ring.read(parsed.offset, parsed.length, parsed.data, std::move(done));
        } else {
          ring.write(parsed.offset, parsed.length, parsed.data, std::move(done));
        }
        break;
      }

      case BlkOp::kGetId: {
        char id[blk::kIdBytes] = {};
        std::memcpy(id, options_.serial.data(), options_.serial.size());
        uint64_t copied = 0;
        for (auto span : parsed.data) {
          std::memcpy(span.data(), id + copied, span.size());
          copied += span.size();
        }
        finish(queue, *popped, parsed.status, blk::kStatusOk, static_cast<uint32_t>(copied));
        break;
      }

      case BlkOp::kFlush:
        stats.flushes.fetch_add(1, std::memory_order_relaxed);
        finish(queue, *popped, parsed.status, runNow(parsed), 0);
        break;

      case BlkOp::kDiscard:
      case BlkOp::kWriteZeroes:
        finish(queue, *popped, parsed.status, runNow(parsed), 0);
        break;
    }
  }
  if (queue.broken() && queue.index() < 64) {
    brokenQueues_.fetch_or(uint64_t{1} << queue.index(), std::memory_order_relaxed);
  }
}

void VirtioBlkDevice::onDeviceEvent() {
  uint64_t count;
  ssize_t n = ::read(eventFd_.get(), &count, sizeof(count));
  (void)n;  // EAGAIN: the completions were reaped by a drain already
  for (auto& ring : rings_) ring->reap();
}

void VirtioBlkDevice::drainAll() {
  for (auto& ring : rings_) ring->drain();
}

void VirtioBlkDevice::drain() { drainAll(); }

void VirtioBlkDevice::onQueueStarted(Virtqueue& queue) {
  // A restarted queue is set up afresh by the front-end.
  if (queue.index() < 64) {
    brokenQueues_.fetch_and(~(uint64_t{1} << queue.index()), std::memory_order_relaxed);
  }
}

void VirtioBlkDevice::onQueueStopped(Virtqueue& queue) { rings_.at(queue.index())->drain(); }

void VirtioBlkDevice::onReset() { drainAll(); }

void VirtioBlkDevice::onDisconnect() {
  drainAll();
  brokenQueues_ = 0;
  frontendConnected_ = false;
}

size_t VirtioBlkDevice::inFlight() const {
  size_t total = 0;
  for (const auto& ring : rings_) total += ring->inFlight();
  return total;
}

}  // namespace clonevm::block
