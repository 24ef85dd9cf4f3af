#pragma once
// virtio-vsock (virtio 1.2 section 5.10) served by the kernel's vhost-vsock
// (/dev/vhost-vsock): the VirtioDeviceBackend that VirtioPciDevice carries to the guest.
// The guest agent (docs/AGENT.md) is reached through it.
//
// Queues: 0 rx and 1 tx belong to the kernel, which reads the transport's kick eventfds
// (KVM ioeventfds) and writes its call eventfds (KVM irqfds), on this process's mm: the
// data path never enters the core. Queue 2, the event queue, is the core's own: its
// buffers stay posted until sendTransportReset() uses one.
//
// Life of one device:
//   construction  open /dev/vhost-vsock, SET_OWNER, GET_FEATURES, SET_MEM_TABLE (guest RAM
//                 regions at their host addresses), SET_GUEST_CID (a taken CID fails with
//                 EADDRINUSE; the automatic choice then tries the next one).
//   activate()    SET_FEATURES, per kernel queue SET_VRING_NUM/BASE/ADDR/KICK/CALL, then
//                 SET_RUNNING 1.
//   reset()       SET_RUNNING 0, kick/call detached; the next activation starts the rings
//                 at 0 as virtio requires.
//
// After a snapshot restore or for a fork (DESIGN.md §6, "vsock CID"):
//   stop()          SET_RUNNING 0: the kernel stops touching guest memory (before saving it).
//   saveState()     the rx/tx ring positions (VHOST_GET_VRING_BASE) and the event queue's,
//                   plus the CID; call it while stopped.
//   restoreState()  before activate() (the transport re-activates a restored device): the
//                   next activation programs those positions instead of 0. On an active
//                   device: stop, SET_VRING_BASE, event queue positions, start. It does
//                   not change the CID (two VMs cannot share one): a fork takes a fresh
//                   CID with setGuestCid().
//   start()         SET_RUNNING 1 again.
//   setGuestCid()   gives the device a new CID: SET_RUNNING 0, SET_GUEST_CID, config
//                   update (config change interrupt), SET_RUNNING 1, then a transport reset
//                   event, on which Linux re-reads guest_cid and resets its connections.
//
// Threading: the transport calls in from vCPU threads one at a time; the fork code calls
// the methods above from its own thread. One mutex serialises both.

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/virtio/split_queue.h"
#include "vmm-core/virtio/virtio_backend.h"

namespace clonevm::vmm {

namespace vsock {
inline constexpr uint32_t kDeviceType = 19;
inline constexpr uint16_t kRxQueue = 0;
inline constexpr uint16_t kTxQueue = 1;
inline constexpr uint16_t kEventQueue = 2;
inline constexpr uint16_t kQueueSize = 256;
inline constexpr uint32_t kConfigSize = 8;  // le64 guest_cid
inline constexpr unsigned kFeatureSeqpacket = 1;  // VIRTIO_VSOCK_F_SEQPACKET
inline constexpr uint32_t kEventTransportReset = 0;
// CIDs a guest may have: 0, 1 and 2 are the hypervisor, local and host; U32_MAX is "any".
inline constexpr uint64_t kMinGuestCid = 3;
inline constexpr uint64_t kMaxGuestCid = 0xfffffffeull;
}  // namespace vsock

// The kernel side, one ioctl a method (linux/vhost.h), so tests can stand in for it.
// Methods throw SystemError naming the ioctl, except setGuestCid, which returns the errno
// (0 on success) because EADDRINUSE is an answer the caller acts on.
class VhostVsockKernel {
 public:
  struct VringAddresses {  // host virtual addresses of the three ring parts
    uint64_t desc = 0;
    uint64_t avail = 0;
    uint64_t used = 0;
  };
  virtual ~VhostVsockKernel() = default;
  virtual void setOwner() = 0;
  virtual uint64_t getFeatures() = 0;
  virtual void setFeatures(uint64_t features) = 0;
  virtual void setMemTable(const std::vector<MemoryRegion>& regions) = 0;
  virtual void setVringNum(uint16_t queue, uint16_t size) = 0;
  virtual void setVringBase(uint16_t queue, uint16_t base) = 0;
  virtual uint16_t getVringBase(uint16_t queue) = 0;
  virtual void setVringAddr(uint16_t queue, const VringAddresses& addresses) = 0;
  virtual void setVringKick(uint16_t queue, int fd) = 0;  // -1 detaches
  virtual void setVringCall(uint16_t queue, int fd) = 0;
  virtual int setGuestCid(uint64_t cid) = 0;
  virtual void setRunning(bool running) = 0;
};

// /dev/vhost-vsock itself.
std::unique_ptr<VhostVsockKernel> openVhostVsock(const std::string& path = "/dev/vhost-vsock");

struct VsockConfig {
  bool enabled = true;
  // 0: choose one automatically (a pid- and time-derived start, retried on EADDRINUSE).
  uint64_t guestCid = 0;
  std::string devicePath = "/dev/vhost-vsock";
};

// Device positions a snapshot must hold for vsock. The kernel queues' positions are their
// last available index (VHOST_GET_VRING_BASE); the kernel keeps no other per-ring state
// that outlives a stop (connections are reset by the transport reset a fork sends).
struct VhostVsockState {
  uint64_t guestCid = 0;
  uint16_t rxBase = 0;
  uint16_t txBase = 0;
  uint16_t eventNextAvail = 0;
  uint16_t eventNextUsed = 0;
};

class VhostVsockBackend final : public VirtioDeviceBackend {
 public:
  // Opens config.devicePath and takes config.guestCid (or an automatic CID). Throws
  // clonevm::Error: "--vsock-cid 42: CID already in use by another VM", "open
  // /dev/vhost-vsock: No such file or directory (modprobe vhost_vsock)".
  static std::shared_ptr<VhostVsockBackend> create(const VsockConfig& config,
                                                   const GuestMemory& memory,
                                                   spdlog::logger& log);
  // Over any kernel side (tests). `guestCid` 0 chooses automatically starting at
  // `autoStart`.
  VhostVsockBackend(std::unique_ptr<VhostVsockKernel> kernel, uint64_t guestCid,
                    const GuestMemory& memory, spdlog::logger& log, uint64_t autoStart = 0);
  ~VhostVsockBackend() override;
  VhostVsockBackend(const VhostVsockBackend&) = delete;
  VhostVsockBackend& operator=(const VhostVsockBackend&) = delete;

  uint64_t guestCid() const;
  bool active() const;

  // Sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue. False when the device is
  // not active or the driver has no event buffer posted (logged).
  bool sendTransportReset();
  // Moves the device to `cid` (see the header comment). Throws clonevm::Error when the CID
  // is out of range or taken; the old CID then stays.
  void setGuestCid(uint64_t cid);
  void stop();
  void start();
  VhostVsockState saveState();
  void restoreState(const VhostVsockState& state);

  // VirtioDeviceBackend.
  uint32_t deviceType() const override { return vsock::kDeviceType; }
  uint16_t numQueues() const override { return 3; }
  uint16_t maxQueueSize() const override { return vsock::kQueueSize; }
  uint64_t deviceFeatures() const override { return offeredFeatures_; }
  uint32_t configSize() const override { return vsock::kConfigSize; }
  void readConfig(uint32_t offset, std::span<uint8_t> data) override;
  void writeConfig(uint32_t offset, std::span<const uint8_t> data) override;
  void activate(const VirtioActivationInfo& info) override;
  void reset() override;

 private:
  void takeCidLocked(uint64_t cid, bool automatic, uint64_t autoStart);
  void resetLocked();
  bool sendEventLocked(uint32_t id);

  std::unique_ptr<VhostVsockKernel> kernel_;
  const GuestMemory& memory_;
  spdlog::logger& log_;
  uint64_t offeredFeatures_ = 0;

  mutable std::mutex mutex_;
  uint64_t guestCid_ = 0;
  bool active_ = false;
  bool running_ = false;
  std::function<void()> configChanged_;
  std::optional<SplitQueue> eventQueue_;
  int eventCallFd_ = -1;
  std::optional<VhostVsockState> pendingRestore_;  // applied by the next activate()
};

}  // namespace clonevm::vmm
