#pragma once
// How a running VM ends: the first reason reported wins, and run() wakes up.

#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>

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
  // Records `reason` unless one was recorded already; `detail` is kept for the log.
  void request(ExitReason reason, std::string detail = {});
  bool requested() const;
  // Blocks until a reason is recorded.
  ExitReason wait();
  std::string detail() const;

 private:
  mutable std::mutex mutex_;
  std::condition_variable changed_;
  std::optional<ExitReason> reason_;
  std::string detail_;
};

}  // namespace clonevm::vmm
