// vhost-user-blk-ramdisk: a minimal vhost-user-blk back-end over an image file, built on our
// back-end library. It exists to check the library under third-party front-ends (QEMU's
// vhost-user-blk-pci, our own probe); the real block device is dev-block.
//
//   vhost-user-blk-ramdisk --socket-path /tmp/blk.sock --image disk.img
//   qemu-system-x86_64 -machine q35,memory-backend=mem
//     -object memory-backend-memfd,id=mem,size=512M,share=on
//     -chardev socket,id=c,path=/tmp/blk.sock -device vhost-user-blk-pci,chardev=c ...
//
// Requests: IN, OUT, FLUSH and GET_ID, served synchronously with pread/pwrite.

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <iostream>

#include <CLI/CLI.hpp>

#include "common/log.h"
#include "ipc/vhost-user/backend.h"

namespace {

using namespace clonevm;
using namespace clonevm::ipc::vhost;

constexpr unsigned kBlkFeatureSegMax = 2;
constexpr unsigned kBlkFeatureBlkSize = 6;
constexpr unsigned kBlkFeatureFlush = 9;
constexpr unsigned kBlkFeatureMq = 12;
constexpr uint32_t kTypeIn = 0, kTypeOut = 1, kTypeFlush = 4, kTypeGetId = 8;
constexpr uint8_t kStatusOk = 0, kStatusIoErr = 1, kStatusUnsupported = 2;

struct OutHeader {
  uint32_t type;
  uint32_t reserved;
  uint64_t sector;
};

class RamdiskDevice : public VhostUserDevice {
 public:
  RamdiskDevice(UniqueFd image, uint64_t bytes, uint16_t queues, spdlog::logger& log)
      : image_(std::move(image)), bytes_(bytes), queues_(queues), log_(log) {
    std::memset(config_, 0, sizeof(config_));
    uint64_t capacity = bytes / 512;
    uint32_t segMax = 126, blkSize = 512;
    std::memcpy(config_ + 0, &capacity, 8);
    std::memcpy(config_ + 12, &segMax, 4);
    std::memcpy(config_ + 20, &blkSize, 4);
    std::memcpy(config_ + 34, &queues_, 2);
  }

  uint64_t features() const override {
    return kLibraryTransportFeatures | bit(kBlkFeatureSegMax) | bit(kBlkFeatureBlkSize) |
           bit(kBlkFeatureFlush) | bit(kBlkFeatureMq);
  }
  uint16_t queueCount() const override { return queues_; }
  uint32_t maxQueueSize() const override { return 1024; }
  size_t configSize() const override { return sizeof(config_); }
  void readConfig(uint32_t offset, std::span<uint8_t> out) const override {
    std::memcpy(out.data(), config_ + offset, out.size());
  }
  void onFeaturesAcked(uint64_t features) override {
    log_.info("features acked {:#x}", features);
  }
  void onQueueStarted(Virtqueue& queue) override {
    log_.info("queue {} started (size {})", queue.index(), queue.size());
  }

  void processQueue(Virtqueue& queue) override {
    while (auto request = queue.pop()) {
      OutHeader header{};
      uint8_t status = kStatusOk;
      uint32_t written = 0;
      if (request->read(0, std::span<uint8_t>(reinterpret_cast<uint8_t*>(&header), sizeof(header))) !=
              sizeof(header) ||
          request->writableBytes() < 1) {
        queue.markBroken("virtio-blk request without header or status byte");
        return;
      }
      uint64_t dataBytes = request->writableBytes() - 1;  // the last writable byte is status
      switch (header.type) {
        case kTypeIn: status = transfer(*request, header.sector, dataBytes, true, written); break;
        case kTypeOut:
          status = transfer(*request, header.sector, request->readableBytes() - sizeof(header),
                            false, written);
          break;
        case kTypeFlush: status = ::fdatasync(image_.get()) == 0 ? kStatusOk : kStatusIoErr; break;
        case kTypeGetId: {
          const char id[20] = "clone-ramdisk";
          written = static_cast<uint32_t>(request->write(0, std::span<const uint8_t>(
              reinterpret_cast<const uint8_t*>(id), std::min<uint64_t>(sizeof(id), dataBytes))));
          break;
        }
        default: status = kStatusUnsupported; break;
      }
      request->write(request->writableBytes() - 1, std::span<const uint8_t>(&status, 1));
      queue.complete(*request, written + 1);
    }
  }

 private:
  uint8_t transfer(const VirtqueueRequest& request, uint64_t sector, uint64_t length, bool read,
                   uint32_t& written) {
    if (sector > bytes_ / 512 || length > bytes_ - sector * 512) return kStatusIoErr;
    std::vector<uint8_t> buffer(length);
    off_t offset = static_cast<off_t>(sector * 512);
    if (read) {
      if (::pread(image_.get(), buffer.data(), length, offset) != static_cast<ssize_t>(length)) {
        return kStatusIoErr;
      }
      written = static_cast<uint32_t>(request.write(0, buffer));
    } else {
      request.read(sizeof(OutHeader), buffer);
      if (::pwrite(image_.get(), buffer.data(), length, offset) != static_cast<ssize_t>(length)) {
        return kStatusIoErr;
      }
    }
    return kStatusOk;
  }

  UniqueFd image_;
  uint64_t bytes_;
  uint16_t queues_;
  spdlog::logger& log_;
  uint8_t config_[60];
};

VhostUserBackend* gBackend = nullptr;  // for the SIGTERM handler only
void onSignal(int) {
  if (gBackend != nullptr) gBackend->stop();
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"A vhost-user-blk back-end over an image file (interop checks)"};
  std::string socketPath;
  int fd = -1;
  std::string imagePath;
  uint16_t queues = 4;
  bool printCapabilities = false;
  app.add_option("--socket-path", socketPath, "listen on this unix socket");
  app.add_option("--fd", fd, "serve this inherited socket (listening or connected)");
  app.add_option("--image", imagePath, "the disk image");
  app.add_option("--queues", queues, "number of queues")->check(CLI::Range(1, 64));
  app.add_flag("--print-capabilities", printCapabilities, "print the capabilities JSON and exit");
  CLI11_PARSE(app, argc, argv);
  if (printCapabilities) {
    std::cout << capabilitiesJson("block", {"blk-file"});
    return 0;
  }
  auto log = makeLogger("ramdisk", LogOptions{});
  try {
    require((socketPath.empty()) != (fd < 0), "give exactly one of --socket-path and --fd");
    require(!imagePath.empty(), "--image is required");
    UniqueFd image(CLONE_SYSCALL(::open(imagePath.c_str(), O_RDWR | O_CLOEXEC), "open image", imagePath));
    struct stat st {};
    CLONE_SYSCALL(::fstat(image.get(), &st), "stat image", imagePath);
    RamdiskDevice device(std::move(image), static_cast<uint64_t>(st.st_size), queues, *log);
    VhostUserBackend backend(device, *log);
    gBackend = &backend;
    ::signal(SIGTERM, onSignal);
    ::signal(SIGINT, onSignal);
    backend.serveFd(fd >= 0 ? UniqueFd(fd) : listenUnixSocket(socketPath));
    return 0;
  } catch (const std::exception& e) {
    log->error("{}", e.what());
    return 1;
  }
}
