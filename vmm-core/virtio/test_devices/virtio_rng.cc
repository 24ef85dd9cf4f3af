#include "vmm-core/virtio/test_devices/virtio_rng.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "common/error.h"
#include "vmm-core/virtio/split_queue.h"
#include "vmm-core/virtio/virtio.h"

namespace clonevm::vmm {
namespace {

// Bounds what one request can make us generate (Linux asks for at most a page or so).
constexpr size_t kMaxRequestBytes = 64 * 1024;

void systemEntropy(std::span<uint8_t> bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::getrandom(bytes.data(), bytes.size(), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throwSystemError(errno, "getrandom for virtio-rng");
    bytes = bytes.subspan(static_cast<size_t>(n));
  }
}

uint64_t drain(int fd) {
  uint64_t count = 0;
  return ::read(fd, &count, sizeof(count)) == sizeof(count) ? count : 0;
}

void signal(int fd) {
  uint64_t one = 1;
  while (::write(fd, &one, sizeof(one)) < 0 && errno == EINTR) {
  }
}

}  // namespace

VirtioRng::VirtioRng(spdlog::logger& log, Entropy entropy)
    : log_(log), entropy_(entropy ? std::move(entropy) : Entropy(systemEntropy)) {}

VirtioRng::~VirtioRng() { stopWorker(); }

uint32_t VirtioRng::deviceType() const { return virtio::kTypeRng; }

void VirtioRng::activate(const VirtioActivationInfo& info) {
  stopWorker();
  require(info.queues.size() == 1 && info.queues[0].index == 0,
          "virtio-rng: the driver must enable exactly queue 0");
  stop_ = UniqueFd(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd for virtio-rng"));
  broken_ = false;
  worker_ = std::thread([this, memory = info.memory, queue = info.queues[0]] {
    run(*memory, queue);
  });
}

void VirtioRng::reset() { stopWorker(); }

void VirtioRng::stopWorker() {
  if (!worker_.joinable()) return;
  signal(stop_.get());
  worker_.join();
  stop_.reset();
}

void VirtioRng::run(const GuestMemory& memory, VirtioQueueInfo queueInfo) {
  SplitQueue queue(memory, queueInfo);
  std::vector<uint8_t> buffer;
  for (;;) {
    if (!broken_) {
      try {
        bool pushed = false;
        while (auto chain = queue.pop()) {
          size_t room = 0;
          for (const auto& d : chain->descriptors) room += d.writable ? d.length : 0;
          buffer.resize(std::min(room, kMaxRequestBytes));
          entropy_(buffer);
          size_t written = queue.writeToChain(*chain, buffer);
          queue.push(chain->head, static_cast<uint32_t>(written));
          served_ += written;
          pushed = true;
        }
        if (pushed && queue.wantsInterrupt()) signal(queueInfo.callFd);
      } catch (const std::exception& e) {
        // A real device would set DEVICE_NEEDS_RESET; this test aid stops serving and
        // only consumes kicks until reset.
        log_.error("virtio-rng: queue stopped: {}", e.what());
        broken_ = true;
      }
    }
    pollfd fds[2] = {{queueInfo.kickFd, POLLIN, 0}, {stop_.get(), POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0 && errno != EINTR) {
      log_.error("virtio-rng: poll: {}", std::strerror(errno));
      return;
    }
    if (fds[1].revents & POLLIN) return;
    if (fds[0].revents & POLLIN) drain(queueInfo.kickFd);
  }
}

}  // namespace clonevm::vmm
