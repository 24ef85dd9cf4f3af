#pragma once
// The vhost-user wire format, as specified in QEMU's docs/interop/vhost-user.rst.
//
// Every number here (request codes, feature bits, payload layouts) is the spec's; the
// static_asserts at the bottom pin the payload layouts to their wire sizes. All fields are in
// host byte order (the spec: "machine native byte order").
//
// This header also holds the *rules* a received message must satisfy (payload size, file
// descriptor count, whether a reply follows). The channel applies them to every message it
// receives, so the code that handles a message can trust its shape.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "common/error.h"
#include "common/unique_fd.h"

namespace clonevm::ipc::vhost {

// Requests sent by the front-end (the VMM) on the main socket.
enum class FrontendRequest : uint32_t {
  kNone = 0,
  kGetFeatures = 1,
  kSetFeatures = 2,
  kSetOwner = 3,
  kResetOwner = 4,
  kSetMemTable = 5,
  kSetLogBase = 6,
  kSetLogFd = 7,
  kSetVringNum = 8,
  kSetVringAddr = 9,
  kSetVringBase = 10,
  kGetVringBase = 11,
  kSetVringKick = 12,
  kSetVringCall = 13,
  kSetVringErr = 14,
  kGetProtocolFeatures = 15,
  kSetProtocolFeatures = 16,
  kGetQueueNum = 17,
  kSetVringEnable = 18,
  kSendRarp = 19,
  kNetSetMtu = 20,
  kSetBackendReqFd = 21,
  kIotlbMsg = 22,
  kSetVringEndian = 23,
  kGetConfig = 24,
  kSetConfig = 25,
  kCreateCryptoSession = 26,
  kCloseCryptoSession = 27,
  kPostcopyAdvise = 28,
  kPostcopyListen = 29,
  kPostcopyEnd = 30,
  kGetInflightFd = 31,
  kSetInflightFd = 32,
  kGpuSetSocket = 33,
  kResetDevice = 34,
  kVringKick = 35,
  kGetMaxMemSlots = 36,
  kAddMemReg = 37,
  kRemMemReg = 38,
  kSetStatus = 39,
  kGetStatus = 40,
  kGetSharedObject = 41,
  kSetDeviceStateFd = 42,
  kCheckDeviceState = 43,
};
inline constexpr uint32_t kFrontendRequestCount = 44;  // one past the highest code

// Requests sent by the back-end on the back-end request channel (SET_BACKEND_REQ_FD).
enum class BackendRequest : uint32_t {
  kNone = 0,
  kIotlbMsg = 1,
  kConfigChangeMsg = 2,
  kVringHostNotifierMsg = 3,
  kVringCall = 4,
  kVringErr = 5,
  kSharedObjectAdd = 6,
  kSharedObjectRemove = 7,
  kSharedObjectLookup = 8,
};
inline constexpr uint32_t kBackendRequestCount = 9;

// "VHOST_USER_GET_FEATURES" style names, for errors and logs. Unknown codes give "request 77".
std::string requestName(FrontendRequest request);
std::string requestName(BackendRequest request);
// The name without its "VHOST_USER_" prefix ("SET_VRING_ADDR"), for front-end errors.
std::string requestShortName(FrontendRequest request);

// Virtio feature bits (VIRTIO 1.2 section 6 and the vhost-user spec).
namespace feature {
inline constexpr unsigned kNotifyOnEmpty = 24;     // VIRTIO_F_NOTIFY_ON_EMPTY (legacy)
inline constexpr unsigned kAnyLayout = 27;         // VIRTIO_F_ANY_LAYOUT (legacy)
inline constexpr unsigned kRingIndirectDesc = 28;  // VIRTIO_F_RING_INDIRECT_DESC
inline constexpr unsigned kRingEventIdx = 29;      // VIRTIO_F_RING_EVENT_IDX
inline constexpr unsigned kProtocolFeatures = 30;  // VHOST_USER_F_PROTOCOL_FEATURES
inline constexpr unsigned kVersion1 = 32;          // VIRTIO_F_VERSION_1
inline constexpr unsigned kAccessPlatform = 33;    // VIRTIO_F_ACCESS_PLATFORM (IOMMU_PLATFORM)
inline constexpr unsigned kRingPacked = 34;        // VIRTIO_F_RING_PACKED
inline constexpr unsigned kInOrder = 35;           // VIRTIO_F_IN_ORDER
inline constexpr unsigned kOrderPlatform = 36;     // VIRTIO_F_ORDER_PLATFORM
inline constexpr unsigned kSrIov = 37;             // VIRTIO_F_SR_IOV
inline constexpr unsigned kNotificationData = 38;  // VIRTIO_F_NOTIFICATION_DATA
inline constexpr unsigned kRingReset = 40;         // VIRTIO_F_RING_RESET
inline constexpr unsigned kLogAll = 26;            // VHOST_F_LOG_ALL (dirty logging)
}  // namespace feature

// vhost-user protocol feature bits (GET/SET_PROTOCOL_FEATURES).
namespace protocol {
inline constexpr unsigned kMq = 0;
inline constexpr unsigned kLogShmfd = 1;
inline constexpr unsigned kRarp = 2;
inline constexpr unsigned kReplyAck = 3;
inline constexpr unsigned kMtu = 4;
inline constexpr unsigned kBackendReq = 5;
inline constexpr unsigned kCrossEndian = 6;
inline constexpr unsigned kCryptoSession = 7;
inline constexpr unsigned kPagefault = 8;
inline constexpr unsigned kConfig = 9;
inline constexpr unsigned kBackendSendFd = 10;
inline constexpr unsigned kHostNotifier = 11;
inline constexpr unsigned kInflightShmfd = 12;
inline constexpr unsigned kResetDevice = 13;
inline constexpr unsigned kInbandNotifications = 14;
inline constexpr unsigned kConfigureMemSlots = 15;
inline constexpr unsigned kStatus = 16;
inline constexpr unsigned kXenMmap = 17;
inline constexpr unsigned kSharedObject = 18;
inline constexpr unsigned kDeviceState = 19;
}  // namespace protocol

constexpr uint64_t bit(unsigned n) { return uint64_t{1} << n; }
constexpr bool hasBit(uint64_t mask, unsigned n) { return (mask & bit(n)) != 0; }

// "VHOST_USER_PROTOCOL_F_REPLY_ACK" style names.
std::string protocolFeatureName(unsigned bit);

// Header flags.
inline constexpr uint32_t kVersion = 0x1;
inline constexpr uint32_t kVersionMask = 0x3;
inline constexpr uint32_t kReplyFlag = 1u << 2;
inline constexpr uint32_t kNeedReplyFlag = 1u << 3;
inline constexpr uint32_t kKnownFlags = kVersionMask | kReplyFlag | kNeedReplyFlag;

// SET_VRING_KICK/CALL/ERR payload: bits 0-7 are the queue index, bit 8 says "no fd".
inline constexpr uint64_t kVringIndexMask = 0xff;
inline constexpr uint64_t kVringNoFdFlag = 1u << 8;

// SET_VRING_ADDR flags: VHOST_VRING_F_LOG.
inline constexpr uint32_t kVringFlagLog = 1u << 0;

// SCM_RIGHTS limit of one message (VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE's region cap).
inline constexpr size_t kMaxFdsPerMessage = 8;
inline constexpr uint32_t kMaxMemTableRegions = 8;
// Largest config space access (VHOST_USER_MAX_CONFIG_SIZE).
inline constexpr uint32_t kMaxConfigSize = 256;
// Framing limit: no valid message is larger; a bigger size means a corrupt stream.
inline constexpr uint32_t kMaxPayloadSize = 4096;
// Split virtqueue size limit (VIRTIO 1.2: Queue Size is at most 32768).
inline constexpr uint32_t kMaxQueueSize = 32768;

struct MessageHeader {
  uint32_t request;
  uint32_t flags;
  uint32_t size;  // payload bytes that follow
};

struct VringState {
  uint32_t index;
  uint32_t num;
};

struct VringAddress {
  uint32_t index;
  uint32_t flags;
  uint64_t descriptor;  // front-end user addresses (IOVAs with ACCESS_PLATFORM)
  uint64_t used;
  uint64_t available;
  uint64_t log;  // guest physical address for used-ring logging
};

struct MemoryRegion {
  uint64_t guestAddress;
  uint64_t size;
  uint64_t userAddress;
  uint64_t mmapOffset;
};

struct MemoryTableHeader {
  uint32_t regionCount;
  uint32_t padding;
};

// SET_MEM_TABLE payload: a header and regionCount regions (only those are sent).
struct MemoryTable {
  MemoryTableHeader header;
  MemoryRegion regions[kMaxMemTableRegions];
};

// ADD_MEM_REG / REM_MEM_REG payload.
struct SingleMemoryRegion {
  uint64_t padding;
  MemoryRegion region;
};

struct LogDescription {
  uint64_t size;
  uint64_t offset;
};

struct ConfigHeader {
  uint32_t offset;
  uint32_t size;
  uint32_t flags;  // ConfigFlags
};
enum class ConfigFlags : uint32_t { kWritable = 0, kMigration = 1 };

struct VringArea {
  uint64_t indexAndFlags;
  uint64_t size;
  uint64_t offset;
};

// GET/SET_INFLIGHT_FD payload (QEMU's VhostUserInflight, padded to 24 bytes on the wire).
struct InflightDescription {
  uint64_t mmapSize;
  uint64_t mmapOffset;
  uint16_t queueCount;
  uint16_t queueSize;
  uint32_t padding;
};

struct IotlbMessage {
  uint64_t iova;
  uint64_t size;
  uint64_t userAddress;
  uint8_t permissions;
  uint8_t type;
  uint8_t padding[6];
};

struct SharedObject {
  uint8_t uuid[16];
};

struct DeviceStateTransfer {
  uint32_t direction;  // 0 save, 1 load
  uint32_t phase;      // 0 stopped
};

static_assert(sizeof(MessageHeader) == 12);
static_assert(sizeof(VringState) == 8);
static_assert(sizeof(VringAddress) == 40);
static_assert(sizeof(MemoryRegion) == 32);
static_assert(sizeof(MemoryTableHeader) == 8);
static_assert(sizeof(MemoryTable) == 8 + 8 * 32);
static_assert(sizeof(SingleMemoryRegion) == 40);
static_assert(sizeof(LogDescription) == 16);
static_assert(sizeof(ConfigHeader) == 12);
static_assert(sizeof(VringArea) == 24);
static_assert(sizeof(InflightDescription) == 24);
static_assert(sizeof(IotlbMessage) == 32);
static_assert(sizeof(DeviceStateTransfer) == 8);

// What a received message must look like. Payload sizes that depend on the payload itself
// (SET_MEM_TABLE, GET/SET_CONFIG) and fd counts that depend on it (the "no fd" bit of
// SET_VRING_KICK/CALL/ERR) are checked by validateFrontendRequest() beyond these bounds.
struct MessageRule {
  bool known = false;
  uint32_t minSize = 0;
  uint32_t maxSize = 0;
  uint8_t minFds = 0;
  uint8_t maxFds = 0;
  bool hasReply = false;  // the back-end answers even without NEED_REPLY
};

MessageRule frontendRequestRule(FrontendRequest request);
MessageRule backendRequestRule(BackendRequest request);

// One message as it travels on the socket: header, payload bytes and the fds that came with it.
// The fds are owned, so a message that is rejected closes them.
struct Message {
  MessageHeader header{};
  std::vector<uint8_t> payload;
  std::vector<UniqueFd> fds;

  FrontendRequest frontendRequest() const { return static_cast<FrontendRequest>(header.request); }
  BackendRequest backendRequest() const { return static_cast<BackendRequest>(header.request); }
  bool needsReply() const { return (header.flags & kNeedReplyFlag) != 0; }

  // The payload read as T. Throws clonevm::Error when the payload is shorter than T (a
  // validated message never is).
  template <typename T>
  T payloadAs() const {
    static_assert(std::is_trivially_copyable_v<T>);
    require(payload.size() >= sizeof(T), "vhost-user {} payload is {} bytes, need {}",
            requestName(frontendRequest()), payload.size(), sizeof(T));
    T value;
    std::memcpy(&value, payload.data(), sizeof(T));
    return value;
  }

  // A message with `request`, version 1 plus `flags`, and `bytes` as its payload.
  static Message make(uint32_t request, uint32_t flags, std::span<const uint8_t> bytes);
  template <typename T>
    requires(!std::is_convertible_v<const T&, std::span<const uint8_t>>)
  static Message make(uint32_t request, uint32_t flags, const T& body) {
    static_assert(std::is_trivially_copyable_v<T>);
    return make(request, flags,
                std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&body), sizeof(T)));
  }
};

// Throws clonevm::Error unless `message` is a well-formed front-end request: known code,
// version 1, no REPLY flag, no unknown flags, payload size and fd count exactly what the
// request needs.
void validateFrontendRequest(const Message& message);

// Throws clonevm::Error unless `message` is a well-formed reply to `request` (REPLY flag,
// version 1, same code, exact payload size, `expectedFds` fds).
void validateReply(const Message& message, FrontendRequest request, uint32_t expectedSize,
                   size_t expectedFds = 0);

// Throws clonevm::Error unless `message` is a well-formed back-end request.
void validateBackendRequest(const Message& message);

}  // namespace clonevm::ipc::vhost
