#pragma once
// virtio-rng (virtio 1.2 section 5.4) served inside the core: a TEST AID for booting a
// guest against the virtio-pci transport without a device process. Not wired into the
// machine; production devices run out of process behind vhost-user.
//
// One queue; for every chain the driver posts, the device fills the device-writable
// buffers with entropy and returns it. A worker thread waits on the kick eventfd (which
// KVM signals from the doorbell) and writes the call eventfd (which KVM turns into the
// queue's MSI), so neither direction goes through a vCPU exit.

#include <atomic>
#include <cstdint>
#include <functional>
#include <span>
#include <thread>

#include <spdlog/logger.h>

#include "common/unique_fd.h"
#include "vmm-core/virtio/virtio_backend.h"

namespace clonevm::vmm {

class VirtioRng final : public VirtioDeviceBackend {
 public:
  // Fills a buffer with entropy (tests pass a deterministic one); default getrandom(2).
  using Entropy = std::function<void(std::span<uint8_t>)>;

  explicit VirtioRng(spdlog::logger& log, Entropy entropy = {});
  ~VirtioRng() override;

  uint32_t deviceType() const override;
  uint16_t numQueues() const override { return 1; }
  uint16_t maxQueueSize() const override { return 256; }
  uint64_t deviceFeatures() const override { return 0; }  // VERSION_1 comes from the transport
  uint32_t configSize() const override { return 0; }
  void readConfig(uint32_t, std::span<uint8_t>) override {}
  void writeConfig(uint32_t, std::span<const uint8_t>) override {}
  void activate(const VirtioActivationInfo& info) override;
  void reset() override;

  // Bytes of entropy handed to the guest so far.
  uint64_t bytesServed() const { return served_.load(); }
  // Whether the worker stopped because the driver broke the queue (until reset).
  bool broken() const { return broken_.load(); }

 private:
  void run(const GuestMemory& memory, VirtioQueueInfo queue);
  void stopWorker();

  spdlog::logger& log_;
  Entropy entropy_;
  UniqueFd stop_;
  std::thread worker_;
  std::atomic<uint64_t> served_{0};
  std::atomic<bool> broken_{false};
};

}  // namespace clonevm::vmm
