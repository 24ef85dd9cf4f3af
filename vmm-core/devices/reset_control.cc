#include "vmm-core/devices/reset_control.h"

#include <algorithm>

namespace clonevm::vmm {
namespace {

constexpr uint8_t kSystemReset = 0x02;
constexpr uint8_t kResetCpu = 0x04;
constexpr uint8_t kFullReset = 0x08;

}  // namespace

ResetControl::ResetControl(std::function<void()> onReset, spdlog::logger& log)
    : onReset_(std::move(onReset)), log_(log) {}

void ResetControl::read(uint64_t offset, std::span<uint8_t> data) {
  if (offset != 0 || data.size() != 1) {
    std::fill(data.begin(), data.end(), 0xff);
    return;
  }
  std::lock_guard lock(mutex_);
  data[0] = value_;
}

void ResetControl::write(uint64_t offset, std::span<const uint8_t> data) {
  if (offset != 0 || data.size() != 1) {
    log_.debug("reset control: {}-byte write at offset {:#x} ignored", data.size(), offset);
    return;
  }
  {
    std::lock_guard lock(mutex_);
    value_ = data[0] & (kSystemReset | kFullReset);
  }
  if (data[0] & kResetCpu) {
    log_.info("reset control: guest wrote {:#04x}: reset", data[0]);
    if (onReset_) onReset_();
  }
}

}  // namespace clonevm::vmm
