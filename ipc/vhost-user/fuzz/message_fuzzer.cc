// libFuzzer target: untrusted bytes into the back-end's message handling and, through a guest
// memory the input also writes, into the descriptor-chain walker.
//
// Input format: the first byte picks a mode.
//   even: "stream" - the rest is a byte stream on the vhost-user socket. Channel::receive()
//         frames it, BackendSession::handle() handles each message, until an error or EOF.
//   odd:  "script" - a session is set up first (features, a memfd memory table, queue 0 with
//         an 8-entry ring at the start of guest memory, started and enabled). Then records:
//           0 message: u8 request, u8 flags, u8 length, payload, u8 fd spec
//                      (fd spec: bits 0-1 count, bits 2-3 kind: eventfd, memfd, guest memfd, pipe)
//           1 kick:    u8 queue
//           2 poke:    u16 offset, u8 length, bytes -> written into guest memory
//           3 complete-less kick of every queue
//
// Any clonevm::Error is the expected outcome for bad input; crashes, hangs, sanitizer reports
// and leaks are the bugs.

#include <fcntl.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <spdlog/sinks/null_sink.h>
#include <spdlog/spdlog.h>

#include "ipc/vhost-user/backend.h"
#include "ipc/vhost-user/channel.h"
#include "ipc/vhost-user/test_device.h"
#include "ipc/vhost-user/test_guest.h"

namespace clonevm::ipc::vhost {
namespace {

constexpr uint64_t kGuestBase = 0x10000;
constexpr uint64_t kGuestSize = 64 * 1024;
constexpr uint16_t kRingSize = 8;

spdlog::logger& fuzzLogger() {
  static auto logger =
      std::make_shared<spdlog::logger>("fuzz", std::make_shared<spdlog::sinks::null_sink_mt>());
  return *logger;
}

class Reader {
 public:
  Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  bool empty() const { return offset_ >= size_; }
  uint8_t u8() { return offset_ < size_ ? data_[offset_++] : 0; }
  uint16_t u16() { return static_cast<uint16_t>(u8() | (u8() << 8)); }
  std::vector<uint8_t> bytes(size_t n) {
    n = std::min(n, size_ - std::min(offset_, size_));
    std::vector<uint8_t> out(data_ + offset_, data_ + offset_ + n);
    offset_ += n;
    return out;
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t offset_ = 0;
};

void handleQuietly(BackendSession& session, Message message) {
  try {
    session.handle(std::move(message));
  } catch (const Error&) {
    // A dropped connection: what bad input should get.
  }
}

template <typename T>
Message request(FrontendRequest code, const T& body) {
  return Message::make(static_cast<uint32_t>(code), 0, body);
}

void runStream(const uint8_t* data, size_t size) {
  testing::XorDevice device(2);
  BackendSession session(device, fuzzLogger());
  auto [writer, reader] = makeSocketPair();
  // Unix stream sockets buffer far more than a fuzz input; the write never blocks.
  size_t written = 0;
  while (written < size) {
    ssize_t n = ::send(writer.get(), data + written, size - written, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n <= 0) break;
    written += static_cast<size_t>(n);
  }
  writer.reset();
  Channel channel(std::move(reader), "fuzz");
  for (;;) {
    try {
      Message message = channel.receive();
      session.handle(std::move(message));
    } catch (const Error&) {
      break;
    }
  }
  session.close();
}

UniqueFd makeFd(int kind, const testing::TestGuestMemory& guest) {
  switch (kind) {
    case 0: return UniqueFd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    case 1: {
      UniqueFd fd(::memfd_create("fuzz", MFD_CLOEXEC));
      if (::ftruncate(fd.get(), kGuestSize) != 0) return UniqueFd();
      return fd;
    }
    case 2: return UniqueFd(::dup(guest.fd()));
    default: {
      int fds[2];
      if (::pipe2(fds, O_CLOEXEC | O_NONBLOCK) != 0) return UniqueFd();
      ::close(fds[1]);
      return UniqueFd(fds[0]);
    }
  }
}

void runScript(const uint8_t* data, size_t size) {
  testing::XorDevice device(2);
  testing::TestGuestMemory guest(kGuestSize, kGuestBase);
  BackendSession session(device, fuzzLogger());

  // A ready session, so the input's budget goes to rings and messages.
  handleQuietly(session, request(FrontendRequest::kSetFeatures, session.offeredFeatures()));
  handleQuietly(session, request(FrontendRequest::kSetProtocolFeatures,
                                 session.offeredProtocolFeatures()));
  {
    MemoryTable table{};
    table.header.regionCount = 1;
    table.regions[0] = guest.region();
    Message m = Message::make(static_cast<uint32_t>(FrontendRequest::kSetMemTable), 0,
                              std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&table),
                                                       sizeof(MemoryTableHeader) + sizeof(MemoryRegion)));
    m.fds.emplace_back(::dup(guest.fd()));
    handleQuietly(session, std::move(m));
  }
  // Ring parts at fixed places in the first 512 bytes, where pokes can reach them easily.
  uint64_t desc = kGuestBase, avail = kGuestBase + 0x100, used = kGuestBase + 0x200;
  handleQuietly(session, request(FrontendRequest::kSetVringNum, VringState{0, kRingSize}));
  handleQuietly(session, request(FrontendRequest::kSetVringAddr,
                                 VringAddress{0, 0, guest.userOf(desc), guest.userOf(used),
                                              guest.userOf(avail), 0}));
  {
    Message m = request(FrontendRequest::kSetVringKick, uint64_t{0});
    m.fds.emplace_back(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    handleQuietly(session, std::move(m));
  }
  {
    Message m = request(FrontendRequest::kSetVringCall, uint64_t{0});
    m.fds.emplace_back(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    handleQuietly(session, std::move(m));
  }
  handleQuietly(session, request(FrontendRequest::kSetVringEnable, VringState{0, 1}));

  Reader in(data, size);
  int budget = 256;  // records per input: keeps every run short
  while (!in.empty() && budget-- > 0) {
    switch (in.u8() % 4) {
      case 0: {
        uint32_t code = in.u8() % (kFrontendRequestCount + 2);
        uint32_t flags = in.u8();
        std::vector<uint8_t> payload = in.bytes(in.u8());
        uint8_t fdSpec = in.u8();
        Message m;
        m.header = {code, flags, static_cast<uint32_t>(payload.size())};
        m.payload = std::move(payload);
        for (int i = 0; i < (fdSpec & 3); ++i) m.fds.push_back(makeFd((fdSpec >> 2) & 3, guest));
        handleQuietly(session, std::move(m));
        break;
      }
      case 1:
        session.onKick(in.u8() % 2, /*consumeEventfd=*/false);
        break;
      case 2: {
        uint16_t offset = in.u16() % kGuestSize;
        std::vector<uint8_t> bytes = in.bytes(in.u8());
        size_t n = std::min<size_t>(bytes.size(), kGuestSize - offset);
        if (n > 0) std::memcpy(guest.host(kGuestBase + offset), bytes.data(), n);
        break;
      }
      default:
        session.onKick(0, false);
        session.onKick(1, false);
        break;
    }
  }
  session.close();
}

}  // namespace
}  // namespace clonevm::ipc::vhost

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0 || size > 64 * 1024) return 0;
  if ((data[0] & 1) == 0) {
    clonevm::ipc::vhost::runStream(data + 1, size - 1);
  } else {
    clonevm::ipc::vhost::runScript(data + 1, size - 1);
  }
  return 0;
}
