#include "vmm-core/devices/clock.h"

#include <time.h>

namespace clonevm::vmm {
namespace {

int64_t readClock(clockid_t id) {
  timespec ts{};
  clock_gettime(id, &ts);  // cannot fail for these clock ids
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

}  // namespace

WallClock systemWallClock() {
  return [] { return readClock(CLOCK_REALTIME); };
}

MonotonicClock systemMonotonicClock() {
  return [] { return static_cast<uint64_t>(readClock(CLOCK_MONOTONIC)); };
}

}  // namespace clonevm::vmm
