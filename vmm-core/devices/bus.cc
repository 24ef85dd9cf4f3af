#include "vmm-core/devices/bus.h"

#include "common/error.h"

namespace clonevm::vmm {

void Bus::insert(uint64_t base, uint64_t length, std::shared_ptr<BusDevice> device,
                 uint64_t deviceOffset) {
  require(device != nullptr, "{} bus: no device for {:#x}", name_, base);
  require(length > 0 && base + length > base, "{} bus: bad range {:#x}+{:#x}", name_, base, length);
  std::unique_lock lock(mutex_);
  auto next = ranges_.lower_bound(base);
  if (next != ranges_.end()) {
    require(base + length <= next->first, "{} bus: range {:#x}+{:#x} overlaps {:#x}", name_,
            base, length, next->first);
  }
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    require(prev->first + prev->second.length <= base,
            "{} bus: range {:#x}+{:#x} overlaps {:#x}", name_, base, length, prev->first);
  }
  ranges_.emplace(base, Range{length, deviceOffset, std::move(device)});
}

std::shared_ptr<BusDevice> Bus::remove(uint64_t base) {
  std::unique_lock lock(mutex_);
  auto it = ranges_.find(base);
  if (it == ranges_.end()) return nullptr;
  auto device = std::move(it->second.device);
  ranges_.erase(it);
  return device;
}

const Bus::Range* Bus::find(uint64_t address, uint64_t size, uint64_t* base) const {
  auto it = ranges_.upper_bound(address);
  if (it == ranges_.begin()) return nullptr;
  --it;
  uint64_t offset = address - it->first;
  if (offset >= it->second.length || size > it->second.length - offset) return nullptr;
  *base = it->first;
  return &it->second;
}

Bus::Target Bus::resolve(uint64_t address, uint64_t size) const {
  std::shared_lock lock(mutex_);
  uint64_t base = 0;
  const Range* range = find(address, size, &base);
  if (range == nullptr) return {};
  // The device is called outside the lock, so a vCPU in a slow device never blocks the bus.
  return {range->device, address - base + range->deviceOffset};
}

bool Bus::read(uint64_t address, std::span<uint8_t> data) const {
  Target target = resolve(address, data.size());
  if (!target.device) return false;
  target.device->read(target.offset, data);
  return true;
}

bool Bus::write(uint64_t address, std::span<const uint8_t> data) const {
  Target target = resolve(address, data.size());
  if (!target.device) return false;
  target.device->write(target.offset, data);
  return true;
}

}  // namespace clonevm::vmm
