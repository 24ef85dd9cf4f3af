#pragma once
// Time sources for emulated devices, injected so that tests can drive time by hand.

#include <cstdint>
#include <functional>

namespace clonevm::vmm {

// Nanoseconds since the Unix epoch (CLOCK_REALTIME): the RTC's idea of "now".
using WallClock = std::function<int64_t()>;
// Nanoseconds on a clock that never jumps (CLOCK_MONOTONIC); only differences matter.
using MonotonicClock = std::function<uint64_t()>;

WallClock systemWallClock();
MonotonicClock systemMonotonicClock();

}  // namespace clonevm::vmm
