#pragma once
// The front-end side of vhost-user: drives a back-end (ours, qemu-storage-daemon, virtiofsd,
// ...) over a connected socket, one request at a time.
//
// Every request that has no reply of its own carries NEED_REPLY once REPLY_ACK is
// negotiated, and a non-zero ack throws clonevm::Error naming the request. Replies are
// validated like any received message (REPLY flag, same request code, exact size, fd count).
// A back-end that disconnects throws "vhost-user backend <name> disconnected during
// SET_VRING_ADDR"; sends use MSG_NOSIGNAL, so there is never a SIGPIPE. After any failure in
// the middle of an exchange the connection is unusable and every later call throws.

#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "common/unique_fd.h"
#include "ipc/vhost-user/channel.h"
#include "ipc/vhost-user/message.h"

namespace clonevm::ipc::vhost {

struct FrontendOptions {
  // How long to wait for each reply; zero waits forever (as QEMU does).
  std::chrono::milliseconds replyTimeout{0};
};

// A region of guest memory as SET_MEM_TABLE / ADD_MEM_REG describe it. `fd` is borrowed.
struct MemoryRegionSpec {
  uint64_t guestAddress = 0;
  uint64_t size = 0;
  uint64_t userAddress = 0;  // where the front-end itself maps the region
  uint64_t fdOffset = 0;     // offset of the region's first byte in fd
  int fd = -1;
};

// Ring addresses for SET_VRING_ADDR, in the front-end's user address space.
struct VringAddresses {
  uint64_t descriptor = 0;
  uint64_t available = 0;
  uint64_t used = 0;
  uint64_t log = 0;
  uint32_t flags = 0;
};

// The inflight area a back-end handed out (GET_INFLIGHT_FD); kept by the front-end across
// back-end restarts and handed back with SET_INFLIGHT_FD.
struct InflightArea {
  UniqueFd fd;
  uint64_t mmapSize = 0;
  uint64_t mmapOffset = 0;
  uint16_t queueCount = 0;
  uint16_t queueSize = 0;
};

// The front-end's end of the back-end request channel (BACKEND_REQ).
class BackendRequestChannel {
 public:
  struct Handlers {
    std::function<void()> configChanged;  // CONFIG_CHANGE_MSG
  };

  BackendRequestChannel() = default;
  BackendRequestChannel(UniqueFd socket, std::string backendName, bool replyAck);
  int fd() const { return channel_.fd(); }

  // Reads and answers one back-end request; call when fd() is readable. Returns false when
  // the back-end closed the channel. Throws clonevm::Error on a malformed request.
  bool handleOne(const Handlers& handlers);

 private:
  Channel channel_;
  bool replyAck_ = false;
};

class Frontend {
 public:
  // Connects to a back-end listening on `socketPath`.
  static Frontend connect(const std::string& socketPath, FrontendOptions options = {});
  // Adopts a connected socket; `backendName` names the back-end in errors.
  Frontend(UniqueFd socket, std::string backendName, FrontendOptions options = {});

  Frontend(Frontend&&) noexcept = default;
  Frontend& operator=(Frontend&&) noexcept = default;

  const std::string& backendName() const { return backendName_; }
  int socketFd() const { return channel_.fd(); }

  // Feature negotiation.
  uint64_t getFeatures();
  void setFeatures(uint64_t features);
  uint64_t getProtocolFeatures();
  void setProtocolFeatures(uint64_t features);
  uint64_t protocolFeatures() const { return protocolFeatures_; }
  bool hasProtocolFeature(unsigned featureBit) const { return hasBit(protocolFeatures_, featureBit); }

  void setOwner();
  void resetOwner();
  void resetDevice();  // RESET_DEVICE when negotiated, else the deprecated RESET_OWNER
  uint64_t getQueueNum();

  // Guest memory.
  void setMemTable(std::span<const MemoryRegionSpec> regions);
  uint64_t getMaxMemSlots();
  // Postcopy (PAGEFAULT), before the memory table: ADVISE returns the back-end's
  // userfaultfd, LISTEN tells it that the next memory table is to be registered with it.
  UniqueFd postcopyAdvise();
  void postcopyListen();
  // SET_MEM_TABLE after LISTEN: the back-end maps the regions and answers with its own
  // address of each region's first byte. `registered` gets them (and must be ready to
  // resolve the back-end's faults when it returns); only then is the back-end told it may
  // register its mappings with its userfaultfd.
  void setMemTablePostcopy(std::span<const MemoryRegionSpec> regions,
                           const std::function<void(std::span<const uint64_t>)>& registered);
  void addMemRegion(const MemoryRegionSpec& region);
  void removeMemRegion(const MemoryRegionSpec& region);

  // Vrings. An fd of -1 sends the "no fd" flag (polling for kick, no interrupts for call).
  void setVringNum(uint32_t queue, uint32_t size);
  void setVringAddr(uint32_t queue, const VringAddresses& addresses);
  void setVringBase(uint32_t queue, uint32_t base);
  uint32_t getVringBase(uint32_t queue);
  void setVringKick(uint32_t queue, int fd);
  void setVringCall(uint32_t queue, int fd);
  void setVringErr(uint32_t queue, int fd);
  void setVringEnable(uint32_t queue, bool enable);

  // Config space (CONFIG).
  std::vector<uint8_t> getConfig(uint32_t offset, uint32_t size,
                                 ConfigFlags flags = ConfigFlags::kWritable);
  void setConfig(uint32_t offset, std::span<const uint8_t> data,
                 ConfigFlags flags = ConfigFlags::kWritable);

  // Device status (STATUS).
  void setStatus(uint8_t status);
  uint8_t getStatus();

  // Inflight tracking (INFLIGHT_SHMFD).
  InflightArea getInflightFd(uint16_t queueCount, uint16_t queueSize);
  void setInflightFd(const InflightArea& area);

  // BACKEND_REQ: makes a socket pair, sends one end with SET_BACKEND_REQ_FD and returns the
  // other, to be polled by the caller.
  BackendRequestChannel openBackendRequestChannel();

  // Sends an arbitrary request and returns its reply or ack (tests and tools).
  Message exchange(FrontendRequest request, std::span<const uint8_t> payload,
                   std::span<const int> fds, bool expectReply);

 private:
  // A request with no reply of its own: adds NEED_REPLY under REPLY_ACK and checks the ack.
  void command(FrontendRequest request, std::span<const uint8_t> payload,
               std::span<const int> fds = {});
  template <typename T>
    requires(std::is_trivially_copyable_v<T> &&
             !std::is_convertible_v<const T&, std::span<const uint8_t>>)
  void command(FrontendRequest request, const T& body, std::span<const int> fds = {}) {
    command(request, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&body), sizeof(T)),
            fds);
  }
  // A request with a reply; the reply is validated for `replySize` bytes (or any size when
  // replySize is kAnySize) and `replyFds` fds.
  static constexpr uint32_t kAnySize = ~0u;
  Message query(FrontendRequest request, std::span<const uint8_t> payload, uint32_t replySize,
                size_t replyFds = 0);
  uint64_t queryU64(FrontendRequest request);

  void sendRequest(FrontendRequest request, uint32_t flags, std::span<const uint8_t> payload,
                   std::span<const int> fds);
  Message receiveReply(FrontendRequest request);
  [[noreturn]] void fail(FrontendRequest request, const std::exception& error);
  void vringFd(FrontendRequest request, uint32_t queue, int fd);

  Channel channel_;
  std::string backendName_;
  uint64_t protocolFeatures_ = 0;
  bool broken_ = false;
  std::string brokenReason_;
};

}  // namespace clonevm::ipc::vhost
