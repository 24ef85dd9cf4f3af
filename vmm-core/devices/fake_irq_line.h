#pragma once
// Test helper: an IrqLine that records every level it is driven to.

#include <vector>

#include "vmm-core/devices/irq.h"

namespace clonevm::vmm {

class FakeIrqLine : public IrqLine {
 public:
  void set(bool asserted) override {
    level = asserted;
    history.push_back(asserted);
    if (asserted) ++raises;
  }

  bool level = false;
  int raises = 0;             // calls with asserted == true
  std::vector<bool> history;  // every call, in order
};

}  // namespace clonevm::vmm
