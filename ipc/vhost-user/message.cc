#include "ipc/vhost-user/message.h"

#include <array>

namespace clonevm::ipc::vhost {
namespace {

constexpr std::array<std::string_view, kFrontendRequestCount> kFrontendRequestNames = {
    "VHOST_USER_NONE",
    "VHOST_USER_GET_FEATURES",
    "VHOST_USER_SET_FEATURES",
    "VHOST_USER_SET_OWNER",
    "VHOST_USER_RESET_OWNER",
    "VHOST_USER_SET_MEM_TABLE",
    "VHOST_USER_SET_LOG_BASE",
    "VHOST_USER_SET_LOG_FD",
    "VHOST_USER_SET_VRING_NUM",
    "VHOST_USER_SET_VRING_ADDR",
    "VHOST_USER_SET_VRING_BASE",
    "VHOST_USER_GET_VRING_BASE",
    "VHOST_USER_SET_VRING_KICK",
    "VHOST_USER_SET_VRING_CALL",
    "VHOST_USER_SET_VRING_ERR",
    "VHOST_USER_GET_PROTOCOL_FEATURES",
    "VHOST_USER_SET_PROTOCOL_FEATURES",
    "VHOST_USER_GET_QUEUE_NUM",
    "VHOST_USER_SET_VRING_ENABLE",
    "VHOST_USER_SEND_RARP",
    "VHOST_USER_NET_SET_MTU",
    "VHOST_USER_SET_BACKEND_REQ_FD",
    "VHOST_USER_IOTLB_MSG",
    "VHOST_USER_SET_VRING_ENDIAN",
    "VHOST_USER_GET_CONFIG",
    "VHOST_USER_SET_CONFIG",
    "VHOST_USER_CREATE_CRYPTO_SESSION",
    "VHOST_USER_CLOSE_CRYPTO_SESSION",
    "VHOST_USER_POSTCOPY_ADVISE",
    "VHOST_USER_POSTCOPY_LISTEN",
    "VHOST_USER_POSTCOPY_END",
    "VHOST_USER_GET_INFLIGHT_FD",
    "VHOST_USER_SET_INFLIGHT_FD",
    "VHOST_USER_GPU_SET_SOCKET",
    "VHOST_USER_RESET_DEVICE",
    "VHOST_USER_VRING_KICK",
    "VHOST_USER_GET_MAX_MEM_SLOTS",
    "VHOST_USER_ADD_MEM_REG",
    "VHOST_USER_REM_MEM_REG",
    "VHOST_USER_SET_STATUS",
    "VHOST_USER_GET_STATUS",
    "VHOST_USER_GET_SHARED_OBJECT",
    "VHOST_USER_SET_DEVICE_STATE_FD",
    "VHOST_USER_CHECK_DEVICE_STATE",
};

constexpr std::array<std::string_view, kBackendRequestCount> kBackendRequestNames = {
    "VHOST_USER_BACKEND_NONE",
    "VHOST_USER_BACKEND_IOTLB_MSG",
    "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG",
    "VHOST_USER_BACKEND_VRING_HOST_NOTIFIER_MSG",
    "VHOST_USER_BACKEND_VRING_CALL",
    "VHOST_USER_BACKEND_VRING_ERR",
    "VHOST_USER_BACKEND_SHARED_OBJECT_ADD",
    "VHOST_USER_BACKEND_SHARED_OBJECT_REMOVE",
    "VHOST_USER_BACKEND_SHARED_OBJECT_LOOKUP",
};

constexpr std::array<std::string_view, 20> kProtocolFeatureNames = {
    "MQ",          "LOG_SHMFD",      "RARP",          "REPLY_ACK",         "MTU",
    "BACKEND_REQ", "CROSS_ENDIAN",   "CRYPTO_SESSION", "PAGEFAULT",        "CONFIG",
    "BACKEND_SEND_FD", "HOST_NOTIFIER", "INFLIGHT_SHMFD", "RESET_DEVICE",  "INBAND_NOTIFICATIONS",
    "CONFIGURE_MEM_SLOTS", "STATUS", "XEN_MMAP",      "SHARED_OBJECT",     "DEVICE_STATE",
};

constexpr uint32_t kU64 = sizeof(uint64_t);
constexpr uint32_t kState = sizeof(VringState);

MessageRule rule(uint32_t size, uint8_t fds = 0, bool reply = false) {
  return {true, size, size, fds, fds, reply};
}
MessageRule ruleRange(uint32_t minSize, uint32_t maxSize, uint8_t minFds, uint8_t maxFds,
                      bool reply = false) {
  return {true, minSize, maxSize, minFds, maxFds, reply};
}

void checkCommon(const Message& message, std::string_view name, const MessageRule& rule) {
  const auto& header = message.header;
  require((header.flags & kVersionMask) == kVersion,
          "vhost-user {}: unsupported version {} in flags {:#x}", name,
          header.flags & kVersionMask, header.flags);
  require((header.flags & ~kKnownFlags) == 0, "vhost-user {}: unknown flags {:#x}", name,
          header.flags & ~kKnownFlags);
  require(header.size == message.payload.size(),
          "vhost-user {}: header says {} payload bytes, {} arrived", name, header.size,
          message.payload.size());
  require(header.size >= rule.minSize && header.size <= rule.maxSize,
          "vhost-user {}: payload is {} bytes, must be {}", name, header.size,
          rule.minSize == rule.maxSize ? fmt::format("{}", rule.minSize)
                                       : fmt::format("{} to {}", rule.minSize, rule.maxSize));
  require(message.fds.size() >= rule.minFds && message.fds.size() <= rule.maxFds,
          "vhost-user {}: came with {} file descriptors, must be {}", name, message.fds.size(),
          rule.minFds == rule.maxFds ? fmt::format("{}", rule.minFds)
                                     : fmt::format("{} to {}", rule.minFds, rule.maxFds));
}

}  // namespace

std::string requestName(FrontendRequest request) {
  auto code = static_cast<uint32_t>(request);
  if (code < kFrontendRequestNames.size()) return std::string(kFrontendRequestNames[code]);
  return fmt::format("request {}", code);
}

std::string requestShortName(FrontendRequest request) {
  std::string name = requestName(request);
  constexpr std::string_view kPrefix = "VHOST_USER_";
  if (name.compare(0, kPrefix.size(), kPrefix) == 0) name.erase(0, kPrefix.size());
  return name;
}

std::string requestName(BackendRequest request) {
  auto code = static_cast<uint32_t>(request);
  if (code < kBackendRequestNames.size()) return std::string(kBackendRequestNames[code]);
  return fmt::format("back-end request {}", code);
}

std::string protocolFeatureName(unsigned bitNumber) {
  if (bitNumber < kProtocolFeatureNames.size()) {
    return fmt::format("VHOST_USER_PROTOCOL_F_{}", kProtocolFeatureNames[bitNumber]);
  }
  return fmt::format("protocol feature {}", bitNumber);
}

Message Message::make(uint32_t request, uint32_t flags, std::span<const uint8_t> bytes) {
  Message message;
  message.header.request = request;
  message.header.flags = kVersion | flags;
  message.header.size = static_cast<uint32_t>(bytes.size());
  message.payload.assign(bytes.begin(), bytes.end());
  return message;
}

MessageRule frontendRequestRule(FrontendRequest request) {
  using R = FrontendRequest;
  switch (request) {
    case R::kGetFeatures: return rule(0, 0, true);
    case R::kSetFeatures: return rule(kU64);
    case R::kSetOwner: return rule(0);
    case R::kResetOwner: return rule(0);
    case R::kSetMemTable:
      return ruleRange(sizeof(MemoryTableHeader), sizeof(MemoryTable), 0, kMaxMemTableRegions);
    // A u64 without LOG_SHMFD, a log description and its fd with it.
    case R::kSetLogBase: return ruleRange(kU64, sizeof(LogDescription), 0, 1);
    case R::kSetLogFd: return ruleRange(0, kU64, 1, 1);
    case R::kSetVringNum: return rule(kState);
    case R::kSetVringAddr: return rule(sizeof(VringAddress));
    case R::kSetVringBase: return rule(kState);
    case R::kGetVringBase: return rule(kState, 0, true);
    case R::kSetVringKick:
    case R::kSetVringCall:
    case R::kSetVringErr: return ruleRange(kU64, kU64, 0, 1);
    case R::kGetProtocolFeatures: return rule(0, 0, true);
    case R::kSetProtocolFeatures: return rule(kU64);
    case R::kGetQueueNum: return rule(0, 0, true);
    case R::kSetVringEnable: return rule(kState);
    case R::kSendRarp: return rule(kU64);
    case R::kNetSetMtu: return rule(kU64);
    case R::kSetBackendReqFd: return rule(0, 1);
    case R::kIotlbMsg: return rule(sizeof(IotlbMessage), 0, true);
    case R::kSetVringEndian: return rule(kState);
    case R::kGetConfig:
      return ruleRange(sizeof(ConfigHeader), sizeof(ConfigHeader) + kMaxConfigSize, 0, 0, true);
    case R::kSetConfig:
      return ruleRange(sizeof(ConfigHeader), sizeof(ConfigHeader) + kMaxConfigSize, 0, 0);
    case R::kCreateCryptoSession: return ruleRange(0, kMaxPayloadSize, 0, 0, true);
    case R::kCloseCryptoSession: return rule(kU64);
    case R::kPostcopyAdvise: return rule(0, 0, true);
    case R::kPostcopyListen: return rule(0);
    case R::kPostcopyEnd: return rule(0, 0, true);
    case R::kGetInflightFd: return rule(sizeof(InflightDescription), 0, true);
    case R::kSetInflightFd: return rule(sizeof(InflightDescription), 1);
    case R::kGpuSetSocket: return rule(0, 1);
    case R::kResetDevice: return rule(0);
    case R::kVringKick: return rule(kState);
    case R::kGetMaxMemSlots: return rule(0, 0, true);
    case R::kAddMemReg: return rule(sizeof(SingleMemoryRegion), 1);
    // The spec lets a back-end accept (and close) one stray fd here.
    case R::kRemMemReg: return ruleRange(sizeof(SingleMemoryRegion), sizeof(SingleMemoryRegion), 0, 1);
    case R::kSetStatus: return rule(kU64);
    case R::kGetStatus: return rule(0, 0, true);
    case R::kGetSharedObject: return rule(sizeof(SharedObject), 0, true);
    case R::kSetDeviceStateFd: return rule(sizeof(DeviceStateTransfer), 1, true);
    case R::kCheckDeviceState: return rule(0, 0, true);
    case R::kNone: break;
  }
  return {};
}

MessageRule backendRequestRule(BackendRequest request) {
  using R = BackendRequest;
  switch (request) {
    case R::kIotlbMsg: return rule(sizeof(IotlbMessage));
    case R::kConfigChangeMsg: return rule(0);
    case R::kVringHostNotifierMsg: return ruleRange(sizeof(VringArea), sizeof(VringArea), 0, 1);
    case R::kVringCall:
    case R::kVringErr: return rule(kState);
    case R::kSharedObjectAdd:
    case R::kSharedObjectRemove: return rule(sizeof(SharedObject));
    case R::kSharedObjectLookup: return rule(sizeof(SharedObject), 0, true);
    case R::kNone: break;
  }
  return {};
}

void validateFrontendRequest(const Message& message) {
  auto request = message.frontendRequest();
  std::string name = requestName(request);
  MessageRule rule = frontendRequestRule(request);
  require(rule.known, "vhost-user: unknown front-end request {}", message.header.request);
  require((message.header.flags & kReplyFlag) == 0,
          "vhost-user {}: a request must not carry the REPLY flag", name);
  checkCommon(message, name, rule);

  switch (request) {
    case FrontendRequest::kSetMemTable: {
      auto header = message.payloadAs<MemoryTableHeader>();
      require(header.regionCount <= kMaxMemTableRegions,
              "vhost-user {}: {} regions, at most {} fit in one message", name,
              header.regionCount, kMaxMemTableRegions);
      uint32_t expected = sizeof(MemoryTableHeader) + header.regionCount * sizeof(MemoryRegion);
      require(message.header.size == expected,
              "vhost-user {}: {} regions need {} payload bytes, got {}", name, header.regionCount,
              expected, message.header.size);
      require(message.fds.size() == header.regionCount,
              "vhost-user {}: {} regions need {} file descriptors, got {}", name,
              header.regionCount, header.regionCount, message.fds.size());
      break;
    }
    case FrontendRequest::kGetConfig:
    case FrontendRequest::kSetConfig: {
      auto config = message.payloadAs<ConfigHeader>();
      require(config.size <= kMaxConfigSize, "vhost-user {}: config size {} exceeds {}", name,
              config.size, kMaxConfigSize);
      require(message.header.size == sizeof(ConfigHeader) + config.size,
              "vhost-user {}: config size {} needs {} payload bytes, got {}", name, config.size,
              sizeof(ConfigHeader) + config.size, message.header.size);
      break;
    }
    case FrontendRequest::kSetVringKick:
    case FrontendRequest::kSetVringCall:
    case FrontendRequest::kSetVringErr: {
      auto value = message.payloadAs<uint64_t>();
      require((value & ~(kVringIndexMask | kVringNoFdFlag)) == 0,
              "vhost-user {}: reserved bits set in {:#x}", name, value);
      size_t expectedFds = (value & kVringNoFdFlag) != 0 ? 0 : 1;
      require(message.fds.size() == expectedFds,
              "vhost-user {}: {} file descriptors with the no-fd flag {}", name,
              message.fds.size(), expectedFds == 0 ? "set" : "clear");
      break;
    }
    case FrontendRequest::kSetLogBase: {
      // With LOG_SHMFD the payload is a log description and exactly one fd comes with it.
      bool shared = message.header.size == sizeof(LogDescription);
      require(message.header.size == kU64 || shared,
              "vhost-user {}: payload is {} bytes, must be 8 or 16", name, message.header.size);
      require(message.fds.size() == (shared ? 1u : 0u),
              "vhost-user {}: {} file descriptors for a {}-byte payload", name,
              message.fds.size(), message.header.size);
      break;
    }
    default:
      break;
  }
}

void validateReply(const Message& message, FrontendRequest request, uint32_t expectedSize,
                   size_t expectedFds) {
  std::string name = requestName(request);
  require(message.header.request == static_cast<uint32_t>(request),
          "vhost-user reply to {} has request code {} ({})", name, message.header.request,
          requestName(message.frontendRequest()));
  require((message.header.flags & kReplyFlag) != 0,
          "vhost-user reply to {} lacks the REPLY flag (flags {:#x})", name, message.header.flags);
  MessageRule rule{true, expectedSize, expectedSize, static_cast<uint8_t>(expectedFds),
                   static_cast<uint8_t>(expectedFds), false};
  checkCommon(message, "reply to " + name, rule);
}

void validateBackendRequest(const Message& message) {
  auto request = message.backendRequest();
  std::string name = requestName(request);
  MessageRule rule = backendRequestRule(request);
  require(rule.known, "vhost-user: unknown back-end request {}", message.header.request);
  require((message.header.flags & kReplyFlag) == 0,
          "vhost-user {}: a request must not carry the REPLY flag", name);
  checkCommon(message, name, rule);
}

}  // namespace clonevm::ipc::vhost
