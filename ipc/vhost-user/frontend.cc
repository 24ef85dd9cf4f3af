#include "ipc/vhost-user/frontend.h"

#include <cstring>

#include "common/error.h"

namespace clonevm::ipc::vhost {
namespace {

template <typename T>
std::span<const uint8_t> bytesOf(const T& value) {
  return std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&value), sizeof(T));
}

MemoryRegion toWire(const MemoryRegionSpec& spec) {
  return {spec.guestAddress, spec.size, spec.userAddress, spec.fdOffset};
}

// A SET_MEM_TABLE payload and its fds (one per region).
struct WireMemoryTable {
  MemoryTable table{};
  int fds[kMaxMemTableRegions] = {};
  size_t count = 0;

  explicit WireMemoryTable(std::span<const MemoryRegionSpec> regions) : count(regions.size()) {
    require(regions.size() <= kMaxMemTableRegions,
            "vhost-user SET_MEM_TABLE takes at most {} regions, got {} (use ADD_MEM_REG)",
            kMaxMemTableRegions, regions.size());
    table.header.regionCount = static_cast<uint32_t>(regions.size());
    for (size_t i = 0; i < regions.size(); ++i) {
      table.regions[i] = toWire(regions[i]);
      fds[i] = regions[i].fd;
    }
  }
  size_t size() const { return sizeof(MemoryTableHeader) + count * sizeof(MemoryRegion); }
  std::span<const uint8_t> payload() const {
    return {reinterpret_cast<const uint8_t*>(&table), size()};
  }
  std::span<const int> fdSpan() const { return {fds, count}; }
};

}  // namespace

// --- BackendRequestChannel.

BackendRequestChannel::BackendRequestChannel(UniqueFd socket, std::string backendName,
                                             bool replyAck)
    : channel_(std::move(socket), "back-end " + backendName), replyAck_(replyAck) {}

bool BackendRequestChannel::handleOne(const Handlers& handlers) {
  Message message;
  try {
    message = channel_.receive();
  } catch (const ChannelClosed&) {
    return false;
  }
  validateBackendRequest(message);
  BackendRequest request = message.backendRequest();
  uint64_t result = 0;
  if (request == BackendRequest::kConfigChangeMsg) {
    if (handlers.configChanged) handlers.configChanged();
  } else {
    result = 1;  // nothing else is supported by this front-end
  }
  bool hasOwnReply = backendRequestRule(request).hasReply;
  if (hasOwnReply || (message.needsReply() && replyAck_)) {
    MessageHeader header{message.header.request, kVersion | kReplyFlag, sizeof(uint64_t)};
    channel_.send(header, bytesOf(result));
  }
  return true;
}

// --- Frontend.

Frontend Frontend::connect(const std::string& socketPath, FrontendOptions options) {
  return Frontend(connectUnixSocket(socketPath), socketPath, options);
}

Frontend::Frontend(UniqueFd socket, std::string backendName, FrontendOptions options)
    : channel_(std::move(socket), "backend " + backendName), backendName_(std::move(backendName)) {
  channel_.setReceiveTimeout(options.replyTimeout);
}

void Frontend::fail(FrontendRequest request, const std::exception& error) {
  broken_ = true;
  std::string name = requestShortName(request);
  if (dynamic_cast<const ChannelClosed*>(&error) != nullptr) {
    brokenReason_ = fmt::format("vhost-user backend {} disconnected during {}", backendName_, name);
  } else if (dynamic_cast<const ChannelTimeout*>(&error) != nullptr) {
    brokenReason_ = fmt::format("vhost-user backend {} did not answer {}: {}", backendName_, name,
                                error.what());
  } else {
    brokenReason_ = fmt::format("vhost-user backend {} failed {}: {}", backendName_, name,
                                error.what());
  }
  channel_.close();
  throw Error(brokenReason_);
}

void Frontend::sendRequest(FrontendRequest request, uint32_t flags,
                           std::span<const uint8_t> payload, std::span<const int> fds) {
  if (broken_) {
    throw Error(fmt::format("vhost-user backend {}: cannot send {}, the connection is unusable "
                            "({})",
                            backendName_, requestShortName(request), brokenReason_));
  }
  MessageHeader header{static_cast<uint32_t>(request), kVersion | flags,
                       static_cast<uint32_t>(payload.size())};
  try {
    channel_.send(header, payload, fds);
  } catch (const std::exception& e) {
    fail(request, e);
  }
}

Message Frontend::receiveReply(FrontendRequest request) {
  try {
    return channel_.receive();
  } catch (const std::exception& e) {
    fail(request, e);
  }
}

void Frontend::command(FrontendRequest request, std::span<const uint8_t> payload,
                       std::span<const int> fds) {
  bool wantAck = hasBit(protocolFeatures_, protocol::kReplyAck);
  sendRequest(request, wantAck ? kNeedReplyFlag : 0, payload, fds);
  if (!wantAck) return;
  Message reply = receiveReply(request);
  uint64_t ack = 0;
  try {
    validateReply(reply, request, sizeof(uint64_t));
    ack = reply.payloadAs<uint64_t>();
  } catch (const std::exception& e) {
    fail(request, e);
  }
  // A refused request leaves the stream in step: the connection stays usable.
  require(ack == 0, "vhost-user backend {} refused {} (status {})", backendName_,
          requestShortName(request), ack);
}

Message Frontend::query(FrontendRequest request, std::span<const uint8_t> payload,
                        uint32_t replySize, size_t replyFds) {
  sendRequest(request, 0, payload, {});
  Message reply = receiveReply(request);
  try {
    if (replySize != kAnySize) validateReply(reply, request, replySize, replyFds);
  } catch (const std::exception& e) {
    fail(request, e);
  }
  return reply;
}

uint64_t Frontend::queryU64(FrontendRequest request) {
  return query(request, {}, sizeof(uint64_t)).payloadAs<uint64_t>();
}

Message Frontend::exchange(FrontendRequest request, std::span<const uint8_t> payload,
                           std::span<const int> fds, bool expectReply) {
  bool wantAck = !expectReply && hasBit(protocolFeatures_, protocol::kReplyAck);
  sendRequest(request, wantAck ? kNeedReplyFlag : 0, payload, fds);
  if (!expectReply && !wantAck) return Message{};
  return receiveReply(request);
}

uint64_t Frontend::getFeatures() { return queryU64(FrontendRequest::kGetFeatures); }

void Frontend::setFeatures(uint64_t features) {
  command(FrontendRequest::kSetFeatures, features);
}

uint64_t Frontend::getProtocolFeatures() {
  return queryU64(FrontendRequest::kGetProtocolFeatures);
}

void Frontend::setProtocolFeatures(uint64_t features) {
  command(FrontendRequest::kSetProtocolFeatures, features);
  protocolFeatures_ = features;  // REPLY_ACK applies from the next request on
}

void Frontend::setOwner() { command(FrontendRequest::kSetOwner, {}); }

void Frontend::resetOwner() { command(FrontendRequest::kResetOwner, {}); }

void Frontend::resetDevice() {
  if (hasProtocolFeature(protocol::kResetDevice)) {
    command(FrontendRequest::kResetDevice, {});
  } else {
    resetOwner();
  }
}

uint64_t Frontend::getQueueNum() { return queryU64(FrontendRequest::kGetQueueNum); }

void Frontend::setMemTable(std::span<const MemoryRegionSpec> regions) {
  WireMemoryTable wire(regions);
  command(FrontendRequest::kSetMemTable, wire.payload(), wire.fdSpan());
}

uint64_t Frontend::getMaxMemSlots() { return queryU64(FrontendRequest::kGetMaxMemSlots); }

UniqueFd Frontend::postcopyAdvise() {
  require(hasProtocolFeature(protocol::kPagefault),
          "vhost-user backend {}: POSTCOPY_ADVISE without VHOST_USER_PROTOCOL_F_PAGEFAULT",
          backendName_);
  Message reply = query(FrontendRequest::kPostcopyAdvise, {}, 0, 1);
  return std::move(reply.fds.front());
}

void Frontend::postcopyListen() { command(FrontendRequest::kPostcopyListen, {}); }

void Frontend::setMemTablePostcopy(
    std::span<const MemoryRegionSpec> regions,
    const std::function<void(std::span<const uint64_t>)>& registered) {
  WireMemoryTable wire(regions);
  const MemoryTable& table = wire.table;
  // The spec's exception: no NEED_REPLY, the answer is the back-end's table.
  sendRequest(FrontendRequest::kSetMemTable, 0, wire.payload(), wire.fdSpan());
  Message reply = receiveReply(FrontendRequest::kSetMemTable);
  std::vector<uint64_t> bases;
  try {
    validateReply(reply, FrontendRequest::kSetMemTable, static_cast<uint32_t>(wire.size()));
    MemoryTable answer{};
    std::memcpy(&answer, reply.payload.data(), wire.size());
    require(answer.header.regionCount == regions.size(),
            "the postcopy memory table answer has {} regions, {} were sent",
            answer.header.regionCount, regions.size());
    for (size_t i = 0; i < regions.size(); ++i) {
      require(answer.regions[i].guestAddress == table.regions[i].guestAddress &&
                  answer.regions[i].size == table.regions[i].size,
              "the postcopy memory table answer differs in region {}", i);
      require(answer.regions[i].userAddress % 4096 == 0 && answer.regions[i].userAddress != 0,
              "the postcopy memory table answer maps region {} at {:#x}", i,
              answer.regions[i].userAddress);
      bases.push_back(answer.regions[i].userAddress);
    }
  } catch (const std::exception& e) {
    fail(FrontendRequest::kSetMemTable, e);
  }
  registered(bases);
  // The acknowledgement QEMU sends: a SET_MEM_TABLE carrying a u64 0.
  uint64_t ok = 0;
  sendRequest(FrontendRequest::kSetMemTable, 0, bytesOf(ok), {});
}

void Frontend::addMemRegion(const MemoryRegionSpec& region) {
  SingleMemoryRegion body{0, toWire(region)};
  int fd = region.fd;
  command(FrontendRequest::kAddMemReg, body, std::span<const int>(&fd, 1));
}

void Frontend::removeMemRegion(const MemoryRegionSpec& region) {
  SingleMemoryRegion body{0, toWire(region)};
  command(FrontendRequest::kRemMemReg, body);
}

void Frontend::setVringNum(uint32_t queue, uint32_t size) {
  command(FrontendRequest::kSetVringNum, VringState{queue, size});
}

void Frontend::setVringAddr(uint32_t queue, const VringAddresses& addresses) {
  VringAddress body{queue, addresses.flags, addresses.descriptor, addresses.used,
                    addresses.available, addresses.log};
  command(FrontendRequest::kSetVringAddr, body);
}

void Frontend::setVringBase(uint32_t queue, uint32_t base) {
  command(FrontendRequest::kSetVringBase, VringState{queue, base});
}

uint32_t Frontend::getVringBase(uint32_t queue) {
  VringState state{queue, 0};
  Message reply = query(FrontendRequest::kGetVringBase, bytesOf(state), sizeof(VringState));
  auto answer = reply.payloadAs<VringState>();
  if (answer.index != queue) {
    fail(FrontendRequest::kGetVringBase,
         Error(fmt::format("reply is for queue {}, asked for {}", answer.index, queue)));
  }
  return answer.num;
}

void Frontend::vringFd(FrontendRequest request, uint32_t queue, int fd) {
  require(queue <= kVringIndexMask, "vhost-user {}: queue index {} does not fit 8 bits",
          requestShortName(request), queue);
  uint64_t value = queue;
  if (fd < 0) {
    value |= kVringNoFdFlag;
    command(request, value);
  } else {
    command(request, value, std::span<const int>(&fd, 1));
  }
}

void Frontend::setVringKick(uint32_t queue, int fd) {
  vringFd(FrontendRequest::kSetVringKick, queue, fd);
}

void Frontend::setVringCall(uint32_t queue, int fd) {
  vringFd(FrontendRequest::kSetVringCall, queue, fd);
}

void Frontend::setVringErr(uint32_t queue, int fd) {
  vringFd(FrontendRequest::kSetVringErr, queue, fd);
}

void Frontend::setVringEnable(uint32_t queue, bool enable) {
  command(FrontendRequest::kSetVringEnable, VringState{queue, enable ? 1u : 0u});
}

std::vector<uint8_t> Frontend::getConfig(uint32_t offset, uint32_t size, ConfigFlags flags) {
  require(size <= kMaxConfigSize, "vhost-user GET_CONFIG of {} bytes, at most {}", size,
          kMaxConfigSize);
  std::vector<uint8_t> payload(sizeof(ConfigHeader) + size, 0);
  ConfigHeader header{offset, size, static_cast<uint32_t>(flags)};
  std::memcpy(payload.data(), &header, sizeof(header));
  Message reply = query(FrontendRequest::kGetConfig, payload, kAnySize);
  // A zero-length reply is the spec's way of refusing.
  if (reply.header.size == 0 && (reply.header.flags & kReplyFlag) != 0 &&
      reply.header.request == static_cast<uint32_t>(FrontendRequest::kGetConfig)) {
    throw Error(fmt::format("vhost-user backend {} refused GET_CONFIG of {} bytes at offset {}",
                            backendName_, size, offset));
  }
  try {
    validateReply(reply, FrontendRequest::kGetConfig, static_cast<uint32_t>(payload.size()));
    auto answer = reply.payloadAs<ConfigHeader>();
    require(answer.offset == offset && answer.size == size,
            "reply is for {} bytes at offset {}, asked for {} at {}", answer.size, answer.offset,
            size, offset);
  } catch (const std::exception& e) {
    fail(FrontendRequest::kGetConfig, e);
  }
  return std::vector<uint8_t>(reply.payload.begin() + sizeof(ConfigHeader), reply.payload.end());
}

void Frontend::setConfig(uint32_t offset, std::span<const uint8_t> data, ConfigFlags flags) {
  require(data.size() <= kMaxConfigSize, "vhost-user SET_CONFIG of {} bytes, at most {}",
          data.size(), kMaxConfigSize);
  std::vector<uint8_t> payload(sizeof(ConfigHeader) + data.size());
  ConfigHeader header{offset, static_cast<uint32_t>(data.size()), static_cast<uint32_t>(flags)};
  std::memcpy(payload.data(), &header, sizeof(header));
  if (!data.empty()) std::memcpy(payload.data() + sizeof(header), data.data(), data.size());
  command(FrontendRequest::kSetConfig, payload);
}

void Frontend::setStatus(uint8_t status) {
  command(FrontendRequest::kSetStatus, uint64_t{status});
}

uint8_t Frontend::getStatus() {
  uint64_t status = queryU64(FrontendRequest::kGetStatus);
  if (status > 0xff) {
    fail(FrontendRequest::kGetStatus, Error(fmt::format("status {:#x} is not a byte", status)));
  }
  return static_cast<uint8_t>(status);
}

InflightArea Frontend::getInflightFd(uint16_t queueCount, uint16_t queueSize) {
  InflightDescription body{0, 0, queueCount, queueSize, 0};
  Message reply = query(FrontendRequest::kGetInflightFd, bytesOf(body), kAnySize);
  InflightArea area;
  try {
    auto description = reply.payloadAs<InflightDescription>();
    // A back-end with nothing to track may answer with size 0 and no fd.
    validateReply(reply, FrontendRequest::kGetInflightFd, sizeof(InflightDescription),
                  description.mmapSize == 0 ? 0 : 1);
    area.mmapSize = description.mmapSize;
    area.mmapOffset = description.mmapOffset;
    area.queueCount = description.queueCount;
    area.queueSize = description.queueSize;
    if (!reply.fds.empty()) area.fd = std::move(reply.fds.front());
  } catch (const std::exception& e) {
    fail(FrontendRequest::kGetInflightFd, e);
  }
  return area;
}

void Frontend::setInflightFd(const InflightArea& area) {
  require(area.fd.valid(), "vhost-user SET_INFLIGHT_FD needs the area's fd");
  InflightDescription body{area.mmapSize, area.mmapOffset, area.queueCount, area.queueSize, 0};
  int fd = area.fd.get();
  command(FrontendRequest::kSetInflightFd, body, std::span<const int>(&fd, 1));
}

BackendRequestChannel Frontend::openBackendRequestChannel() {
  auto [ours, theirs] = makeSocketPair();
  int fd = theirs.get();
  command(FrontendRequest::kSetBackendReqFd, std::span<const uint8_t>(),
          std::span<const int>(&fd, 1));
  return BackendRequestChannel(std::move(ours), backendName_,
                               hasProtocolFeature(protocol::kReplyAck));
}

}  // namespace clonevm::ipc::vhost
