#include "vmm-core/virtio/vhost_user_backend.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cstring>

#include "common/error.h"
#include "ipc/vhost-user/channel.h"
#include "ipc/vhost-user/message.h"
#include "vmm-core/virtio/virtio.h"

namespace clonevm::vmm {

namespace vhost = ipc::vhost;
using namespace vhost_user_config;

namespace {

// Virtio bits this frontend never passes to the guest, whatever the back-end offers:
// - VHOST_USER_F_PROTOCOL_FEATURES (30) and VHOST_F_LOG_ALL (26) are vhost-user's own;
// - ACCESS_PLATFORM: we hand out guest physical addresses, there is no IOMMU;
// - RING_PACKED: SET_VRING_BASE/GET_VRING_BASE carry split-ring state only here;
// - the legacy NOTIFY_ON_EMPTY and ANY_LAYOUT (a modern transport);
// - transport features the PCI transport lacks (it masks them too).
constexpr uint64_t kMaskedFeatures =
    vhost::bit(vhost::feature::kProtocolFeatures) | vhost::bit(vhost::feature::kLogAll) |
    vhost::bit(vhost::feature::kAccessPlatform) | vhost::bit(vhost::feature::kRingPacked) |
    vhost::bit(vhost::feature::kNotifyOnEmpty) | vhost::bit(vhost::feature::kAnyLayout) |
    vhost::bit(vhost::feature::kNotificationData) | vhost::bit(vhost::feature::kRingReset) |
    vhost::bit(vhost::feature::kSrIov) | vhost::bit(39 /* NOTIF_CONFIG_DATA */);

// Protocol features we use when the back-end offers them.
constexpr uint64_t kWantedProtocolFeatures =
    vhost::bit(vhost::protocol::kMq) | vhost::bit(vhost::protocol::kReplyAck) |
    vhost::bit(vhost::protocol::kConfig) | vhost::bit(vhost::protocol::kConfigureMemSlots) |
    vhost::bit(vhost::protocol::kStatus) | vhost::bit(vhost::protocol::kBackendReq) |
    vhost::bit(vhost::protocol::kResetDevice);

constexpr uint16_t kMaxQueuesOption = 64;

std::string optionName(VhostUserDeviceKind kind) {
  return std::string("--") + vhostUserKindName(kind);
}

// Splits "SOCKET[,key=value...]" and applies the keys.
VhostUserDeviceConfig parseCommon(VhostUserDeviceKind kind, const std::string& value,
                                  std::string& head) {
  VhostUserDeviceConfig config;
  config.kind = kind;
  std::string option = optionName(kind);
  size_t comma = value.find(',');
  head = value.substr(0, comma);
  while (comma != std::string::npos) {
    size_t next = value.find(',', comma + 1);
    std::string item = value.substr(comma + 1, next == std::string::npos ? next : next - comma - 1);
    comma = next;
    size_t eq = item.find('=');
    std::string key = item.substr(0, eq);
    const char* known = kind == VhostUserDeviceKind::kBlock ? "queues, image, format" : "queues";
    require(eq != std::string::npos, "{} {}: '{}' is not key=value (known keys: {})", option,
            value, item, known);
    std::string number = item.substr(eq + 1);
    if (key == "queues") {
      unsigned parsed = 0;
      auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), parsed);
      require(ec == std::errc() && end == number.data() + number.size() && parsed >= 1 &&
                  parsed <= kMaxQueuesOption,
              "{} {}: queues={} is not a number from 1 to {}", option, value, number,
              kMaxQueuesOption);
      config.queues = static_cast<uint16_t>(parsed);
    } else if (key == "image" && kind == VhostUserDeviceKind::kBlock) {
      require(!number.empty(), "{} {}: image= needs a path", option, value);
      config.imagePath = number;
    } else if (key == "format" && kind == VhostUserDeviceKind::kBlock) {
      require(number == "raw" || number == "qcow2" || number == "auto",
              "{} {}: format must be raw, qcow2 or auto, not '{}'", option, value, number);
      config.imageFormat = number;
    } else {
      throw Error(fmt::format("{} {}: unknown key '{}' (known keys: {})", option, value, key, known));
    }
  }
  return config;
}

void checkSocketPath(const std::string& option, const std::string& value, const std::string& path) {
  require(!path.empty(), "{} {}: no socket path", option, value);
}

template <typename T>
std::span<const uint8_t> bytesOf(const T& value) {
  return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&value), sizeof(T));
}

std::string hex(uint64_t value) { return fmt::format("{:#x}", value); }

}  // namespace

const char* vhostUserKindName(VhostUserDeviceKind kind) {
  return kind == VhostUserDeviceKind::kBlock ? "vhost-user-blk" : "vhost-user-fs";
}

VhostUserDeviceConfig parseVhostUserBlkOption(const std::string& value) {
  std::string head;
  VhostUserDeviceConfig config = parseCommon(VhostUserDeviceKind::kBlock, value, head);
  checkSocketPath("--vhost-user-blk", value, head);
  config.socketPath = head;
  if (head.starts_with("fd=")) {
    std::string number = head.substr(3);
    int fd = -1;
    auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), fd);
    require(ec == std::errc() && end == number.data() + number.size() && fd > 2,
            "--vhost-user-blk {}: fd={} is not an inherited descriptor number above 2", value,
            number);
    config.socketFd = fd;
  }
  require(config.imageFormat.empty() || !config.imagePath.empty(),
          "--vhost-user-blk {}: format= without image=", value);
  return config;
}

VhostUserDeviceConfig parseVhostUserFsOption(const std::string& value) {
  std::string head;
  VhostUserDeviceConfig config = parseCommon(VhostUserDeviceKind::kFs, value, head);
  size_t colon = head.rfind(':');
  require(colon != std::string::npos, "--vhost-user-fs {}: expected SOCKET:TAG", value);
  config.socketPath = head.substr(0, colon);
  config.tag = head.substr(colon + 1);
  checkSocketPath("--vhost-user-fs", value, config.socketPath);
  require(!config.tag.empty() && config.tag.size() <= kFsTagSize,
          "--vhost-user-fs {}: tag '{}' must be 1 to {} bytes", value, config.tag, kFsTagSize);
  for (char c : config.tag) {
    require(c > ' ' && c < 0x7f, "--vhost-user-fs {}: tag '{}' may hold only printable ASCII "
            "without spaces", value, config.tag);
  }
  return config;
}

// ---------------------------------------------------------------------------------------

std::shared_ptr<VhostUserBackend> VhostUserBackend::connect(const VhostUserDeviceConfig& config,
                                                            const GuestMemory& memory,
                                                            spdlog::logger& log,
                                                            LazyMemoryFill* lazyFill) {
  try {
    UniqueFd inherited;
    if (config.socketFd >= 0) {
      // Taken over: nothing the core might start inherits it.
      inherited = UniqueFd(config.socketFd);
      struct stat st {};
      CLONE_SYSCALL(::fstat(inherited.get(), &st), "check the inherited vhost-user socket",
                    config.socketPath);
      require(S_ISSOCK(st.st_mode), "{} is not a socket", config.socketPath);
      CLONE_SYSCALL(::fcntl(inherited.get(), F_SETFD, FD_CLOEXEC),
                    "set close-on-exec on the inherited socket", config.socketPath);
    }
    auto frontend =
        inherited ? vhost::Frontend(std::move(inherited), config.socketPath,
                                    {.replyTimeout = config.replyTimeout})
                  : vhost::Frontend::connect(config.socketPath, {.replyTimeout = config.replyTimeout});
    return std::make_shared<VhostUserBackend>(std::move(frontend), config, memory, log,
                                              lazyFill);
  } catch (const std::exception& e) {
    std::string where = optionName(config.kind) + " " + config.socketPath;
    throw Error(fmt::format("{}: {}", where, e.what()));
  }
}

VhostUserBackend::VhostUserBackend(vhost::Frontend frontend, const VhostUserDeviceConfig& config,
                                   const GuestMemory& memory, spdlog::logger& log,
                                   LazyMemoryFill* lazyFill)
    : config_(config),
      memory_(memory),
      log_(log),
      lazyFill_(lazyFill),
      frontend_(std::move(frontend)) {
  if (config_.queues == 0) config_.queues = 1;
  require(config_.queueSize >= 1 && config_.queueSize <= virtio::kMaxQueueSize &&
              std::has_single_bit(config_.queueSize),
          "{}: queue size {} is not a power of two up to 32768", describe(), config_.queueSize);
  negotiate();
  stopFd_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK),
                                   "eventfd for the vhost-user watcher of", config_.socketPath));
  watchSocket_ = UniqueFd(CLONE_SYSCALL(::fcntl(frontend_.socketFd(), F_DUPFD_CLOEXEC, 0),
                                        "dup the vhost-user socket", config_.socketPath));
}

VhostUserBackend::~VhostUserBackend() {
  if (watcher_.joinable()) {
    uint64_t one = 1;
    (void)!::write(stopFd_.get(), &one, sizeof(one));
    watcher_.join();
  }
}

std::string VhostUserBackend::describe() const {
  return fmt::format("{} backend {}", vhostUserKindName(config_.kind), config_.socketPath);
}

uint32_t VhostUserBackend::deviceType() const {
  return config_.kind == VhostUserDeviceKind::kBlock ? virtio::kTypeBlock : virtio::kTypeFs;
}

void VhostUserBackend::negotiate() {
  const bool blk = config_.kind == VhostUserDeviceKind::kBlock;
  backendFeatures_ = frontend_.getFeatures();
  require(vhost::hasBit(backendFeatures_, vhost::feature::kVersion1),
          "the back-end does not offer VIRTIO_F_VERSION_1 (features {}); only modern virtio "
          "devices are supported",
          hex(backendFeatures_));
  if (vhost::hasBit(backendFeatures_, vhost::feature::kProtocolFeatures)) {
    uint64_t offered = frontend_.getProtocolFeatures();
    uint64_t wanted = kWantedProtocolFeatures;
    if (lazyFill_ != nullptr) wanted |= vhost::bit(vhost::protocol::kPagefault);
    frontend_.setProtocolFeatures(offered & wanted);
    protocolFeatures_ = offered & wanted;
  }
  auto has = [this](unsigned bit) { return vhost::hasBit(protocolFeatures_, bit); };
  // A block device's config space (capacity, ...) lives in the back-end.
  require(!blk || has(vhost::protocol::kConfig),
          "the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG, which a vhost-user-blk "
          "device needs for its config space (features {}, protocol features {})",
          hex(backendFeatures_), hex(protocolFeatures_));
  frontend_.setOwner();

  // Queues: blk has `queues` request queues; fs has a hiprio queue and `queues` request queues.
  numQueues_ = static_cast<uint16_t>(blk ? config_.queues : config_.queues + 1);
  if (has(vhost::protocol::kMq)) {
    uint64_t max = frontend_.getQueueNum();
    require(numQueues_ <= max, "{} queues asked for ({}), the back-end serves at most {}",
            numQueues_, blk ? "queues" : "1 hiprio + request queues", max);
  } else if (blk) {
    require(numQueues_ == 1,
            "{} queues asked for, but the back-end does not offer VHOST_USER_PROTOCOL_F_MQ",
            numQueues_);
  }

  offeredFeatures_ = backendFeatures_ & ~kMaskedFeatures;
  if (blk) {
    if (numQueues_ > 1) {
      require(vhost::hasBit(backendFeatures_, kBlkFeatureMq),
              "{} queues asked for, but the back-end does not offer VIRTIO_BLK_F_MQ", numQueues_);
    } else {
      offeredFeatures_ &= ~vhost::bit(kBlkFeatureMq);
    }
    std::lock_guard lock(mutex_);
    fetchConfigLocked();
  } else {
    // QEMU's vhost-user-fs-pci builds the config itself (virtiofsd has no GET_CONFIG).
    configSpace_.assign(kFsConfigSize, 0);
    std::memcpy(configSpace_.data(), config_.tag.data(), config_.tag.size());
    uint32_t requestQueues = config_.queues;
    std::memcpy(configSpace_.data() + kFsTagSize, &requestQueues, sizeof(requestQueues));
  }

  // Guest RAM: every region of the one memfd, at its offset.
  std::vector<vhost::MemoryRegionSpec> regions;
  for (const auto& region : memory_.regions()) {
    regions.push_back({.guestAddress = region.guestAddress,
                       .size = region.size,
                       .userAddress = reinterpret_cast<uint64_t>(region.host),
                       .fdOffset = region.fdOffset,
                       .fd = memory_.fd()});
  }
  if (has(vhost::protocol::kConfigureMemSlots)) {
    uint64_t slots = frontend_.getMaxMemSlots();
    require(slots >= regions.size(), "the back-end maps at most {} memory regions, guest RAM has {}",
            slots, regions.size());
  }
  sendMemoryTable(regions);

  if (has(vhost::protocol::kBackendReq)) {
    requestChannel_.emplace(frontend_.openBackendRequestChannel());
  }
  log_.info("{}: features {:#x} (offered to the guest {:#x}), protocol features {:#x}, {} queues",
            describe(), backendFeatures_, offeredFeatures_, protocolFeatures_, numQueues_);
}

void VhostUserBackend::sendMemoryTable(std::span<const vhost::MemoryRegionSpec> regions) {
  // A fork's guest RAM is filled through the core's userfaultfd, which does not see the
  // back-end's own mapping. With postcopy the back-end registers its mapping with a
  // userfaultfd of its own and the fill resolves those faults too; without it the fork
  // fills all of its RAM before any queue starts (Machine::restoreFromTemplate).
  if (lazyFill_ == nullptr || !vhost::hasBit(protocolFeatures_, vhost::protocol::kPagefault)) {
    frontend_.setMemTable(regions);
    return;
  }
  UniqueFd userfaultfd = frontend_.postcopyAdvise();
  frontend_.postcopyListen();
  frontend_.setMemTablePostcopy(regions, [&](std::span<const uint64_t> bases) {
    std::vector<LazyMemoryFill::DeviceMapping> mappings;
    for (size_t i = 0; i < regions.size(); ++i) {
      mappings.push_back({.address = bases[i], .length = regions[i].size,
                          .memoryOffset = regions[i].fdOffset});
    }
    lazyFill_->addDeviceFaults(std::move(userfaultfd), std::move(mappings), describe());
  });
  postcopy_ = true;
}

void VhostUserBackend::fetchConfigLocked() {
  // Ask for the whole virtio_blk_config as of virtio 1.2; an older back-end may know only the
  // part up to num_queues.
  std::vector<uint8_t> config;
  try {
    config = frontend_.getConfig(0, kBlkConfigSize);
  } catch (const std::exception& e) {
    if (!configSpace_.empty() || !connected()) throw;
    log_.debug("{}: GET_CONFIG of {} bytes: {}; asking for {}", describe(), kBlkConfigSize,
               e.what(), kBlkMinConfigSize);
    config = frontend_.getConfig(0, kBlkMinConfigSize);
  }
  if (configSpace_.empty()) {
    configSpace_ = std::move(config);
  } else {
    std::copy_n(config.begin(), std::min(config.size(), configSpace_.size()), configSpace_.begin());
  }
  // The queue count is ours: the back-end may serve more than this device uses.
  uint16_t queues = numQueues_;
  std::memcpy(configSpace_.data() + kBlkNumQueuesOffset, &queues, sizeof(queues));
}

void VhostUserBackend::readConfig(uint32_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  if (configStale_.exchange(false) && connected() &&
      config_.kind == VhostUserDeviceKind::kBlock) {
    try {
      fetchConfigLocked();
    } catch (const std::exception& e) {
      log_.warn("{}: refreshing the config space after a change: {}", describe(), e.what());
    }
  }
  // The transport forwards only accesses wholly inside configSize().
  if (offset > configSpace_.size() || data.size() > configSpace_.size() - offset) {
    std::fill(data.begin(), data.end(), 0);
    return;
  }
  std::copy_n(configSpace_.begin() + offset, data.size(), data.begin());
}

void VhostUserBackend::writeConfig(uint32_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  if (offset > configSpace_.size() || data.size() > configSpace_.size() - offset) return;
  if (config_.kind != VhostUserDeviceKind::kBlock) {
    log_.debug("{}: config write at {} ignored (read-only)", describe(), offset);
    return;
  }
  if (!connected()) return;
  try {
    frontend_.setConfig(offset, data);
    std::copy(data.begin(), data.end(), configSpace_.begin() + offset);
  } catch (const std::exception& e) {
    log_.warn("{}: config write of {} bytes at {}: {}", describe(), data.size(), offset, e.what());
  }
}

void VhostUserBackend::activate(const VirtioActivationInfo& info) {
  std::lock_guard lock(mutex_);
  require(connected(), "{} is disconnected", describe());
  require(info.memory == &memory_, "{}: activated with another guest memory", describe());
  uint64_t features = info.features;
  if (vhost::hasBit(backendFeatures_, vhost::feature::kProtocolFeatures)) {
    // Keeps rings disabled until SET_VRING_ENABLE (the spec's rule with this bit).
    features |= vhost::bit(vhost::feature::kProtocolFeatures);
  }
  frontend_.setFeatures(features);
  featuresSent_ = true;
  ackedFeatures_ = info.features;
  std::vector<VhostUserDeviceState::Queue> restored = std::move(restoredQueues_);
  restoredQueues_.clear();
  for (const VirtioQueueInfo& queue : info.queues) {
    require(queue.index < numQueues_, "{}: queue {} does not exist", describe(), queue.index);
    uint16_t availIndex = 0;
    for (const auto& saved : restored) {
      if (saved.index != queue.index) continue;
      require(saved.size == queue.size, "{}: queue {} was {} entries in the template, {} now",
              describe(), queue.index, saved.size, queue.size);
      availIndex = saved.availIndex;
    }
    startQueueLocked(queue, availIndex);
  }
  {
    std::lock_guard callbackLock(callbackMutex_);
    configChanged_ = info.configChanged;
  }
  activations_.fetch_add(1);
  log_.debug("{}: started {} queues with features {:#x}", describe(), info.queues.size(),
             info.features);
}

void VhostUserBackend::startQueueLocked(const VirtioQueueInfo& queue, uint16_t availIndex) {
  // The transport validated the rings against guest memory; translate them to our mapping,
  // which the back-end knows from SET_MEM_TABLE.
  auto user = [&](uint64_t guest, uint64_t length) {
    return reinterpret_cast<uint64_t>(memory_.slice(guest, length).data());
  };
  vhost::VringAddresses addresses{
      .descriptor = user(queue.descTable, virtio::splitDescTableSize(queue.size)),
      .available = user(queue.availRing, virtio::splitAvailRingSize(queue.size)),
      .used = user(queue.usedRing, virtio::splitUsedRingSize(queue.size)),
  };
  frontend_.setVringNum(queue.index, queue.size);
  frontend_.setVringBase(queue.index, availIndex);
  frontend_.setVringAddr(queue.index, addresses);
  frontend_.setVringKick(queue.index, queue.kickFd);
  startedQueues_.push_back(queue);
  frontend_.setVringCall(queue.index, queue.callFd);
  if (vhost::hasBit(backendFeatures_, vhost::feature::kProtocolFeatures)) {
    frontend_.setVringEnable(queue.index, true);
  }
}

VhostUserDeviceState VhostUserBackend::suspend() {
  std::lock_guard lock(mutex_);
  require(connected(), "{} is disconnected", describe());
  require(suspendedQueues_.empty(), "{}: already suspended", describe());
  VhostUserDeviceState state;
  state.deviceType = deviceType();
  state.backendFeatures = backendFeatures_;
  state.ackedFeatures = featuresSent_ ? ackedFeatures_ : 0;
  state.protocolFeatures = protocolFeatures_;
  state.numQueues = numQueues_;
  state.config = configSpace_;
  std::vector<VhostUserDeviceState::Queue> stopped;
  for (const VirtioQueueInfo& queue : startedQueues_) {
    if (vhost::hasBit(backendFeatures_, vhost::feature::kProtocolFeatures)) {
      frontend_.setVringEnable(queue.index, false);
    }
    uint32_t base = frontend_.getVringBase(queue.index);
    stopped.push_back({.index = queue.index, .size = queue.size,
                       .availIndex = static_cast<uint16_t>(base)});
  }
  state.queues = stopped;
  suspendedQueues_ = std::move(stopped);
  log_.debug("{}: suspended {} queues", describe(), state.queues.size());
  return state;
}

void VhostUserBackend::resumeAfterSuspend() {
  std::lock_guard lock(mutex_);
  std::vector<VhostUserDeviceState::Queue> stopped = std::move(suspendedQueues_);
  suspendedQueues_.clear();
  if (stopped.empty()) return;
  require(connected(), "{} is disconnected", describe());
  std::vector<VirtioQueueInfo> queues = std::move(startedQueues_);
  startedQueues_.clear();
  for (const auto& queue : queues) {
    uint16_t availIndex = 0;
    for (const auto& saved : stopped) {
      if (saved.index == queue.index) availIndex = saved.availIndex;
    }
    startQueueLocked(queue, availIndex);
  }
  log_.debug("{}: resumed {} queues", describe(), queues.size());
}

void VhostUserBackend::restoreState(const VhostUserDeviceState& state) {
  std::lock_guard lock(mutex_);
  require(state.deviceType == deviceType(), "{}: the template's device is virtio type {}, this "
          "one {}", describe(), state.deviceType, deviceType());
  require(state.numQueues == numQueues_, "{}: the template's device had {} queues, this one {}",
          describe(), state.numQueues, numQueues_);
  uint64_t missing = state.ackedFeatures & ~(offeredFeatures_ | vhost::bit(vhost::feature::kVersion1));
  require(missing == 0,
          "{}: the back-end does not offer features {} that the template's driver negotiated "
          "(it offers {:#x}, the template's offered {:#x})",
          describe(), hex(missing), backendFeatures_, state.backendFeatures);
  require(state.config.size() >= 8 && configSpace_.size() >= 8, "{}: no capacity in the config "
          "space ({} bytes saved)", describe(), state.config.size());
  uint64_t savedCapacity = 0, capacity = 0;
  std::memcpy(&savedCapacity, state.config.data(), 8);
  std::memcpy(&capacity, configSpace_.data(), 8);
  require(savedCapacity == capacity, "{}: the disk has {} sectors, the template's had {}",
          describe(), capacity, savedCapacity);
  for (const auto& queue : state.queues) {
    require(queue.index < numQueues_, "{}: saved queue {} does not exist ({} queues)", describe(),
            queue.index, numQueues_);
    require(queue.size >= 1 && queue.size <= config_.queueSize && std::has_single_bit(queue.size),
            "{}: saved queue {} has size {}", describe(), queue.index, queue.size);
  }
  // The guest keeps reading the config it knew; the capacity is checked equal above. The one
  // field a driver writes (writeback, with CONFIG_WCE) goes to the new back-end too.
  if (state.config.size() == configSpace_.size()) {
    constexpr unsigned kBlkFeatureConfigWce = 11;
    constexpr size_t kWritebackOffset = 32;
    if (vhost::hasBit(state.ackedFeatures, kBlkFeatureConfigWce) &&
        configSpace_.size() > kWritebackOffset &&
        configSpace_[kWritebackOffset] != state.config[kWritebackOffset]) {
      frontend_.setConfig(kWritebackOffset, std::span(&state.config[kWritebackOffset], 1));
    }
    configSpace_ = state.config;
  }
  restoredQueues_ = state.queues;
}

void VhostUserBackend::reset() {
  std::lock_guard lock(mutex_);
  resetLocked();
}

void VhostUserBackend::resetLocked() {
  {
    std::lock_guard callbackLock(callbackMutex_);
    configChanged_ = nullptr;
  }
  if (startedQueues_.empty() && !featuresSent_) return;
  std::vector<VirtioQueueInfo> started = std::move(startedQueues_);
  startedQueues_.clear();
  suspendedQueues_.clear();
  featuresSent_ = false;
  if (!connected()) return;
  try {
    for (const VirtioQueueInfo& info : started) {
      uint16_t queue = info.index;
      if (vhost::hasBit(backendFeatures_, vhost::feature::kProtocolFeatures)) {
        frontend_.setVringEnable(queue, false);
      }
      frontend_.getVringBase(queue);  // stops the ring; the index is not needed again
    }
    if (vhost::hasBit(protocolFeatures_, vhost::protocol::kResetDevice)) frontend_.resetDevice();
  } catch (const std::exception& e) {
    log_.warn("{}: stopping the device: {}", describe(), e.what());
  }
}

void VhostUserBackend::statusChanged(uint8_t oldStatus, uint8_t newStatus) {
  (void)oldStatus;
  if (!vhost::hasBit(protocolFeatures_, vhost::protocol::kStatus)) return;
  std::lock_guard lock(mutex_);
  if (!connected()) return;
  try {
    frontend_.setStatus(newStatus);
  } catch (const std::exception& e) {
    log_.warn("{}: SET_STATUS {:#x}: {}", describe(), newStatus, e.what());
  }
}

// ---------------------------------------------------------------------------------------
// The watcher.

void VhostUserBackend::startWatching(std::string deviceName, std::function<void()> onDisconnect) {
  require(!watcher_.joinable(), "{}: already watched", describe());
  deviceName_ = std::move(deviceName);
  onDisconnect_ = std::move(onDisconnect);
  watcher_ = std::thread([this] { watch(); });
}

void VhostUserBackend::markDisconnected(const std::string& why) {
  if (disconnected_.exchange(true)) return;
  log_.error("{} disconnected; device {} is no longer served ({})", describe(), deviceName_, why);
  if (onDisconnect_) {
    try {
      onDisconnect_();
    } catch (const std::exception& e) {
      log_.warn("{}: disconnect handler: {}", describe(), e.what());
    }
  }
}

void VhostUserBackend::watch() {
  vhost::BackendRequestChannel::Handlers handlers{.configChanged = [this] {
    configStale_ = true;
    std::lock_guard callbackLock(callbackMutex_);
    if (configChanged_) configChanged_();
    log_.info("{}: the back-end reports a config change", describe());
  }};
  bool requests = requestChannel_.has_value();
  for (;;) {
    pollfd fds[3] = {{stopFd_.get(), POLLIN, 0},
                     {watchSocket_.get(), POLLRDHUP, 0},
                     {requests ? requestChannel_->fd() : -1, POLLIN, 0}};
    int n = ::poll(fds, 3, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      log_.error("{}: poll for hang-ups failed: {}", describe(), std::strerror(errno));
      return;
    }
    if (fds[0].revents) return;
    if (fds[1].revents & (POLLHUP | POLLRDHUP | POLLERR)) {
      markDisconnected("its socket hung up");
      return;
    }
    if (requests && fds[2].revents) {
      try {
        if (!requestChannel_->handleOne(handlers)) {
          // The back-end closed its request channel; the main socket tells whether it died.
          requests = false;
        }
      } catch (const std::exception& e) {
        log_.warn("{}: back-end request: {}", describe(), e.what());
        requests = false;
      }
    }
  }
}

}  // namespace clonevm::vmm
