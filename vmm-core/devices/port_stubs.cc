#include "vmm-core/devices/port_stubs.h"

#include <algorithm>

namespace clonevm::vmm {

void PostCodePort::read(uint64_t offset, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), 0xff);
  if (offset == 0 && !data.empty()) data[0] = last_.load(std::memory_order_relaxed);
}

void PostCodePort::write(uint64_t offset, std::span<const uint8_t> data) {
  if (offset != 0 || data.empty()) return;
  last_.store(data[0], std::memory_order_relaxed);
  log_.trace("post code {:#04x}", data[0]);
}

void NullPorts::read(uint64_t, std::span<uint8_t> data) {
  std::fill(data.begin(), data.end(), readValue_);
}

}  // namespace clonevm::vmm
