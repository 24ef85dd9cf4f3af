#pragma once
// Test-only: a toy vhost-user device. Each request's readable bytes are XORed with a key
// from its config space and written to its writable buffers.

#include <atomic>
#include <cstring>
#include <functional>
#include <vector>

#include "ipc/vhost-user/backend.h"

namespace clonevm::ipc::vhost::testing {

class XorDevice : public VhostUserDevice {
 public:
  explicit XorDevice(uint16_t queues = 1) : queues_(queues) { config_[0] = 0xff; }

  uint64_t features() const override { return kLibraryTransportFeatures | bit(3); }
  uint16_t queueCount() const override { return queues_; }
  uint32_t maxQueueSize() const override { return 256; }
  size_t configSize() const override { return sizeof(config_); }
  void readConfig(uint32_t offset, std::span<uint8_t> out) const override {
    std::memcpy(out.data(), config_ + offset, out.size());
  }
  // Only byte 0 (the key) is writable.
  void writeConfig(uint32_t offset, std::span<const uint8_t> data, ConfigFlags) override {
    require(offset == 0 && data.size() == 1, "only the key byte is writable");
    config_[0] = data[0];
  }
  void onQueueStarted(Virtqueue&) override { ++started; }
  void onQueueStopped(Virtqueue&) override {
    ++stopped;
    held.clear();
  }
  void onReset() override { ++resets; }
  void onDisconnect() override {
    ++disconnects;
    held.clear();
  }
  void onStatus(uint8_t value) override {
    lastStatus = value;
    if (statusHook) statusHook();
  }
  void processQueue(Virtqueue& queue) override {
    while (auto request = queue.pop()) {
      if (hold) {  // take requests and never finish them, like a back-end about to crash
        held.push_back(std::move(*request));
        ++heldCount;
        continue;
      }
      std::vector<uint8_t> bytes(request->readableBytes());
      request->read(0, bytes);
      for (auto& b : bytes) b ^= config_[0];
      size_t written = request->write(0, bytes);
      queue.complete(*request, static_cast<uint32_t>(written));
      ++processed;
    }
  }

  std::atomic<int> started{0}, stopped{0}, resets{0}, disconnects{0}, processed{0};
  std::atomic<int> lastStatus{-1};
  std::atomic<bool> hold{false};
  std::vector<VirtqueueRequest> held;  // loop thread only
  std::atomic<int> heldCount{0};
  std::function<void()> statusHook;  // runs on the back-end's thread

 private:
  uint16_t queues_;
  uint8_t config_[8] = {};
};

}  // namespace clonevm::ipc::vhost::testing
