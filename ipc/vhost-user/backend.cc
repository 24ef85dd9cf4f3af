#include "ipc/vhost-user/backend.h"

#include <linux/userfaultfd.h>
#include <poll.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>

#include "common/error.h"

namespace clonevm::ipc::vhost {
namespace {

// Virtio feature bits 24..40 belong to the transport; the library decides which it offers.
constexpr uint64_t kTransportFeatureRange = ((uint64_t{1} << 41) - 1) & ~((uint64_t{1} << 24) - 1);

Message replyTo(FrontendRequest request, std::span<const uint8_t> payload) {
  return Message::make(static_cast<uint32_t>(request), kReplyFlag, payload);
}

template <typename T>
Message replyTo(FrontendRequest request, const T& body) {
  return Message::make(static_cast<uint32_t>(request), kReplyFlag, body);
}

// The regions of a SET_MEM_TABLE request (already validated: the count matches the size).
std::vector<MemoryRegion> memoryTableRegions(const Message& message) {
  auto header = message.payloadAs<MemoryTableHeader>();
  std::vector<MemoryRegion> regions(header.regionCount);
  if (!regions.empty()) {
    std::memcpy(regions.data(), message.payload.data() + sizeof(MemoryTableHeader),
                regions.size() * sizeof(MemoryRegion));
  }
  return regions;
}

uint64_t pageSize() { return static_cast<uint64_t>(::sysconf(_SC_PAGESIZE)); }

bool isPowerOfTwo(uint32_t value) { return value != 0 && (value & (value - 1)) == 0; }

// 256 queues of 32768 descriptors need about 128 MiB; anything beyond is not an inflight area.
constexpr uint64_t kMaxInflightBytes = uint64_t{1} << 30;

}  // namespace

void VhostUserDevice::writeConfig(uint32_t offset, std::span<const uint8_t> data,
                                  ConfigFlags flags) {
  (void)flags;
  throw Error(fmt::format("the device config space is read-only ({} bytes at offset {})",
                          data.size(), offset));
}

// --- BackendSession.

BackendSession::BackendSession(VhostUserDevice& device, spdlog::logger& log, KickWatcher* watcher)
    : device_(device), log_(log), watcher_(watcher), memory_(device.maxMemorySlots()) {
  uint16_t count = device.queueCount();
  require(count >= 1 && count <= 256, "vhost-user device must have 1 to 256 queues, has {}",
          count);
  queues_.reserve(count);
  for (uint16_t i = 0; i < count; ++i) queues_.emplace_back(i, log);
  pendingKick_.assign(count, false);
}

BackendSession::~BackendSession() {
  // Queues reference the inflight area and memory; drop them first.
  queues_.clear();
  unmapInflight();
}

void BackendSession::unmapInflight() {
  for (auto& queue : queues_) queue.setInflightRegion({});
  if (inflight_.base != nullptr) ::munmap(inflight_.base, inflight_.length);
  inflight_ = {};
}

uint64_t BackendSession::offeredFeatures() const {
  uint64_t wanted = device_.features();
  return (wanted & ~kTransportFeatureRange) | (wanted & kSupportedTransportFeatures) |
         bit(feature::kProtocolFeatures);
}

uint64_t BackendSession::offeredProtocolFeatures() const {
  uint64_t offered = device_.protocolFeatures() & kLibraryProtocolFeatures;
  if (device_.configSize() == 0) offered &= ~bit(protocol::kConfig);
  if (newUserfaultfd_) offered |= bit(protocol::kPagefault);
  return offered;
}

Virtqueue& BackendSession::queueAt(uint32_t index) {
  require(index < queues_.size(), "queue index {} is out of range, the device has {} queues",
          index, queues_.size());
  return queues_[index];
}

void BackendSession::requireProtocolFeature(unsigned featureBit, FrontendRequest request) const {
  require(hasBit(ackedProtocolFeatures_, featureBit), "{} needs {}, which was not negotiated",
          requestName(request), protocolFeatureName(featureBit));
}

std::optional<Message> BackendSession::handle(Message message) {
  FrontendRequest request = message.frontendRequest();
  MessageRule rule = frontendRequestRule(request);
  // An ack replaces nothing: requests with a reply of their own answer with it.
  bool ackWanted = message.needsReply() && !rule.hasReply &&
                   hasBit(ackedProtocolFeatures_, protocol::kReplyAck);
  bool validated = false;
  try {
    validateFrontendRequest(message);
    validated = true;
    log_.trace("vhost-user: {}", requestName(request));
    std::optional<Message> reply = dispatch(message);
    if (reply) return reply;
    if (ackWanted) return replyTo(request, uint64_t{0});
    return std::nullopt;
  } catch (const Error& e) {
    if (ackWanted) {
      log_.warn("vhost-user: {} failed: {}", requestName(request), e.what());
      return replyTo(request, uint64_t{1});
    }
    if (validated && request == FrontendRequest::kGetConfig) {
      log_.warn("vhost-user: {} failed: {}", requestName(request), e.what());
      return replyTo(request, std::span<const uint8_t>());  // the spec's error reply
    }
    throw Error(fmt::format("{} failed: {}", requestName(request), e.what()));
  }
}

std::optional<Message> BackendSession::dispatch(Message& message) {
  using R = FrontendRequest;
  R request = message.frontendRequest();
  if (awaitingPostcopyAck_) {
    registerPostcopy(message);
    return std::nullopt;
  }
  switch (request) {
    case R::kGetFeatures:
      return replyTo(request, offeredFeatures());

    case R::kSetFeatures: {
      auto features = message.payloadAs<uint64_t>();
      uint64_t unknown = features & ~offeredFeatures();
      require(unknown == 0, "features {:#x} were not offered (offered {:#x})", unknown,
              offeredFeatures());
      ackedFeatures_ = features;
      featuresSet_ = true;
      for (auto& queue : queues_) queue.setFeatures(features);
      // Without protocol features there is no SET_VRING_ENABLE: rings start enabled.
      if (!hasBit(features, feature::kProtocolFeatures)) {
        for (auto& queue : queues_) queue.setEnabled(true);
      }
      device_.onFeaturesAcked(features & ~bit(feature::kProtocolFeatures));
      return std::nullopt;
    }

    case R::kGetProtocolFeatures:
      return replyTo(request, offeredProtocolFeatures());

    case R::kSetProtocolFeatures: {
      auto features = message.payloadAs<uint64_t>();
      uint64_t unknown = features & ~offeredProtocolFeatures();
      require(unknown == 0, "protocol features {:#x} were not offered (offered {:#x})", unknown,
              offeredProtocolFeatures());
      ackedProtocolFeatures_ = features;
      return std::nullopt;
    }

    case R::kSetOwner:
      owned_ = true;
      return std::nullopt;

    case R::kResetOwner:
      // Deprecated; the spec suggests treating it as "disable all rings".
      for (auto& queue : queues_) {
        stopQueue(queue);
        queue.setEnabled(false);
      }
      return std::nullopt;

    case R::kResetDevice:
      requireProtocolFeature(protocol::kResetDevice, request);
      resetDevice();
      return std::nullopt;

    case R::kGetQueueNum:
      return replyTo(request, uint64_t{device_.queueCount()});

    case R::kSetMemTable: {
      if (postcopyListening_) return postcopyMemoryTable(message);
      drainDevice();
      auto regions = memoryTableRegions(message);
      memory_.setTable(regions, std::move(message.fds));
      log_.debug("vhost-user: memory table with {} regions", regions.size());
      return std::nullopt;
    }

    case R::kPostcopyAdvise:
      requireProtocolFeature(protocol::kPagefault, request);
      return postcopyAdvise();

    case R::kPostcopyListen:
      requireProtocolFeature(protocol::kPagefault, request);
      require(postcopyFd_.valid(), "POSTCOPY_LISTEN before POSTCOPY_ADVISE");
      // Mappings that exist now would not be registered (libvhost-user refuses too).
      require(memory_.regionCount() == 0, "POSTCOPY_LISTEN after a memory table was set");
      postcopyListening_ = true;
      return std::nullopt;

    case R::kPostcopyEnd:
      requireProtocolFeature(protocol::kPagefault, request);
      // The registration ends with the front-end's copy of the userfaultfd (this process
      // holds none after registering): nothing is left to undo here.
      postcopyListening_ = false;
      postcopyFd_.reset();
      return replyTo(request, uint64_t{0});

    case R::kGetMaxMemSlots:
      requireProtocolFeature(protocol::kConfigureMemSlots, request);
      return replyTo(request, uint64_t{memory_.maxRegions()});

    case R::kAddMemReg: {
      requireProtocolFeature(protocol::kConfigureMemSlots, request);
      require(!postcopyListening_, "regions cannot be added in postcopy mode");
      auto body = message.payloadAs<SingleMemoryRegion>();
      drainDevice();
      memory_.addRegion(body.region, std::move(message.fds.front()));
      return std::nullopt;
    }

    case R::kRemMemReg: {
      requireProtocolFeature(protocol::kConfigureMemSlots, request);
      message.fds.clear();  // the spec allows one stray fd; close it unused
      drainDevice();
      memory_.removeRegion(message.payloadAs<SingleMemoryRegion>().region);
      return std::nullopt;
    }

    case R::kSetVringNum: {
      auto state = message.payloadAs<VringState>();
      Virtqueue& queue = queueAt(state.index);
      require(state.num <= device_.maxQueueSize(), "queue {} size {} exceeds the device's {}",
              state.index, state.num, device_.maxQueueSize());
      queue.setSize(state.num);
      return std::nullopt;
    }

    case R::kSetVringAddr: {
      auto address = message.payloadAs<VringAddress>();
      Virtqueue& queue = queueAt(address.index);
      require((address.flags & kVringFlagLog) == 0,
              "queue {} asks for used-ring logging, which this back-end does not offer",
              address.index);
      queue.setAddresses(address);
      // Check now when memory is known, so a bad address fails this request; front-ends that
      // send addresses before the memory table are checked at start.
      if (memory_.regionCount() > 0 && queue.size() != 0) queue.checkRings(memory_);
      return std::nullopt;
    }

    case R::kSetVringBase: {
      auto state = message.payloadAs<VringState>();
      queueAt(state.index).setBase(state.num);
      return std::nullopt;
    }

    case R::kGetVringBase: {
      auto state = message.payloadAs<VringState>();
      Virtqueue& queue = queueAt(state.index);
      stopQueue(queue);
      VringState reply{state.index, queue.lastAvailIndex()};
      return replyTo(request, reply);
    }

    case R::kSetVringKick:
      setVringKick(message);
      return std::nullopt;

    case R::kSetVringCall:
    case R::kSetVringErr: {
      auto value = message.payloadAs<uint64_t>();
      Virtqueue& queue = queueAt(static_cast<uint32_t>(value & kVringIndexMask));
      UniqueFd fd = message.fds.empty() ? UniqueFd() : std::move(message.fds.front());
      if (request == R::kSetVringCall) {
        queue.setCallFd(std::move(fd));
      } else {
        queue.setErrFd(std::move(fd));
      }
      return std::nullopt;
    }

    case R::kSetVringEnable: {
      auto state = message.payloadAs<VringState>();
      Virtqueue& queue = queueAt(state.index);
      require(state.num <= 1, "queue {}: enable value {} is not 0 or 1", state.index, state.num);
      queue.setEnabled(state.num == 1);
      // Buffers may have been queued (and kicked) while the ring was disabled.
      if (queue.enabled() && queue.started()) {
        pendingKick_[state.index] = false;
        processQueue(queue);
      }
      return std::nullopt;
    }

    case R::kGetConfig: {
      requireProtocolFeature(protocol::kConfig, request);
      auto header = message.payloadAs<ConfigHeader>();
      require(uint64_t{header.offset} + header.size <= device_.configSize(),
              "config range {}+{} is outside the {}-byte config space", header.offset,
              header.size, device_.configSize());
      std::vector<uint8_t> payload(sizeof(ConfigHeader) + header.size);
      std::memcpy(payload.data(), &header, sizeof(header));
      device_.readConfig(header.offset,
                         std::span<uint8_t>(payload.data() + sizeof(ConfigHeader), header.size));
      return replyTo(request, payload);
    }

    case R::kSetConfig: {
      requireProtocolFeature(protocol::kConfig, request);
      auto header = message.payloadAs<ConfigHeader>();
      require(uint64_t{header.offset} + header.size <= device_.configSize(),
              "config range {}+{} is outside the {}-byte config space", header.offset,
              header.size, device_.configSize());
      require(header.flags <= static_cast<uint32_t>(ConfigFlags::kMigration),
              "unknown config flags {:#x}", header.flags);
      device_.writeConfig(header.offset,
                          std::span<const uint8_t>(message.payload.data() + sizeof(ConfigHeader),
                                                   header.size),
                          static_cast<ConfigFlags>(header.flags));
      return std::nullopt;
    }

    case R::kSetStatus: {
      requireProtocolFeature(protocol::kStatus, request);
      auto value = message.payloadAs<uint64_t>();
      require(value <= 0xff, "device status {:#x} does not fit a byte", value);
      status_ = static_cast<uint8_t>(value);
      device_.onStatus(status_);
      return std::nullopt;
    }

    case R::kGetStatus:
      requireProtocolFeature(protocol::kStatus, request);
      return replyTo(request, uint64_t{status_});

    case R::kGetInflightFd:
      requireProtocolFeature(protocol::kInflightShmfd, request);
      return getInflightFd(message);

    case R::kSetInflightFd:
      requireProtocolFeature(protocol::kInflightShmfd, request);
      setInflightFd(message);
      return std::nullopt;

    case R::kSetBackendReqFd:
      requireProtocolFeature(protocol::kBackendReq, request);
      backendChannel_ = Channel(std::move(message.fds.front()), "front-end (back-end requests)");
      return std::nullopt;

    default:
      throw Error(fmt::format("{} is not supported by this back-end", requestName(request)));
  }
}

void BackendSession::setVringKick(Message& message) {
  auto value = message.payloadAs<uint64_t>();
  uint32_t index = static_cast<uint32_t>(value & kVringIndexMask);
  Virtqueue& queue = queueAt(index);
  require((value & kVringNoFdFlag) == 0,
          "queue {}: polling mode (SET_VRING_KICK without an fd) is not supported", index);
  require(memory_.regionCount() > 0, "queue {}: started before any memory table", index);
  stopQueue(queue);  // a new kick fd restarts the queue

  UniqueFd fd = std::move(message.fds.front());
  int kickFd = fd.get();
  queue.setFeatures(ackedFeatures_);
  queue.setKickFd(std::move(fd));
  try {
    queue.start(memory_);
    if (watcher_ != nullptr) watcher_->watchKick(queue.index(), kickFd);
  } catch (...) {
    queue.stop();
    throw;
  }
  device_.onQueueStarted(queue);
  // Requests recovered from the inflight area are due without a new kick from the driver;
  // kick ourselves (as libvhost-user does) so they run once the set-up messages are done.
  if (queue.pendingResubmissions() > 0) {
    uint64_t one = 1;
    ssize_t n = ::write(kickFd, &one, sizeof(one));
    (void)n;  // a full counter is a pending kick already
  }
}

void BackendSession::stopQueue(Virtqueue& queue) {
  pendingKick_[queue.index()] = false;
  if (!queue.started()) return;
  if (watcher_ != nullptr && queue.kickFd() >= 0) watcher_->unwatchKick(queue.index(), queue.kickFd());
  device_.onQueueStopped(queue);
  queue.notifyIfNeeded();  // for requests the device finished while stopping
  queue.stop();
}

void BackendSession::drainDevice() {
  try {
    device_.drain();
  } catch (const Error& e) {
    // The device could not finish its requests: none of them may touch memory any more.
    for (auto& queue : queues_) {
      if (queue.started()) queue.markBroken(fmt::format("the device failed to drain: {}", e.what()));
    }
  }
  notifyStartedQueues();
}

void BackendSession::notifyStartedQueues() {
  for (auto& queue : queues_) {
    if (queue.started()) queue.notifyIfNeeded();
  }
}

void BackendSession::onDeviceEvent() {
  try {
    device_.onDeviceEvent();
  } catch (const Error& e) {
    log_.error("vhost-user: the device failed to complete requests: {}", e.what());
  }
  notifyStartedQueues();
}

void BackendSession::resetDevice() {
  for (auto& queue : queues_) {
    stopQueue(queue);
    queue.reset();
  }
  unmapInflight();
  status_ = 0;
  device_.onReset();
}

void BackendSession::close() {
  for (auto& queue : queues_) stopQueue(queue);
  backendChannel_.close();
  device_.onDisconnect();
}

void BackendSession::onKick(uint16_t index, bool consumeEventfd) {
  if (index >= queues_.size()) return;
  Virtqueue& queue = queues_[index];
  if (consumeEventfd && queue.kickFd() >= 0) {
    // Only read when readable: a stale epoll event must not block on an empty eventfd.
    pollfd pfd{queue.kickFd(), POLLIN, 0};
    if (::poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLIN) != 0) {
      uint64_t count;
      ssize_t n = ::read(queue.kickFd(), &count, sizeof(count));
      (void)n;  // the count itself carries no meaning
    }
  }
  if (!queue.started()) return;
  if (!queue.enabled()) {
    pendingKick_[index] = true;  // started but disabled: no side effects until enabled
    return;
  }
  processQueue(queue);
}

void BackendSession::processQueue(Virtqueue& queue) {
  if (queue.broken()) return;
  try {
    device_.processQueue(queue);
  } catch (const Error& e) {
    queue.markBroken(fmt::format("the device failed: {}", e.what()));
  }
  queue.notifyIfNeeded();
}

bool BackendSession::notifyConfigChanged() {
  if (!backendChannel_.valid() || !hasBit(ackedProtocolFeatures_, protocol::kConfig)) return false;
  MessageHeader header{static_cast<uint32_t>(BackendRequest::kConfigChangeMsg), kVersion, 0};
  try {
    backendChannel_.send(header, {});
    return true;
  } catch (const Error& e) {
    log_.warn("vhost-user: cannot send CONFIG_CHANGE_MSG: {}", e.what());
    backendChannel_.close();
    return false;
  }
}

std::optional<Message> BackendSession::postcopyAdvise() {
  require(!postcopyRegistered_, "postcopy is already running on this connection");
  postcopyFd_ = newUserfaultfd_();
  Message reply = replyTo(FrontendRequest::kPostcopyAdvise, std::span<const uint8_t>());
  reply.fds.emplace_back(CLONE_SYSCALL(::fcntl(postcopyFd_.get(), F_DUPFD_CLOEXEC, 0),
                                       "dup the postcopy userfaultfd"));
  return reply;
}

std::optional<Message> BackendSession::postcopyMemoryTable(Message& message) {
  require(!postcopyRegistered_ && memory_.regionCount() == 0,
          "a second memory table in postcopy mode is not supported");
  memory_.setTable(memoryTableRegions(message), std::move(message.fds));
  // The answer: the same table with our own address of each region, so that the front-end
  // can tell which page a fault on our userfaultfd is. Nothing is touched until its go-ahead.
  auto mappings = memory_.hostMappings();
  auto mapped = memory_.regions();
  std::vector<uint8_t> payload(sizeof(MemoryTableHeader) + mapped.size() * sizeof(MemoryRegion));
  MemoryTableHeader answerHeader{};
  answerHeader.regionCount = static_cast<uint32_t>(mapped.size());
  std::memcpy(payload.data(), &answerHeader, sizeof(answerHeader));
  for (size_t i = 0; i < mapped.size(); ++i) {
    MemoryRegion region = mapped[i];
    region.userAddress = reinterpret_cast<uint64_t>(mappings[i].host);
    std::memcpy(payload.data() + sizeof(MemoryTableHeader) + i * sizeof(MemoryRegion), &region,
                sizeof(region));
  }
  awaitingPostcopyAck_ = true;
  return replyTo(FrontendRequest::kSetMemTable, std::span<const uint8_t>(payload));
}

void BackendSession::registerPostcopy(const Message& acknowledgement) {
  awaitingPostcopyAck_ = false;
  require(acknowledgement.frontendRequest() == FrontendRequest::kSetMemTable &&
              acknowledgement.payload.size() == sizeof(uint64_t) &&
              acknowledgement.payloadAs<uint64_t>() == 0 && acknowledgement.fds.empty(),
          "expected the front-end's postcopy acknowledgement (SET_MEM_TABLE with 0), got {}",
          requestName(acknowledgement.frontendRequest()));
  for (const auto& mapping : memory_.hostMappings()) {
    uffdio_register registration{};
    registration.range.start = reinterpret_cast<uint64_t>(mapping.base);
    registration.range.len = mapping.length;
    registration.mode = UFFDIO_REGISTER_MODE_MISSING;
    CLONE_SYSCALL(::ioctl(postcopyFd_.get(), UFFDIO_REGISTER, &registration),
                  "UFFDIO_REGISTER vhost-user memory (postcopy)");
  }
  postcopyFd_.reset();
  postcopyRegistered_ = true;
  log_.info("vhost-user: postcopy: {} memory regions registered; the front-end resolves "
            "their missing pages",
            memory_.regionCount());
}

std::optional<Message> BackendSession::getInflightFd(const Message& message) {
  auto description = message.payloadAs<InflightDescription>();
  require(description.queueCount >= 1 && description.queueCount <= queues_.size(),
          "inflight area for {} queues, the device has {}", description.queueCount,
          queues_.size());
  require(isPowerOfTwo(description.queueSize) && description.queueSize <= device_.maxQueueSize(),
          "inflight area for queue size {}: not a power of two up to {}", description.queueSize,
          device_.maxQueueSize());
  uint64_t length = inflightQueueBytes(description.queueSize) * description.queueCount;

  UniqueFd fd(CLONE_SYSCALL(::memfd_create("clone-vhost-inflight", MFD_CLOEXEC | MFD_ALLOW_SEALING),
                            "memfd_create vhost-user inflight area"));
  CLONE_SYSCALL(::ftruncate(fd.get(), static_cast<off_t>(length)),
                "size vhost-user inflight area");
  // The front-end keeps the area across our restarts; it must not be able to shrink it.
  ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);

  InflightDescription reply = description;
  reply.mmapSize = length;
  reply.mmapOffset = 0;
  reply.padding = 0;
  Message message_ = replyTo(FrontendRequest::kGetInflightFd, reply);
  message_.fds.push_back(std::move(fd));
  return message_;
}

void BackendSession::setInflightFd(Message& message) {
  auto description = message.payloadAs<InflightDescription>();
  require(description.queueCount >= 1 && description.queueCount <= queues_.size(),
          "inflight area for {} queues, the device has {}", description.queueCount,
          queues_.size());
  require(isPowerOfTwo(description.queueSize) && description.queueSize <= device_.maxQueueSize(),
          "inflight area for queue size {}: not a power of two up to {}", description.queueSize,
          device_.maxQueueSize());
  for (auto& queue : queues_) {
    require(!queue.started(), "SET_INFLIGHT_FD while queue {} is started", queue.index());
  }
  uint64_t perQueue = inflightQueueBytes(description.queueSize);
  uint64_t needed = perQueue * description.queueCount;
  require(description.mmapSize >= needed && description.mmapSize <= kMaxInflightBytes,
          "inflight area of {} bytes for {} queues of {} needs {} (at most {})",
          description.mmapSize, description.queueCount, description.queueSize, needed,
          kMaxInflightBytes);
  require(description.mmapOffset % pageSize() == 0, "inflight area offset {:#x} is not page aligned",
          description.mmapOffset);
  int fd = message.fds.front().get();
  struct stat st {};
  CLONE_SYSCALL(::fstat(fd, &st), "stat vhost-user inflight fd");
  require(S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) >= description.mmapOffset &&
              static_cast<uint64_t>(st.st_size) - description.mmapOffset >= description.mmapSize,
          "inflight fd is not a file of at least {:#x}+{:#x} bytes", description.mmapOffset,
          description.mmapSize);
  void* base = ::mmap(nullptr, description.mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd,
                      static_cast<off_t>(description.mmapOffset));
  if (base == MAP_FAILED) throwSystemError(errno, "mmap vhost-user inflight area");
  unmapInflight();
  inflight_ = {base, static_cast<size_t>(description.mmapSize)};
  auto* bytes = static_cast<uint8_t*>(base);
  for (uint16_t i = 0; i < description.queueCount; ++i) {
    queues_[i].setInflightRegion(std::span<uint8_t>(bytes + perQueue * i, perQueue));
  }
}

// --- The event loop.

namespace {

constexpr uint64_t kTagStop = 1ull << 40;
constexpr uint64_t kTagSocket = 2ull << 40;
constexpr uint64_t kTagListener = 3ull << 40;
constexpr uint64_t kTagKick = 4ull << 40;  // | queue index
constexpr uint64_t kTagDevice = 5ull << 40;
constexpr uint64_t kTagMask = 0xffull << 40;

void epollAdd(int epoll, int fd, uint64_t tag) {
  epoll_event event{};
  event.events = EPOLLIN;
  event.data.u64 = tag;
  CLONE_SYSCALL(::epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &event), "watch fd with epoll");
}

}  // namespace

class VhostUserBackend::Loop : public KickWatcher {
 public:
  explicit Loop(int epoll) : epoll_(epoll) {}
  void watchKick(uint16_t queue, int fd) override { epollAdd(epoll_, fd, kTagKick | queue); }
  void unwatchKick(uint16_t queue, int fd) override {
    (void)queue;
    ::epoll_ctl(epoll_, EPOLL_CTL_DEL, fd, nullptr);  // gone already if the fd was closed
  }

 private:
  int epoll_;
};

VhostUserBackend::VhostUserBackend(VhostUserDevice& device, spdlog::logger& log,
                                   BackendOptions options)
    : device_(device), log_(log), options_(options) {
  stopFd_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "create stop eventfd"));
}

VhostUserBackend::~VhostUserBackend() = default;

void VhostUserBackend::stop() {
  uint64_t one = 1;
  ssize_t n = ::write(stopFd_.get(), &one, sizeof(one));
  (void)n;  // a saturated counter is still a stop request
}

bool VhostUserBackend::stopping() const {
  pollfd pfd{stopFd_.get(), POLLIN, 0};
  return ::poll(&pfd, 1, 0) == 1;
}

void VhostUserBackend::serveFd(UniqueFd fd) {
  if (isListeningSocket(fd.get())) {
    serveListener(fd.get());
  } else {
    serveConnection(std::move(fd));
  }
}

void VhostUserBackend::serveListener(int listener) {
  UniqueFd epoll(CLONE_SYSCALL(::epoll_create1(EPOLL_CLOEXEC), "create epoll"));
  epollAdd(epoll.get(), stopFd_.get(), kTagStop);
  epollAdd(epoll.get(), listener, kTagListener);
  log_.info("vhost-user back-end waiting for a front-end");
  while (!stopping()) {
    epoll_event event{};
    int n = ::epoll_wait(epoll.get(), &event, 1, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      throwSystemError(errno, "wait for vhost-user front-ends");
    }
    if (n == 0 || event.data.u64 == kTagStop) continue;
    int connection = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == ECONNABORTED) continue;
      throwSystemError(errno, "accept vhost-user front-end");
    }
    serveConnection(UniqueFd(connection));
    if (!stopping()) log_.info("vhost-user back-end waiting for the next front-end");
  }
}

void VhostUserBackend::serveConnection(UniqueFd connection) {
  UniqueFd epoll(CLONE_SYSCALL(::epoll_create1(EPOLL_CLOEXEC), "create epoll"));
  epollAdd(epoll.get(), stopFd_.get(), kTagStop);
  epollAdd(epoll.get(), connection.get(), kTagSocket);
  Channel channel(std::move(connection), "front-end");
  // Messages are read only once epoll says the socket is readable, so the timeout bites only
  // on a message that stops half-way.
  channel.setReceiveTimeout(options_.messageTimeout);
  if (device_.deviceEventFd() >= 0) epollAdd(epoll.get(), device_.deviceEventFd(), kTagDevice);
  Loop loop(epoll.get());
  session_ = std::make_unique<BackendSession>(device_, log_, &loop);
  if (options_.newUserfaultfd) session_->enablePostcopy(options_.newUserfaultfd);
  ++connectionsServed_;
  log_.info("vhost-user front-end connected");
  try {
    runConnection(epoll.get(), channel);
  } catch (...) {
    session_->close();
    session_.reset();
    throw;
  }
  session_->close();
  session_.reset();
}

void VhostUserBackend::runConnection(int epoll, Channel& channel) {
  bool open = true;
  while (open) {
    epoll_event events[16];
    int n = ::epoll_wait(epoll, events, 16, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      throwSystemError(errno, "wait for vhost-user events");
    }
    for (int i = 0; i < n && open; ++i) {
      uint64_t tag = events[i].data.u64 & kTagMask;
      if (tag == kTagStop) {
        open = false;
      } else if (tag == kTagSocket) {
        try {
          Message message = channel.receive();
          std::optional<Message> reply = session_->handle(std::move(message));
          if (reply) channel.send(*reply);
        } catch (const ChannelClosed&) {
          log_.info("vhost-user front-end disconnected");
          open = false;
        } catch (const Error& e) {
          log_.error("vhost-user: dropping the front-end connection: {}", e.what());
          open = false;
        }
      } else if (tag == kTagKick) {
        session_->onKick(static_cast<uint16_t>(events[i].data.u64 & 0xffff));
      } else if (tag == kTagDevice) {
        session_->onDeviceEvent();
      }
    }
  }
}

// --- Program conventions.

std::string capabilitiesJson(const std::string& type, const std::vector<std::string>& features) {
  std::string json = fmt::format("{{\n  \"type\": \"{}\",\n  \"features\": [", type);
  for (size_t i = 0; i < features.size(); ++i) {
    json += fmt::format("{}\n    \"{}\"", i == 0 ? "" : ",", features[i]);
  }
  json += features.empty() ? "]\n}\n" : "\n  ]\n}\n";
  return json;
}

}  // namespace clonevm::ipc::vhost
