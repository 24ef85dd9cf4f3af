// vhost-user-probe: drives a third-party vhost-user back-end with our front-end, as a VMM and a
// guest driver would: negotiates, shares a memfd as guest memory, sets up a queue, submits a
// request and checks the answer.
//
//   blk: qemu-storage-daemon --blockdev driver=file,node-name=f,filename=disk.img
//          --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=/tmp/blk.sock &
//        vhost-user-probe blk --socket /tmp/blk.sock --image disk.img --sector 8 --count 4
//        (GET_ID, then a read compared with the image)
//   fs:  /usr/lib/qemu/virtiofsd --socket-path=/tmp/fs.sock -o source=/srv -o sandbox=chroot &
//        vhost-user-probe fs --socket /tmp/fs.sock
//        (FUSE_INIT, then FUSE_GETATTR of the root, on request queue 1)
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

int runBlk(const std::string& socketPath, const std::string& imagePath, uint64_t sector,
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
      uint64_t signals = 0;
      if (::read(call.get(), &signals, 8) == 8) interrupts += signals;
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

// --- virtio-fs: FUSE over the request queue (FUSE 7.31 layouts, Linux uapi fuse.h).
struct FuseInHeader {
  uint32_t length;
  uint32_t opcode;
  uint64_t unique;
  uint64_t nodeId;
  uint32_t uid, gid, pid;
  uint16_t totalExtLength;
  uint16_t padding;
};
struct FuseOutHeader {
  uint32_t length;
  int32_t error;
  uint64_t unique;
};
struct FuseInitIn {
  uint32_t major, minor, maxReadahead, flags;
};
struct FuseGetattrIn {
  uint32_t getattrFlags, dummy;
  uint64_t fh;
};
constexpr uint32_t kFuseInit = 26;
constexpr uint32_t kFuseGetattr = 3;

// Negotiates like a VMM and sets up `queue` of a device with `queues` queues.
struct Session {
  Frontend frontend;
  testing::TestGuestMemory guest{4 << 20, 0};
  testing::TestRing ring;
  clonevm::UniqueFd kick{::eventfd(0, EFD_CLOEXEC)};
  clonevm::UniqueFd call{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};

  Session(const std::string& socketPath, uint32_t queue)
      : frontend(Frontend::connect(socketPath, FrontendOptions{std::chrono::seconds(5)})),
        ring(guest, 64) {
    uint64_t features = frontend.getFeatures();
    fmt::print("features offered:          {:#018x}\n", features);
    uint64_t protocols = 0;
    if (hasBit(features, feature::kProtocolFeatures)) {
      uint64_t offered = frontend.getProtocolFeatures();
      fmt::print("protocol features offered: {:#x}\n", offered);
      protocols = offered & (bit(protocol::kMq) | bit(protocol::kReplyAck));
      frontend.setProtocolFeatures(protocols);
    }
    frontend.setOwner();
    if (hasBit(protocols, protocol::kMq)) {
      fmt::print("queues:                    {}\n", frontend.getQueueNum());
    }
    uint64_t acked = features & (bit(feature::kVersion1) | bit(feature::kProtocolFeatures) |
                                 bit(feature::kRingIndirectDesc) | bit(feature::kRingEventIdx));
    frontend.setFeatures(acked);
    fmt::print("features acked:            {:#018x}\n", acked);
    auto spec = guest.spec();
    frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
    frontend.setVringNum(queue, ring.size());
    frontend.setVringBase(queue, 0);
    frontend.setVringAddr(queue, ring.addresses());
    frontend.setVringCall(queue, call.get());
    frontend.setVringKick(queue, kick.get());
    if (hasBit(acked, feature::kProtocolFeatures)) frontend.setVringEnable(queue, true);
  }

  // Publishes `head`, kicks, and waits until the used index reaches `used`.
  void submit(uint16_t head, uint16_t used) {
    ring.publish(head);
    uint64_t one = 1;
    clonevm::require(::write(kick.get(), &one, 8) == 8, "kick");
    for (int i = 0; i < 50 && ring.usedIndex() < used; ++i) {
      if (waitReadable(call.get(), 100)) {
        uint64_t count;
        ssize_t n = ::read(call.get(), &count, 8);
        (void)n;
      }
    }
    clonevm::require(ring.usedIndex() >= used, "the back-end did not complete the request");
    auto [id, length] = ring.usedElement(static_cast<uint16_t>(used - 1));
    fmt::print("used[{}]:                   head {} length {}\n", used - 1, id, length);
  }
};

int runFs(const std::string& socketPath) {
  Session session(socketPath, 1);  // queue 0 is hiprio, 1 the first request queue
  auto& guest = session.guest;
  auto& ring = session.ring;

  // FUSE_INIT.
  uint64_t in = guest.allocate(sizeof(FuseInHeader) + sizeof(FuseInitIn));
  FuseInHeader header{sizeof(FuseInHeader) + sizeof(FuseInitIn), kFuseInit, 1, 0, 0, 0, 0, 0, 0};
  FuseInitIn init{7, 31, 0, 0};
  std::memcpy(guest.host(in), &header, sizeof(header));
  std::memcpy(guest.host(in) + sizeof(header), &init, sizeof(init));
  uint64_t out = guest.allocate(256);
  ring.setDescriptor(0, in, sizeof(header) + sizeof(init), kDescFlagNext, 1);
  ring.setDescriptor(1, out, 256, kDescFlagWrite);
  session.submit(0, 1);
  FuseOutHeader reply;
  std::memcpy(&reply, guest.host(out), sizeof(reply));
  uint32_t major, minor;
  std::memcpy(&major, guest.host(out) + sizeof(reply), 4);
  std::memcpy(&minor, guest.host(out) + sizeof(reply) + 4, 4);
  fmt::print("FUSE_INIT: error {} unique {} protocol {}.{}\n", reply.error, reply.unique, major, minor);
  clonevm::require(reply.error == 0 && reply.unique == 1 && major == 7, "FUSE_INIT failed");

  // FUSE_GETATTR of the root (node 1).
  uint64_t in2 = guest.allocate(sizeof(FuseInHeader) + sizeof(FuseGetattrIn));
  FuseInHeader header2{sizeof(FuseInHeader) + sizeof(FuseGetattrIn), kFuseGetattr, 2, 1, 0, 0, 0, 0, 0};
  FuseGetattrIn getattr{0, 0, 0};
  std::memcpy(guest.host(in2), &header2, sizeof(header2));
  std::memcpy(guest.host(in2) + sizeof(header2), &getattr, sizeof(getattr));
  uint64_t out2 = guest.allocate(256);
  ring.setDescriptor(2, in2, sizeof(header2) + sizeof(getattr), kDescFlagNext, 3);
  ring.setDescriptor(3, out2, 256, kDescFlagWrite);
  session.submit(2, 2);
  std::memcpy(&reply, guest.host(out2), sizeof(reply));
  // fuse_attr_out: attr_valid u64, attr_valid_nsec u32, dummy u32, then fuse_attr (ino u64, ...,
  // mode u32 at offset 60 of fuse_attr).
  uint64_t ino;
  uint32_t mode;
  std::memcpy(&ino, guest.host(out2) + sizeof(reply) + 16, 8);
  std::memcpy(&mode, guest.host(out2) + sizeof(reply) + 16 + 60, 4);
  fmt::print("FUSE_GETATTR /: error {} ino {} mode {:o}\n", reply.error, ino, mode);
  clonevm::require(reply.error == 0 && (mode & 0170000) == 0040000, "GETATTR of the root failed");
  fmt::print("vring base at stop:        {}\n", session.frontend.getVringBase(1));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Drive a vhost-user back-end with Clone's vhost-user front-end"};
  app.require_subcommand(1);
  std::string socketPath;
  std::string imagePath;
  uint64_t sector = 0;
  uint32_t count = 1;
  auto* blk = app.add_subcommand("blk", "a vhost-user-blk back-end: GET_ID and a read");
  blk->add_option("--socket", socketPath, "the back-end's unix socket")->required();
  blk->add_option("--image", imagePath, "image file to compare the data with");
  blk->add_option("--sector", sector, "first sector to read");
  blk->add_option("--count", count, "sectors to read (1-64)")->check(CLI::Range(1, 64));
  auto* fs = app.add_subcommand("fs", "a vhost-user-fs back-end: FUSE_INIT and GETATTR /");
  fs->add_option("--socket", socketPath, "the back-end's unix socket")->required();
  CLI11_PARSE(app, argc, argv);
  try {
    if (blk->parsed()) return runBlk(socketPath, imagePath, sector, count);
    return runFs(socketPath);
  } catch (const std::exception& e) {
    std::cerr << "vhost-user-probe: " << e.what() << "\n";
    return 1;
  }
}
