#pragma once
// The virtio-blk device model (VIRTIO 1.2 section 5.2) on a BlockImage, independent of its
// transport: it implements VhostUserDevice, and the vhost-user back-end library carries it.
//
// Requests are parsed (and validated) by parseBlkRequest(); reads and writes go to the
// queue's io_uring and complete from the device's event fd; flush, discard and write-zeroes
// are done at once through the image. Per-queue counters feed the control socket's stats.

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "dev-block/image/block_image.h"
#include "dev-block/uring_io.h"
#include "dev-block/virtio_blk_request.h"
#include "ipc/vhost-user/backend.h"

namespace clonevm::block {

// virtio-blk feature bits (VIRTIO 1.2 5.2.3).
namespace blkfeature {
inline constexpr unsigned kSegMax = 2;
inline constexpr unsigned kReadOnly = 5;
inline constexpr unsigned kBlkSize = 6;
inline constexpr unsigned kFlush = 9;
inline constexpr unsigned kMq = 12;
inline constexpr unsigned kDiscard = 13;
inline constexpr unsigned kWriteZeroes = 14;
}  // namespace blkfeature

// The config space fields we offer (VIRTIO 1.2 5.2.4), in its little-endian layout.
struct __attribute__((packed)) VirtioBlkConfig {
  uint64_t capacity;
  uint32_t sizeMax;
  uint32_t segMax;
  uint16_t cylinders;
  uint8_t heads;
  uint8_t sectors;
  uint32_t blkSize;
  uint8_t physicalBlockExp;
  uint8_t alignmentOffset;
  uint16_t minIoSize;
  uint32_t optIoSize;
  uint8_t writeback;
  uint8_t unused0;
  uint16_t numQueues;
  uint32_t maxDiscardSectors;
  uint32_t maxDiscardSeg;
  uint32_t discardSectorAlignment;
  uint32_t maxWriteZeroesSectors;
  uint32_t maxWriteZeroesSeg;
  uint8_t writeZeroesMayUnmap;
  uint8_t unused1[3];
};
static_assert(sizeof(VirtioBlkConfig) == 60);

struct BlkDeviceOptions {
  uint16_t queues = 1;
  bool readOnly = false;     // also forced when the image is read-only
  std::string serial = "clone-block";  // GET_ID, at most 20 bytes
  uint32_t maxQueueSize = 1024;
  unsigned ringEntries = 256;  // io_uring submission entries per queue
};

// Counters of one queue; read from other threads (the control socket).
struct BlkQueueStats {
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytesRead{0};
  std::atomic<uint64_t> bytesWritten{0};
  std::atomic<uint64_t> flushes{0};
  std::atomic<uint64_t> errors{0};  // requests answered IOERR or UNSUPP
};

class VirtioBlkDevice : public ipc::vhost::VhostUserDevice {
 public:
  // Seg and sector limits advertised for discard and write-zeroes.
  static constexpr uint32_t kMaxDiscardSegments = 32;
  static constexpr uint32_t kMaxDiscardSectors = 1u << 21;  // 1 GiB
  static constexpr uint32_t kSegMax = 126;

  VirtioBlkDevice(BlockImage& image, BlkDeviceOptions options, spdlog::logger& log);
  ~VirtioBlkDevice() override;

  uint64_t features() const override;
  uint16_t queueCount() const override { return options_.queues; }
  uint32_t maxQueueSize() const override { return options_.maxQueueSize; }
  size_t configSize() const override { return sizeof(VirtioBlkConfig); }
  void readConfig(uint32_t offset, std::span<uint8_t> out) const override;
  void onFeaturesAcked(uint64_t features) override;
  void processQueue(ipc::vhost::Virtqueue& queue) override;
  void onQueueStarted(ipc::vhost::Virtqueue& queue) override;
  void onQueueStopped(ipc::vhost::Virtqueue& queue) override;
  void onReset() override;
  void onDisconnect() override;
  int deviceEventFd() const override { return eventFd_.get(); }
  void onDeviceEvent() override;
  void drain() override;

  const VirtioBlkConfig& config() const { return config_; }
  const BlkLimits& limits() const { return limits_; }
  bool readOnly() const { return limits_.readOnly; }
  const BlkQueueStats& stats(uint16_t queue) const { return *stats_.at(queue); }
  // Requests whose I/O is still running, over all queues (loop thread).
  size_t inFlight() const;
  // For the control socket (any thread): queues the ring walker refused (bit per queue) and
  // whether a front-end has negotiated features since the last disconnect.
  uint64_t brokenQueueMask() const { return brokenQueues_.load(std::memory_order_relaxed); }
  bool frontendConnected() const { return frontendConnected_.load(std::memory_order_relaxed); }

 private:
  void finish(ipc::vhost::Virtqueue& queue, const ipc::vhost::VirtqueueRequest& request,
              std::span<uint8_t> status, uint8_t value, uint32_t dataWritten);
  uint8_t runNow(const ParsedBlkRequest& parsed);
  void drainAll();

  BlockImage& image_;
  BlkDeviceOptions options_;
  spdlog::logger& log_;
  VirtioBlkConfig config_{};
  BlkLimits limits_;
  UniqueFd eventFd_;
  std::vector<std::unique_ptr<UringQueue>> rings_;
  std::vector<std::unique_ptr<BlkQueueStats>> stats_;
  uint64_t loggedFailures_ = 0;
  std::atomic<uint64_t> brokenQueues_{0};
  std::atomic<bool> frontendConnected_{false};
};

}  // namespace clonevm::block
