#pragma once
// Port I/O and MMIO dispatch. vCPU threads call Bus::read/write on every exit that the
// kernel did not handle; a device sees only offsets within its own range.

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>

namespace clonevm::vmm {

class BusDevice {
 public:
  virtual ~BusDevice() = default;
  // `offset` is relative to the base the device was inserted at (plus the range's device
  // offset, see Bus::insert). Called from any vCPU thread: a device guards its own state.
  virtual void read(uint64_t offset, std::span<uint8_t> data) = 0;
  virtual void write(uint64_t offset, std::span<const uint8_t> data) = 0;
};

class Bus {
 public:
  explicit Bus(std::string name) : name_(std::move(name)) {}

  // Throws clonevm::Error if [base, base+length) overlaps a range already inserted.
  // The device sees `address - base + deviceOffset`, so one device can own several
  // disjoint ranges (the i8042 at 0x60 and 0x64 is inserted twice, the second time with
  // deviceOffset 4).
  void insert(uint64_t base, uint64_t length, std::shared_ptr<BusDevice> device,
              uint64_t deviceOffset = 0);

  // Removes the range inserted at exactly `base` (e.g. when the guest moves a PCI BAR) and
  // returns its device, or nullptr when there is none. An access already dispatched to the
  // device may still complete after this returns.
  std::shared_ptr<BusDevice> remove(uint64_t base);

  // Returns false when no device claims `address` (the caller decides what that means).
  // The access must lie inside one device's range.
  bool read(uint64_t address, std::span<uint8_t> data) const;
  bool write(uint64_t address, std::span<const uint8_t> data) const;

 private:
  struct Range {
    uint64_t length;
    uint64_t deviceOffset;
    std::shared_ptr<BusDevice> device;
  };
  const Range* find(uint64_t address, uint64_t size, uint64_t* base) const;
  struct Target {
    std::shared_ptr<BusDevice> device;  // null: nothing claims the access
    uint64_t offset = 0;
  };
  Target resolve(uint64_t address, uint64_t size) const;

  std::string name_;
  mutable std::shared_mutex mutex_;
  std::map<uint64_t, Range> ranges_;  // keyed by base
};

}  // namespace clonevm::vmm
