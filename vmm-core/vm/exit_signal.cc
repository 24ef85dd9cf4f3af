#include "vmm-core/vm/exit_signal.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include "common/error.h"

namespace clonevm::vmm {

const char* describe(ExitReason reason) {
  switch (reason) {
    case ExitReason::kPowerOff: return "guest powered off";
    case ExitReason::kReset: return "guest requested a reset";
    case ExitReason::kTripleFault: return "guest triple fault";
    case ExitReason::kInternalError: return "internal error";
  }
  return "unknown";
}

ExitSignal::ExitSignal()
    : eventFd_(CLONE_SYSCALL(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK), "eventfd exit signal")) {}

void ExitSignal::request(ExitReason reason, std::string detail) {
  std::lock_guard lock(mutex_);
  if (reason_) return;
  reason_ = reason;
  detail_ = std::move(detail);
  changed_.notify_all();
  uint64_t one = 1;
  (void)!::write(eventFd_.get(), &one, sizeof(one));
}

bool ExitSignal::requested() const {
  std::lock_guard lock(mutex_);
  return reason_.has_value();
}

ExitReason ExitSignal::wait() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [&] { return reason_.has_value(); });
  return *reason_;
}

std::string ExitSignal::detail() const {
  std::lock_guard lock(mutex_);
  return detail_;
}

}  // namespace clonevm::vmm
