#pragma once
// The back-end side of vhost-user: the library owns the protocol, a device implements
// VhostUserDevice (like QEMU's libvhost-user VuDevIface) and sees only its callbacks.
//
//   class EchoDevice : public VhostUserDevice { ... processQueue(Virtqueue& q) { while (auto r = q.pop()) ... q.complete(*r, n); } };
//   EchoDevice device;
//   VhostUserBackend backend(device, log);
//   backend.serveFd(listenUnixSocket("/run/clone/blk.sock"));   // or serveFd(UniqueFd(--fd))
//
// One front-end is served at a time; when it disconnects or sends something malformed the
// connection is dropped (logged), the device hears onDisconnect(), and the back-end waits for
// the next front-end on the listening socket. Everything runs on the thread that called
// serve*(): an epoll loop over the socket, one kick eventfd per started queue and a stop
// eventfd, plus the device's own event fd when it has one (asynchronous completion, below).
//
// Replies: a request that fails (bad payload, bad queue index, overlapping memory, ring
// addresses outside memory, ...) is answered with a non-zero REPLY_ACK when the front-end
// asked for one; otherwise the connection is dropped, since the front-end would never learn
// that its request was ignored. GET_CONFIG failures get the spec's zero-length reply.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "ipc/vhost-user/channel.h"
#include "ipc/vhost-user/guest_memory_map.h"
#include "ipc/vhost-user/message.h"
#include "ipc/vhost-user/virtqueue.h"

namespace clonevm::ipc::vhost {

// Transport feature bits a modern device should offer; a device ORs them into features().
inline constexpr uint64_t kLibraryTransportFeatures =
    bit(feature::kVersion1) | bit(feature::kRingIndirectDesc) | bit(feature::kRingEventIdx) |
    bit(feature::kProtocolFeatures);
// Every transport bit (24..40) the library implements. The legacy NOTIFY_ON_EMPTY and
// ANY_LAYOUT may be offered too; other transport bits are masked off whatever the device says.
inline constexpr uint64_t kSupportedTransportFeatures =
    kLibraryTransportFeatures | bit(feature::kNotifyOnEmpty) | bit(feature::kAnyLayout);

// Protocol features this library implements.
inline constexpr uint64_t kLibraryProtocolFeatures =
    bit(protocol::kMq) | bit(protocol::kReplyAck) | bit(protocol::kBackendReq) |
    bit(protocol::kConfig) | bit(protocol::kInflightShmfd) | bit(protocol::kResetDevice) |
    bit(protocol::kConfigureMemSlots) | bit(protocol::kStatus);

class VhostUserDevice {
 public:
  virtual ~VhostUserDevice() = default;

  // Virtio features offered: the device type's bits plus the transport bits it wants from
  // kLibraryTransportFeatures (VERSION_1 at least, for a modern device).
  virtual uint64_t features() const = 0;
  // Protocol features wanted; masked to kLibraryProtocolFeatures (CONFIG also needs a config
  // space). The default takes all of them.
  virtual uint64_t protocolFeatures() const { return kLibraryProtocolFeatures; }
  // Number of virtqueues (GET_QUEUE_NUM) and the largest queue size accepted.
  virtual uint16_t queueCount() const = 0;
  virtual uint32_t maxQueueSize() const { return kMaxQueueSize; }
  // GET_MAX_MEM_SLOTS answer (memory regions mapped at once).
  virtual size_t maxMemorySlots() const { return GuestMemoryMap::kDefaultMaxRegions; }

  // The virtio config space. readConfig/writeConfig get ranges already checked against
  // configSize(). writeConfig may throw clonevm::Error to refuse (read-only field).
  virtual size_t configSize() const { return 0; }
  virtual void readConfig(uint32_t offset, std::span<uint8_t> out) const {
    (void)offset;
    (void)out;
  }
  virtual void writeConfig(uint32_t offset, std::span<const uint8_t> data, ConfigFlags flags);

  // SET_FEATURES: the virtio features the driver accepted (without the vhost-user bit 30).
  virtual void onFeaturesAcked(uint64_t features) { (void)features; }
  // SET_STATUS: the virtio device status byte.
  virtual void onStatus(uint8_t status) { (void)status; }
  // A queue's kick fd was set: it may be processed from now on.
  virtual void onQueueStarted(Virtqueue& queue) { (void)queue; }
  // GET_VRING_BASE, reset or disconnect: finish with the queue before this returns.
  virtual void onQueueStopped(Virtqueue& queue) { (void)queue; }
  // The driver kicked a started, enabled queue: pop() requests until it returns nullopt and
  // complete() each. The library signals the driver (notifyIfNeeded) after this returns.
  virtual void processQueue(Virtqueue& queue) = 0;
  // RESET_DEVICE.
  virtual void onReset() {}
  // The front-end went away; the next one starts from scratch.
  virtual void onDisconnect() {}

  // --- Asynchronous completion (optional). A device that finishes requests after
  // processQueue() returned (io_uring) keeps them and gives the loop an fd to watch. When it
  // is readable the loop calls onDeviceEvent(), where the device complete()s what finished;
  // the library then signals every started queue. A request's spans point into guest memory,
  // so the library calls drain() before the memory table changes, and onQueueStopped() (also
  // called on reset and disconnect) must likewise complete everything in flight on its queue.
  // The fd is read once when the connection starts and must stay the same while it lasts.
  virtual int deviceEventFd() const { return -1; }
  virtual void onDeviceEvent() {}
  // Waits for every request in flight and complete()s it.
  virtual void drain() {}
};

// Hooks the event loop gives a session to watch kick eventfds. A failure to watch throws and
// fails the SET_VRING_KICK that asked for it.
class KickWatcher {
 public:
  virtual ~KickWatcher() = default;
  virtual void watchKick(uint16_t queue, int fd) = 0;
  virtual void unwatchKick(uint16_t queue, int fd) = 0;
};

// The protocol state of one front-end connection: negotiated features, guest memory, queues,
// inflight region and the back-end request channel. Used by VhostUserBackend; tests and the
// fuzzer drive it directly with handle() and onKick().
class BackendSession {
 public:
  // `watcher` may be null (no event loop: kicks are delivered by calling onKick()).
  BackendSession(VhostUserDevice& device, spdlog::logger& log, KickWatcher* watcher = nullptr);
  ~BackendSession();
  BackendSession(const BackendSession&) = delete;
  BackendSession& operator=(const BackendSession&) = delete;

  // Handles one request as received (it is validated here). Returns the reply to send, if
  // any. Throws clonevm::Error when the connection must be dropped.
  std::optional<Message> handle(Message message);

  // The kick eventfd of `queue` is readable (or, with consumeEventfd false, a kick is
  // delivered by hand): processes the queue if it is started and enabled.
  void onKick(uint16_t queue, bool consumeEventfd = true);

  // The device's event fd is readable: lets the device complete requests, then signals the
  // queues that have new used entries.
  void onDeviceEvent();

  // The front-end disconnected: stops every queue and tells the device.
  void close();

  // Sends CONFIG_CHANGE_MSG to the front-end if it gave us a back-end request channel and
  // negotiated CONFIG. Returns whether it was sent.
  bool notifyConfigChanged();

  uint64_t ackedFeatures() const { return ackedFeatures_; }
  uint64_t ackedProtocolFeatures() const { return ackedProtocolFeatures_; }
  uint64_t offeredFeatures() const;
  uint64_t offeredProtocolFeatures() const;
  uint8_t status() const { return status_; }
  const GuestMemoryMap& memory() const { return memory_; }

  // Postcopy (VHOST_USER_PROTOCOL_F_PAGEFAULT): offered when set. `newUserfaultfd` makes a
  // userfaultfd of this process, its UFFDIO_API handshake done, for each POSTCOPY_ADVISE; the memory table that follows
  // POSTCOPY_LISTEN is registered with it (missing pages), and the front-end resolves the
  // faults. The session keeps no copy once its mappings are registered: when the front-end
  // closes its copy (or dies), the registration ends and no thread stays blocked on a fault.
  void enablePostcopy(std::function<UniqueFd()> newUserfaultfd) {
    newUserfaultfd_ = std::move(newUserfaultfd);
  }
  bool postcopyRegistered() const { return postcopyRegistered_; }
  std::span<Virtqueue> queues() { return queues_; }

 private:
  std::optional<Message> dispatch(Message& message);
  Virtqueue& queueAt(uint32_t index);
  void requireProtocolFeature(unsigned feature, FrontendRequest request) const;
  void stopQueue(Virtqueue& queue);
  void processQueue(Virtqueue& queue);
  void resetDevice();
  void drainDevice();  // before the memory table changes
  void notifyStartedQueues();

  std::optional<Message> postcopyAdvise();
  std::optional<Message> postcopyMemoryTable(Message& message);
  void registerPostcopy(const Message& acknowledgement);

  std::optional<Message> getInflightFd(const Message& message);
  void setInflightFd(Message& message);
  void setVringKick(Message& message);

  VhostUserDevice& device_;
  spdlog::logger& log_;
  KickWatcher* watcher_;

  uint64_t ackedFeatures_ = 0;
  uint64_t ackedProtocolFeatures_ = 0;
  bool featuresSet_ = false;
  bool owned_ = false;
  uint8_t status_ = 0;
  GuestMemoryMap memory_;
  std::vector<Virtqueue> queues_;
  std::vector<bool> pendingKick_;  // kicked while disabled
  Channel backendChannel_;

  struct InflightArea {
    void* base = nullptr;
    size_t length = 0;
  };
  InflightArea inflight_;
  void unmapInflight();

  std::function<UniqueFd()> newUserfaultfd_;
  UniqueFd postcopyFd_;              // from ADVISE until the mappings are registered
  bool postcopyListening_ = false;   // LISTEN received: the next memory table is postcopy's
  bool awaitingPostcopyAck_ = false; // its answer sent, the front-end's go-ahead not yet in
  bool postcopyRegistered_ = false;
};

struct BackendOptions {
  // A front-end that stops in the middle of a message for this long is dropped, so a stuck
  // peer cannot hang the device process.
  std::chrono::milliseconds messageTimeout{5000};
  // Offers postcopy to every front-end (BackendSession::enablePostcopy) when set.
  std::function<UniqueFd()> newUserfaultfd;
};

// Serves front-ends for one device. Not thread-safe except stop().
class VhostUserBackend {
 public:
  VhostUserBackend(VhostUserDevice& device, spdlog::logger& log, BackendOptions options = {});
  ~VhostUserBackend();
  VhostUserBackend(const VhostUserBackend&) = delete;
  VhostUserBackend& operator=(const VhostUserBackend&) = delete;

  // Accepts front-ends on a listening socket one at a time, until stop().
  void serveListener(int listener);
  // Serves one connected front-end until it disconnects or stop(). Returns normally after a
  // disconnect or a dropped connection (both are logged).
  void serveConnection(UniqueFd connection);
  // --fd: a listening socket gets serveListener(), a connected one serveConnection().
  void serveFd(UniqueFd fd);
  // Makes serve*() return soon; callable from any thread or a signal handler.
  void stop();
  bool stopping() const;

  // The session of the connected front-end (null between connections). Loop thread only.
  BackendSession* session() { return session_.get(); }
  // Connections served so far (tests).
  uint64_t connectionsServed() const { return connectionsServed_; }

 private:
  class Loop;
  void runConnection(int epoll, Channel& channel);

  VhostUserDevice& device_;
  spdlog::logger& log_;
  BackendOptions options_;
  UniqueFd stopFd_;
  std::unique_ptr<BackendSession> session_;
  uint64_t connectionsServed_ = 0;
};

// Backend program conventions (vhost-user.rst): --socket-path is listenUnixSocket() (in
// channel.h), --fd is serveFd(), and --print-capabilities prints this JSON:
// The --print-capabilities JSON: {"type": "<type>", "features": [ ... ]}.
std::string capabilitiesJson(const std::string& type, const std::vector<std::string>& features);

}  // namespace clonevm::ipc::vhost
