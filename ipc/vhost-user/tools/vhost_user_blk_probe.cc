// vhost-user-blk-probe: drives a vhost-user-blk back-end (qemu-storage-daemon, ours) with our
// front-end, as a guest would: negotiates, shares a memfd as guest memory, sets up queue 0,
// reads sectors with a virtio-blk request and compares them with the image file.
//
//   qemu-storage-daemon --blockdev driver=file,node-name=f,filename=disk.img \
//     --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/blk.sock &
//   vhost-user-blk-probe --socket /tmp/blk.sock --image disk.img --sector 8 --count 4
//
// An interoperability check, not a test in CI (yet): exit status 0 when every step worked.

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstring>
#include <iostream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "ipc/vhost-user/frontend.h"
#include "ipc/vhost-user/test_guest.h"

namespace {

using namespace clonevm::ipc::vhost;

// VIRTIO 1.2 5.2.6: the request header and types.
struct VirtioBlkOutHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};
constexpr uint32_t kVirtioBlkTypeIn = 0;
constexpr uint32_t kVirtioBlkTypeGetId = 8;
constexpr unsigned kVirtioBlkFeatureFlush = 9;

bool waitReadable(int fd, int timeoutMs) {
  pollfd pfd{fd, POLLIN, 0};
  return ::poll(&pfd, 1, timeoutMs) == 1;
}

int run(const std::string& socketPath, const std::string& imagePath, uint64_t sector,
        uint32_t count) {
  Frontend frontend = Frontend::connect(socketPath, FrontendOptions{std::chrono::seconds(5)});
  uint64_t features = frontend.getFeatures();
  fmt::print("features offered:          {:#018x}\n", features);
  clonevm::require(hasBit(features, feature::kVersion1), "the back-end does not offer VERSION_1");

  uint64_t wantedProtocols = bit(protocol::kMq) | bit(protocol::kReplyAck) |
                             bit(protocol::kConfig) | bit(protocol::kConfigureMemSlots) |
                             bit(protocol::kInflightShmfd) | bit(protocol::kStatus) |
                             bit(protocol::kResetDevice);
  uint64_t protocols = 0;
  if (hasBit(features, feature::kProtocolFeatures)) {
    uint64_t offered = frontend.getProtocolFeatures();
    fmt::print("protocol features offered: {:#x}\n", offered);
    protocols = offered & wantedProtocols;
    frontend.setProtocolFeatures(protocols);
    fmt::print("protocol features acked:   {:#x}\n", protocols);
  }
  frontend.setOwner();
  if (hasBit(protocols, protocol::kMq)) fmt::print("queues:                    {}\n", frontend.getQueueNum());
  uint64_t capacity = 0;
  if (hasBit(protocols, protocol::kConfig)) {
    auto config = frontend.getConfig(0, 8);  // virtio_blk_config.capacity, 512-byte sectors
    std::memcpy(&capacity, config.data(), 8);
    fmt::print("capacity:                  {} sectors\n", capacity);
  }
  if (hasBit(protocols, protocol::kConfigureMemSlots)) {
    fmt::print("max memory slots:          {}\n", frontend.getMaxMemSlots());
  }

  uint64_t acked = features & (bit(feature::kVersion1) | bit(feature::kProtocolFeatures) |
                               bit(feature::kRingIndirectDesc) | bit(feature::kRingEventIdx) |
                               bit(kVirtioBlkFeatureFlush));
  frontend.setFeatures(acked);
  fmt::print("features acked:            {:#018x}\n", acked);

  // Guest memory: a 4 MiB memfd, guest physical 0, mapped here as the front-end's view.
  testing::TestGuestMemory guest(4 << 20, 0);
  auto spec = guest.spec();
  frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));

  constexpr uint16_t kQueueSize = 16;
  testing::TestRing ring(guest, kQueueSize);
  clonevm::UniqueFd kick(::eventfd(0, EFD_CLOEXEC));
  clonevm::UniqueFd call(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (hasBit(protocols, protocol::kInflightShmfd)) {
    InflightArea area = frontend.getInflightFd(1, kQueueSize);
    fmt::print("inflight area:             {} bytes\n", area.mmapSize);
    if (area.fd.valid()) frontend.setInflightFd(area);
  }
  frontend.setVringNum(0, kQueueSize);
  frontend.setVringBase(0, 0);
  frontend.setVringAddr(0, ring.addresses());
  frontend.setVringCall(0, call.get());
  frontend.setVringKick(0, kick.get());
  if (hasBit(acked, feature::kProtocolFeatures)) frontend.setVringEnable(0, true);
  if (hasBit(protocols, protocol::kStatus)) frontend.setStatus(0x0f);  // ACK|DRIVER|FEATURES_OK|DRIVER_OK

  // Request 1: GET_ID (a string, up to 20 bytes). Request 2: read `count` sectors.
  uint64_t idHeader = guest.allocate(sizeof(VirtioBlkOutHeader));
  VirtioBlkOutHeader getId{kVirtioBlkTypeGetId, 0, 0};
  std::memcpy(guest.host(idHeader), &getId, sizeof(getId));
  uint64_t idBuffer = guest.allocate(20);
  uint64_t idStatus = guest.allocate(1);
  *guest.host(idStatus) = 0xff;
  ring.setDescriptor(0, idHeader, sizeof(VirtioBlkOutHeader), kDescFlagNext, 1);
  ring.setDescriptor(1, idBuffer, 20, kDescFlagWrite | kDescFlagNext, 2);
  ring.setDescriptor(2, idStatus, 1, kDescFlagWrite);

  uint64_t readHeader = guest.allocate(sizeof(VirtioBlkOutHeader));
  VirtioBlkOutHeader in{kVirtioBlkTypeIn, 0, sector};
  std::memcpy(guest.host(readHeader), &in, sizeof(in));
  uint64_t data = guest.allocate(512ull * count, 512);
  std::memset(guest.host(data), 0xee, 512ull * count);
  uint64_t readStatus = guest.allocate(1);
  *guest.host(readStatus) = 0xff;
  ring.setDescriptor(3, readHeader, sizeof(VirtioBlkOutHeader), kDescFlagNext, 4);
  ring.setDescriptor(4, data, 512 * count, kDescFlagWrite | kDescFlagNext, 5);
  ring.setDescriptor(5, readStatus, 1, kDescFlagWrite);

  ring.publish(0);
  ring.publish(3);
  uint64_t one = 1;
  clonevm::require(::write(kick.get(), &one, 8) == 8, "kick");
  // Interrupts may come early (libvhost-user signals the call fd when it is set), so count
  // them and look at the used ring until both requests are done or 5 s have passed.
  uint64_t interrupts = 0;
  for (int i = 0; i < 50 && ring.usedIndex() < 2; ++i) {
    if (waitReadable(call.get(), 100)) {
      uint64_t count = 0;
      if (::read(call.get(), &count, 8) == 8) interrupts += count;
    }
  }
  fmt::print("used index:                {}\n", ring.usedIndex());
  clonevm::require(ring.usedIndex() == 2, "the back-end completed {} of 2 requests", ring.usedIndex());
  for (uint16_t i = 0; i < 2; ++i) {
    auto [id, length] = ring.usedElement(i);
    fmt::print("used[{}]:                   head {} length {}\n", i, id, length);
  }
  fmt::print("interrupts:                {}\n", interrupts);

  std::string id(reinterpret_cast<char*>(guest.host(idBuffer)), 20);
  id = id.substr(0, id.find('\0'));
  fmt::print("GET_ID status {} id '{}'\n", *guest.host(idStatus), id);
  fmt::print("read status {}\n", *guest.host(readStatus));
  clonevm::require(*guest.host(readStatus) == 0, "the read failed with status {}",
                   *guest.host(readStatus));

  if (!imagePath.empty()) {
    clonevm::UniqueFd image(::open(imagePath.c_str(), O_RDONLY | O_CLOEXEC));
    clonevm::require(image.valid(), "cannot open {}", imagePath);
    std::vector<uint8_t> expected(512ull * count);
    ssize_t n = ::pread(image.get(), expected.data(), expected.size(), static_cast<off_t>(sector * 512));
    clonevm::require(n == static_cast<ssize_t>(expected.size()), "short read of {}", imagePath);
    bool same = std::memcmp(expected.data(), guest.host(data), expected.size()) == 0;
    fmt::print("data matches the image:    {}\n", same ? "yes" : "NO");
    clonevm::require(same, "the data read through vhost-user differs from the image");
  }
  fmt::print("vring base at stop:        {}\n", frontend.getVringBase(0));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Drive a vhost-user-blk back-end with Clone's vhost-user front-end"};
  std::string socketPath;
  std::string imagePath;
  uint64_t sector = 0;
  uint32_t count = 1;
  app.add_option("--socket", socketPath, "the back-end's unix socket")->required();
  app.add_option("--image", imagePath, "image file to compare the data with");
  app.add_option("--sector", sector, "first sector to read");
  app.add_option("--count", count, "sectors to read (1-64)")->check(CLI::Range(1, 64));
  CLI11_PARSE(app, argc, argv);
  try {
    return run(socketPath, imagePath, sector, count);
  } catch (const std::exception& e) {
    std::cerr << "vhost-user-blk-probe: " << e.what() << "\n";
    return 1;
  }
}
