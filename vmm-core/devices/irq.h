#pragma once
// An interrupt line from an emulated device to the in-kernel irqchip.

#include <cstdint>

namespace clonevm::vmm {

class IrqLine {
 public:
  virtual ~IrqLine() = default;
  // Drives the line's level. Level-triggered devices (16550, RTC, SCI) call this on every
  // change of their interrupt condition.
  virtual void set(bool asserted) = 0;
};

}  // namespace clonevm::vmm
