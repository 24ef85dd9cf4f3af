#pragma once
// How a running VM ends: the first reason reported wins, and run() wakes up.

#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>

#include "common/unique_fd.h"

namespace clonevm::vmm {

enum class ExitReason {
  kPowerOff,       // ACPI S5 (guest poweroff)
  kReset,          // guest asked for a reset (reboot)
  kTripleFault,    // KVM_EXIT_SHUTDOWN
  kInternalError,  // KVM could not run the guest, or the VMM failed
};

const char* describe(ExitReason reason);

class ExitSignal {
 public:
  ExitSignal();

  // Records `reason` unless one was recorded already; `detail` is kept for the log.
  void request(ExitReason reason, std::string detail = {});
  bool requested() const;
  // Blocks until a reason is recorded.
  ExitReason wait();
  std::string detail() const;
  // Readable once a reason is recorded: for event loops that cannot block in wait().
  int eventFd() const { return eventFd_.get(); }

 private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<ExitReason> reason_;
  std::string detail_;
  UniqueFd eventFd_;
};

}  // namespace clonevm::vmm
