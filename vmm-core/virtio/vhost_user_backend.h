#pragma once
// A virtio device served by a vhost-user back-end process (ours, qemu-storage-daemon,
// virtiofsd): the VirtioDeviceBackend that VirtioPciDevice carries to the guest, built on
// the ipc vhost-user Frontend.
//
// Life of one device:
//   connect()   at VM setup, before the transport is built (the transport fixes its
//               feature offer at construction): GET_FEATURES, GET/SET_PROTOCOL_FEATURES,
//               SET_OWNER, GET_QUEUE_NUM (MQ), GET_CONFIG (blk), SET_MEM_TABLE with guest
//               RAM's memfd regions, SET_BACKEND_REQ_FD (config-change messages).
//   activate()  the driver set DRIVER_OK: SET_FEATURES with what the driver accepted, then
//               per enabled queue SET_VRING_NUM/BASE/ADDR (ring addresses translated to our
//               user addresses), SET_VRING_KICK (the transport's doorbell eventfd, which KVM
//               signals), SET_VRING_CALL (its MSI-X irqfd), SET_VRING_ENABLE.
//   reset()     SET_VRING_ENABLE 0 and GET_VRING_BASE on started queues (stops them),
//               RESET_DEVICE when negotiated.
//
// Data never passes through the core: the back-end maps guest RAM from the memfd, reads the
// kick eventfds and writes the call eventfds, which KVM turns into MSIs.
//
// A back-end that dies does not take the VM down: a watcher thread sees the socket hang up,
// logs "vhost-user-blk backend PATH disconnected; device 00:02.0 is no longer served" and
// calls the owner's callback. From then on config reads are served from the cache, resets
// are local, and a new activation fails (the transport then sets DEVICE_NEEDS_RESET).
// Reconnecting is later work.
//
// Threading: the transport calls the VirtioDeviceBackend methods from vCPU threads, one at a
// time; the watcher thread handles back-end requests (CONFIG_CHANGE_MSG) and hang-ups. One
// mutex guards the Frontend; the watcher never takes it, so a back-end that waits for our
// answer on its request channel cannot deadlock a vCPU waiting for its reply.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "ipc/vhost-user/frontend.h"
#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/memory/lazy_fill.h"
#include "vmm-core/virtio/virtio_backend.h"

namespace clonevm::vmm {

enum class VhostUserDeviceKind { kBlock, kFs };

// One --vhost-user-blk / --vhost-user-fs option.
struct VhostUserDeviceConfig {
  VhostUserDeviceKind kind = VhostUserDeviceKind::kBlock;
  std::string socketPath;  // or "fd=N" when socketFd is set
  // An already connected socket (`fd=N`), inherited from whoever started the core: a fork's
  // clone-block, which exits when the core closes it. -1: connect to socketPath.
  int socketFd = -1;
  // blk: request queues (default 1). fs: request queues, not counting the hiprio queue
  // (default 1). 0 means the default.
  uint16_t queues = 0;
  std::string tag;  // fs only: the mount tag, 1..36 bytes
  // The largest queue the driver may set up (QEMU's default queue-size for both devices).
  uint16_t queueSize = 128;
  // blk: the image the back-end serves (`image=PATH,format=F`, given by `clone run --disk`),
  // recorded in a template's manifest so that `clone snapshot` can copy it. The core never
  // opens it. A disk without it cannot be put in a template.
  std::string imagePath;
  std::string imageFormat;
  // How long to wait for each reply of the back-end; zero waits forever.
  std::chrono::milliseconds replyTimeout{10000};
};

// "vhost-user-blk" / "vhost-user-fs".
const char* vhostUserKindName(VhostUserDeviceKind kind);

// Parses the option values (docs/VMM.md):
//   --vhost-user-blk SOCKET|fd=N[,queues=N][,image=PATH][,format=raw|qcow2|auto]
//   --vhost-user-fs SOCKET:TAG[,queues=N]
// Throws clonevm::Error with a one-line message naming the option on bad syntax, a bad queue
// count or a bad tag (empty, longer than 36 bytes, not printable ASCII, or with a space).
VhostUserDeviceConfig parseVhostUserBlkOption(const std::string& value);
VhostUserDeviceConfig parseVhostUserFsOption(const std::string& value);

// virtio-blk and virtio-fs config space facts this frontend uses.
namespace vhost_user_config {
inline constexpr uint32_t kBlkConfigSize = 60;         // up to write_zeroes_may_unmap + pad
inline constexpr uint32_t kBlkMinConfigSize = 36;      // up to num_queues
inline constexpr uint32_t kBlkNumQueuesOffset = 34;    // le16
inline constexpr unsigned kBlkFeatureMq = 12;          // VIRTIO_BLK_F_MQ
inline constexpr uint32_t kFsTagSize = 36;
inline constexpr uint32_t kFsConfigSize = 40;          // tag[36], le32 num_request_queues
}  // namespace vhost_user_config

// What a template keeps of a vhost-user device beside its virtio-pci transport state: what
// was negotiated with the back-end and where each started queue stopped (GET_VRING_BASE).
// The back-end itself keeps no other state (clone-block: the disk is copied apart).
struct VhostUserDeviceState {
  struct Queue {  // fixed layout: stored as it is
    uint16_t index = 0;
    uint16_t size = 0;
    uint16_t availIndex = 0;  // the back-end's last_avail_idx; used == avail once stopped
    uint16_t reserved = 0;
  };
  uint32_t deviceType = 0;
  uint64_t backendFeatures = 0;   // GET_FEATURES of the template's back-end
  uint64_t ackedFeatures = 0;     // SET_FEATURES (the driver's choice); 0: never activated
  uint64_t protocolFeatures = 0;  // negotiated
  uint16_t numQueues = 0;
  std::vector<Queue> queues;      // the started queues, by ascending index
  std::vector<uint8_t> config;    // the config space as the guest saw it
};
static_assert(sizeof(VhostUserDeviceState::Queue) == 8);

class VhostUserBackend final : public VirtioDeviceBackend {
 public:
  // Connects to config.socketPath and negotiates (see above). Throws clonevm::Error with one
  // line, e.g. "--vhost-user-blk /run/blk.sock: connect to vhost-user socket /run/blk.sock:
  // No such file or directory".
  //
  // `lazyFill`: guest memory is a fork's, filled lazily. A back-end that offers PAGEFAULT
  // then gets postcopy (POSTCOPY_ADVISE and LISTEN before the memory table, which it answers
  // with where it mapped it), and its userfaultfd goes to `lazyFill`, which resolves its
  // faults; postcopy() says whether that happened.
  static std::shared_ptr<VhostUserBackend> connect(const VhostUserDeviceConfig& config,
                                                   const GuestMemory& memory,
                                                   spdlog::logger& log,
                                                   LazyMemoryFill* lazyFill = nullptr);
  // The same over an already connected front-end (tests: a socketpair).
  VhostUserBackend(ipc::vhost::Frontend frontend, const VhostUserDeviceConfig& config,
                   const GuestMemory& memory, spdlog::logger& log,
                   LazyMemoryFill* lazyFill = nullptr);
  ~VhostUserBackend() override;
  VhostUserBackend(const VhostUserBackend&) = delete;
  VhostUserBackend& operator=(const VhostUserBackend&) = delete;

  // Starts the watcher thread once the device has a place on the bus. `deviceName` names it
  // in logs (its PCI address, "00:02.0"); `onDisconnect` runs on the watcher thread after
  // the back-end hung up (may be empty).
  void startWatching(std::string deviceName, std::function<void()> onDisconnect = {});

  bool connected() const { return !disconnected_.load(); }
  const VhostUserDeviceConfig& config() const { return config_; }
  // Negotiated vhost-user protocol features and the back-end's raw virtio feature offer.
  uint64_t protocolFeatures() const { return protocolFeatures_; }
  uint64_t backendFeatures() const { return backendFeatures_; }
  // The back-end's faults on guest memory are resolved by the fork's lazy fill.
  bool postcopy() const { return postcopy_; }
  // Requests sent at activation so far (tests, diagnostics).
  uint64_t activations() const { return activations_.load(); }

  // Snapshot, with the vCPUs paused: stops every started queue (SET_VRING_ENABLE 0,
  // GET_VRING_BASE: the back-end completes what it has in flight before it answers, so guest
  // memory and the disk are quiet afterwards) and returns the state. Throws when the
  // back-end is disconnected or does not answer.
  VhostUserDeviceState suspend();
  // After the snapshot: starts the queues suspend() stopped where they stopped (the same
  // rings, eventfds and features).
  void resumeAfterSuspend();
  // A fork, before the transport's restoreState(): checks `state` against this back-end
  // (device type, queue count, features the driver had negotiated, capacity) and keeps the
  // queue positions for the activation the transport's restore triggers. Throws
  // clonevm::Error naming what differs.
  void restoreState(const VhostUserDeviceState& state);

  // VirtioDeviceBackend.
  uint32_t deviceType() const override;
  uint16_t numQueues() const override { return numQueues_; }
  uint16_t maxQueueSize() const override { return config_.queueSize; }
  uint64_t deviceFeatures() const override { return offeredFeatures_; }
  uint32_t configSize() const override { return configSpace_.size(); }
  void readConfig(uint32_t offset, std::span<uint8_t> data) override;
  void writeConfig(uint32_t offset, std::span<const uint8_t> data) override;
  void activate(const VirtioActivationInfo& info) override;
  void reset() override;
  void statusChanged(uint8_t oldStatus, uint8_t newStatus) override;

 private:
  void negotiate();
  // SET_MEM_TABLE, in postcopy mode when the back-end and a lazy fill allow it.
  void sendMemoryTable(std::span<const ipc::vhost::MemoryRegionSpec> regions);
  void fetchConfigLocked();
  void resetLocked();
  // SET_VRING_NUM/BASE/ADDR/KICK/CALL/ENABLE for one queue.
  void startQueueLocked(const VirtioQueueInfo& queue, uint16_t availIndex);
  void watch();
  void markDisconnected(const std::string& why);
  std::string describe() const;  // "vhost-user-blk backend /path"

  VhostUserDeviceConfig config_;
  const GuestMemory& memory_;
  spdlog::logger& log_;
  LazyMemoryFill* lazyFill_;
  bool postcopy_ = false;

  std::mutex mutex_;  // guards frontend_ and everything below that vCPU threads change
  ipc::vhost::Frontend frontend_;
  uint64_t backendFeatures_ = 0;
  uint64_t protocolFeatures_ = 0;
  uint64_t offeredFeatures_ = 0;
  uint16_t numQueues_ = 1;
  std::vector<uint8_t> configSpace_;
  std::vector<VirtioQueueInfo> startedQueues_;  // as activate() got them
  bool featuresSent_ = false;
  uint64_t ackedFeatures_ = 0;
  // Set by suspend(): the stopped queues' positions, for resumeAfterSuspend().
  std::vector<VhostUserDeviceState::Queue> suspendedQueues_;
  // Set by restoreState(): where the next activation starts each queue (index -> avail).
  std::vector<VhostUserDeviceState::Queue> restoredQueues_;

  // Config-change messages arrive on the watcher thread; the cache is refreshed lazily by
  // the next readConfig.
  std::atomic<bool> configStale_{false};
  std::mutex callbackMutex_;  // never held across I/O
  std::function<void()> configChanged_;

  std::atomic<bool> disconnected_{false};
  std::atomic<uint64_t> activations_{0};
  std::string deviceName_ = "(not placed)";
  std::function<void()> onDisconnect_;
  std::optional<ipc::vhost::BackendRequestChannel> requestChannel_;
  UniqueFd watchSocket_;  // a dup of the main socket, polled for hang-up
  UniqueFd stopFd_;       // eventfd that ends the watcher
  std::thread watcher_;
};

}  // namespace clonevm::vmm
