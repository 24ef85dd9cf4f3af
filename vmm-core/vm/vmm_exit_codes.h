#pragma once
// clone-vmm's exit codes; `clone run` passes them on. Documented in docs/VMM.md.

#include "vmm-core/vm/exit_signal.h"

namespace clonevm::vmm {

inline constexpr int kExitPowerOff = 0;
inline constexpr int kExitError = 1;
inline constexpr int kExitUsage = 2;
inline constexpr int kExitReset = 3;
inline constexpr int kExitTripleFault = 4;
inline constexpr int kExitInternalError = 5;

inline int exitCodeFor(ExitReason reason) {
  switch (reason) {
    case ExitReason::kPowerOff: return kExitPowerOff;
    case ExitReason::kReset: return kExitReset;
    case ExitReason::kTripleFault: return kExitTripleFault;
    case ExitReason::kInternalError: return kExitInternalError;
  }
  return kExitInternalError;
}

}  // namespace clonevm::vmm
