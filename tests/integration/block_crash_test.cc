// clone-block killed with SIGKILL: every write the guest saw acknowledged before a FLUSH was
// acknowledged is in the image afterwards. The image is qcow2 over a raw backing file, so the
// allocation metadata (L2 tables, refcounts) is what the flush must have made durable too.
// Our vhost-user front-end plays the VMM and the test plays the guest driver.

#include <sys/eventfd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "dev-block/image/block_image.h"
#include "device_control.capnp.h"
#include "ipc/capnp/rpc_socket.h"
#include "dev-block/test_block.h"
#include "ipc/vhost-user/frontend.h"
#include "tests/support/guest_session.h"
#include "tests/support/socket_daemon.h"

namespace clonevm::block {
namespace {

namespace fs = std::filesystem;
using ipc::vhost::Frontend;
using ipc::vhost::FrontendOptions;
using ipc::vhost::MemoryRegionSpec;
using ipc::vhost::testing::TestGuestMemory;
using ipc::vhost::testing::TestRing;
using testing::blkHeader;
using BlockProcess = e2e::SocketDaemon;
using testing::ChainBuffer;
using testing::publishChain;

std::vector<uint8_t> pattern(size_t length, uint8_t seed) {
  std::vector<uint8_t> bytes(length);
  for (size_t i = 0; i < length; ++i) bytes[i] = static_cast<uint8_t>(seed * 31 + i * 13 + i / 4096);
  return bytes;
}

// Reads the image through the formats library, as the next clone-block would.
std::vector<uint8_t> readImage(BlockImage& image, uint64_t offset, uint64_t length) {
  std::vector<ImageExtent> extents;
  image.mapRead(offset, length, extents);
  std::vector<uint8_t> out;
  for (const auto& e : extents) {
    size_t at = out.size();
    out.resize(at + e.length);
    if (e.kind == ImageExtent::Kind::kFile) {
      EXPECT_EQ(::pread(e.fd, out.data() + at, e.length, static_cast<off_t>(e.fileOffset)),
                static_cast<ssize_t>(e.length));
    } else if (e.kind == ImageExtent::Kind::kBuffer) {
      std::memcpy(out.data() + at, e.buffer->data() + e.bufferOffset, e.length);
    }
  }
  return out;
}

TEST(BlockCrashTest, FlushAcknowledgedWritesSurviveSigkill) {
  fs::path dir = e2e::freshScratchDir("integration-block/crash");
  fs::path base = dir / "base.raw";
  fs::path disk = dir / "disk.qcow2";
  {
    std::ofstream out(base, std::ios::binary);
    auto bytes = pattern(16 << 20, 7);
    out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  createQcow2Overlay(disk.string(), base.string(), ImageFormat::kRaw);
  std::string socket = fmt::format("/tmp/clone-block-crash-{}.sock", ::getpid());
  std::string controlSocket = fmt::format("/tmp/clone-block-crash-{}.control", ::getpid());
  BlockProcess process(e2e::buildBin("clone-block"),
                       {"--socket-path", socket, "--image", disk.string(), "--format", "qcow2",
                        "--control-socket", controlSocket},
                       dir / "clone-block.log", socket);
  ASSERT_TRUE(process.waitReady()) << process.log();

  TestGuestMemory guest(16 << 20, 0x100000);
  TestRing ring(guest, 128);
  UniqueFd kick(::eventfd(0, EFD_CLOEXEC)), call(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  Frontend frontend = Frontend::connect(socket, FrontendOptions{std::chrono::seconds(10)});
  frontend.setFeatures(frontend.getFeatures());
  frontend.setProtocolFeatures(frontend.getProtocolFeatures());
  frontend.setOwner();
  auto spec = guest.spec();
  frontend.setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
  frontend.setVringNum(0, ring.size());
  frontend.setVringBase(0, 0);
  frontend.setVringAddr(0, ring.addresses());
  frontend.setVringCall(0, call.get());
  frontend.setVringKick(0, kick.get());
  frontend.setVringEnable(0, true);

  uint16_t head = 0;
  std::vector<uint64_t> statuses;
  auto submit = [&](std::vector<ChainBuffer> chain) {
    publishChain(ring, head, chain);
    head = static_cast<uint16_t>(head + chain.size());
    statuses.push_back(chain.back().guestAddress);
    uint64_t one = 1;
    ASSERT_EQ(::write(kick.get(), &one, 8), 8);
  };
  auto readable = [&](const std::vector<uint8_t>& bytes) {
    return ChainBuffer{guest.put(bytes), static_cast<uint32_t>(bytes.size()), false};
  };
  auto statusBuffer = [&] { return ChainBuffer{guest.allocate(1), 1, true}; };
  auto waitUsed = [&](uint16_t count) {
    for (int i = 0; i < 2000 && ring.usedIndex() != count; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return ring.usedIndex() == count;
  };

  // Writes into unallocated clusters (copy on write from the backing file for the partial
  // one), then a flush; all acknowledged.
  struct Write {
    uint64_t sector;
    std::vector<uint8_t> data;
  };
  std::vector<Write> writes = {{2048, pattern(256 << 10, 1)},
                               {10001, pattern(4096, 2)},
                               {30000, pattern(512, 3)}};
  for (const auto& w : writes) {
    submit({readable(blkHeader(blk::kTypeOut, w.sector)), readable(w.data), statusBuffer()});
  }
  ASSERT_TRUE(waitUsed(3)) << process.log();
  submit({readable(blkHeader(blk::kTypeFlush, 0)), statusBuffer()});
  ASSERT_TRUE(waitUsed(4)) << process.log();
  for (uint64_t status : statuses) EXPECT_EQ(guest.get(status, 1)[0], blk::kStatusOk);

  // The control socket counts what was done (and says the device is healthy).
  {
    auto io = kj::setupAsyncIo();
    auto stream = rpc::connectUnix(io, controlSocket);
    capnp::TwoPartyClient client(*stream);
    auto control = client.bootstrap().castAs<rpc::DeviceControl>();
    auto health = control.healthRequest().send().wait(io.waitScope).getHealth();
    EXPECT_TRUE(health.getHealthy()) << health.getDetail().cStr();
    EXPECT_NE(std::string(health.getDetail()).find("front-end connected"), std::string::npos);
    std::map<std::string, uint64_t> stats;
    for (auto stat : control.statsRequest().send().wait(io.waitScope).getStats()) {
      stats[stat.getName()] = stat.getValue();
    }
    uint64_t bytes = 0;
    for (const auto& w : writes) bytes += w.data.size();
    EXPECT_EQ(stats["queue0.requests"], 4u);
    EXPECT_EQ(stats["queue0.bytes_written"], bytes);
    EXPECT_EQ(stats["queue0.flushes"], 1u);
    EXPECT_EQ(stats["errors"], 0u);
  }

  int status = process.stop(SIGKILL);
  ::unlink(controlSocket.c_str());
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;

  // Reopened: the flushed writes are there, the rest reads from the backing file.
  auto image = openImage({disk.string(), ImageFormat::kQcow2, true});
  auto original = pattern(16 << 20, 7);
  for (const auto& w : writes) {
    EXPECT_EQ(readImage(*image, w.sector * 512, w.data.size()), w.data) << "sector " << w.sector;
  }
  EXPECT_EQ(readImage(*image, 10001 * 512 - 512, 512),
            std::vector<uint8_t>(original.begin() + 10000 * 512, original.begin() + 10001 * 512))
      << "the untouched part of a copied cluster keeps the backing data";
  std::ifstream in(base, std::ios::binary);
  std::vector<uint8_t> baseNow(original.size());
  in.read(reinterpret_cast<char*>(baseNow.data()), static_cast<std::streamsize>(baseNow.size()));
  EXPECT_TRUE(baseNow == original) << "the backing file is never written";
  // qemu-img agrees the image is consistent (exit 0; 3 would be leaked clusters only).
  if (fs::exists("/usr/bin/qemu-img")) {
    int rc = std::system(fmt::format("qemu-img check -q {} > {}/check.log 2>&1", disk.string(),
                                     dir.string()).c_str());
    EXPECT_EQ(WEXITSTATUS(rc), 0) << "qemu-img check failed, see " << dir / "check.log";
  }
}

// clone-block serving our front-end on a fresh qcow2 over raw (the test plays the guest).
class Rig {
 public:
  explicit Rig(const std::string& name) {
    dir = e2e::freshScratchDir("integration-block/" + name);
    base = dir / "base.raw";
    disk = dir / "disk.qcow2";
    std::ofstream out(base, std::ios::binary);
    original = pattern(16 << 20, 7);
    out.write(reinterpret_cast<const char*>(original.data()),
              static_cast<std::streamsize>(original.size()));
    out.close();
    createQcow2Overlay(disk.string(), base.string(), ImageFormat::kRaw);
    socket = fmt::format("/tmp/clone-block-{}-{}.sock", name, ::getpid());
    process = std::make_unique<BlockProcess>(
        e2e::buildBin("clone-block"),
        std::vector<std::string>{"--socket-path", socket, "--image", disk.string(), "--format",
                                 "qcow2"},
        dir / "clone-block.log", socket);
  }

  void connect() {
    ASSERT_TRUE(process->waitReady()) << process->log();
    frontend = std::make_unique<Frontend>(
        Frontend::connect(socket, FrontendOptions{std::chrono::seconds(10)}));
    frontend->setFeatures(frontend->getFeatures());
    frontend->setProtocolFeatures(frontend->getProtocolFeatures());
    frontend->setOwner();
    auto spec = guest.spec();
    frontend->setMemTable(std::span<const MemoryRegionSpec>(&spec, 1));
    frontend->setVringNum(0, ring.size());
    frontend->setVringBase(0, 0);
    frontend->setVringAddr(0, ring.addresses());
    frontend->setVringCall(0, call.get());
    frontend->setVringKick(0, kick.get());
    frontend->setVringEnable(0, true);
  }

  // Publishes without kicking; returns the guest address of the status byte.
  uint64_t publish(uint32_t type, uint64_t sector, const std::vector<uint8_t>& data) {
    std::vector<ChainBuffer> chain = {{guest.put(blkHeader(type, sector)), 16, false}};
    if (!data.empty()) chain.push_back({guest.put(data), static_cast<uint32_t>(data.size()), false});
    uint64_t status = guest.allocate(1);
    guest.host(status)[0] = 0xff;
    chain.push_back({status, 1, true});
    publishChain(ring, head, chain);
    head = static_cast<uint16_t>((head + chain.size()) % ring.size());
    ++published;
    return status;
  }
  void kickNow() {
    uint64_t one = 1;
    ASSERT_EQ(::write(kick.get(), &one, 8), 8);
  }
  bool waitAllUsed() {
    for (int i = 0; i < 4000 && ring.usedIndex() != published; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return ring.usedIndex() == published;
  }

  fs::path dir, base, disk;
  std::vector<uint8_t> original;
  std::string socket;
  std::unique_ptr<BlockProcess> process;
  TestGuestMemory guest{32 << 20, 0x100000};
  TestRing ring{guest, 128};
  UniqueFd kick{::eventfd(0, EFD_CLOEXEC)};
  UniqueFd call{::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)};
  std::unique_ptr<Frontend> frontend;
  uint16_t head = 0;
  uint16_t published = 0;
};

// A write loop (batches of writes, each batch closed by a FLUSH) killed in the middle of a
// batch: everything before the last acknowledged FLUSH reads back, the image is consistent.
TEST(BlockCrashTest, SigkillDuringAWriteLoopKeepsEveryFlushedBatch) {
  Rig rig("crash-loop");
  rig.connect();
  constexpr int kBatches = 12, kWritesPerBatch = 8;
  auto sectorOf = [](int batch, int write) {
    // Spread over the disk, so most writes allocate a new cluster.
    return static_cast<uint64_t>((batch * kWritesPerBatch + write) * 272 % 32000);
  };
  auto dataOf = [](int batch, int write) {
    return pattern(4096, static_cast<uint8_t>(batch * kWritesPerBatch + write + 1));
  };
  int flushedBatches = 0;
  for (int batch = 0; batch <= kBatches; ++batch) {
    std::vector<uint64_t> statuses;
    for (int w = 0; w < kWritesPerBatch; ++w) {
      statuses.push_back(rig.publish(blk::kTypeOut, sectorOf(batch, w), dataOf(batch, w)));
    }
    if (batch == kBatches) {
      // The last batch is in flight, unflushed, when the process dies.
      rig.kickNow();
      break;
    }
    statuses.push_back(rig.publish(blk::kTypeFlush, 0, {}));
    rig.kickNow();
    ASSERT_TRUE(rig.waitAllUsed()) << rig.process->log();
    for (uint64_t status : statuses) ASSERT_EQ(rig.guest.get(status, 1)[0], blk::kStatusOk);
    flushedBatches = batch + 1;
  }
  int status = rig.process->stop(SIGKILL);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;
  ASSERT_EQ(flushedBatches, kBatches);

  // Later batches may overwrite earlier sectors; the newest flushed write of a sector wins.
  std::map<uint64_t, std::vector<uint8_t>> expected;
  for (int batch = 0; batch < flushedBatches; ++batch) {
    for (int w = 0; w < kWritesPerBatch; ++w) expected[sectorOf(batch, w)] = dataOf(batch, w);
  }
  std::set<uint64_t> unflushed;
  for (int w = 0; w < kWritesPerBatch; ++w) unflushed.insert(sectorOf(kBatches, w));
  auto image = openImage({rig.disk.string(), ImageFormat::kQcow2, true});
  for (const auto& [sector, data] : expected) {
    auto now = readImage(*image, sector * 512, data.size());
    if (unflushed.count(sector) != 0) {
      // Either the flushed data or the unflushed write's, never anything else.
      bool old = now == data;
      bool newer = false;
      for (int w = 0; w < kWritesPerBatch; ++w) {
        if (sectorOf(kBatches, w) == sector && now == dataOf(kBatches, w)) newer = true;
      }
      EXPECT_TRUE(old || newer) << "sector " << sector;
    } else {
      EXPECT_EQ(now, data) << "flushed write lost at sector " << sector;
    }
  }
  std::ifstream in(rig.base, std::ios::binary);
  std::vector<uint8_t> baseNow(rig.original.size());
  in.read(reinterpret_cast<char*>(baseNow.data()), static_cast<std::streamsize>(baseNow.size()));
  EXPECT_TRUE(baseNow == rig.original) << "the backing file is never written";
  if (fs::exists("/usr/bin/qemu-img")) {
    // 0: clean; 3: leaked clusters only, which a crash may leave. 2 would be corruption.
    int rc = std::system(fmt::format("qemu-img check {} > {}/check.log 2>&1", rig.disk.string(),
                                     rig.dir.string()).c_str());
    int code = WEXITSTATUS(rc);
    EXPECT_TRUE(code == 0 || code == 3) << "qemu-img check: " << code << ", see "
                                        << rig.dir / "check.log";
  }
}

}  // namespace
}  // namespace clonevm::block
