#include "vmm-core/vm/vcpu_runner.h"

#include <pthread.h>
#include <signal.h>

#include <cstring>

#include <fmt/format.h>

#include "common/error.h"

namespace clonevm::vmm {
namespace {

const int kKickSignal = SIGRTMIN;

void ignoreKick(int) {}

// Where the guest was when it died: enough to tell a lost page (CR2, RIP) from a broken
// descriptor table (IDT/GDT) without a debugger. (On Intel; see the reset-state case.)
std::string describeCpuState(const KvmVcpu& vcpu) {
  try {
    kvm_regs r = vcpu.getRegs();
    kvm_sregs s = vcpu.getSregs();
    if (r.rip == 0xfff0 && s.cs.selector == 0xf000 && s.cr0 == 0x10) {
      return "registers not known: KVM on AMD resets a vCPU at its shutdown exit";
    }
    return fmt::format(
        "rip {:#x} rsp {:#x} rflags {:#x} cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} "
        "efer {:#x} idt {:#x}/{:#x} gdt {:#x}/{:#x}",
        r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base,
        s.idt.limit, s.gdt.base, s.gdt.limit);
  } catch (const std::exception& e) {
    return fmt::format("registers unreadable: {}", e.what());
  }
}

}  // namespace

void installVcpuKickHandler() {
  struct sigaction action {};
  action.sa_handler = ignoreKick;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
  CLONE_SYSCALL(::sigaction(kKickSignal, &action, nullptr), "sigaction vCPU kick signal");
}

VcpuRunner::VcpuRunner(KvmVcpu& vcpu, const Bus& pio, const Bus& mmio, ExitSignal& exitSignal,
                       spdlog::logger& log)
    : vcpu_(vcpu), pio_(pio), mmio_(mmio), exitSignal_(exitSignal), log_(log) {}

VcpuRunner::~VcpuRunner() { stop(); }

void VcpuRunner::start(std::function<void()> beforeFirstEntry) {
  thread_ = std::thread([this, hook = std::move(beforeFirstEntry)]() mutable {
    // Named from inside: naming another thread opens /proc/self/task/N/comm, which the
    // seccomp policy does not allow.
    pthread_setname_np(pthread_self(), fmt::format("vcpu{}", vcpu_.id()).c_str());
    loop(std::move(hook));
  });
}

void VcpuRunner::kick() {
  vcpu_.runState()->immediate_exit = 1;
  pthread_kill(thread_.native_handle(), kKickSignal);
}

void VcpuRunner::stop() {
  if (!thread_.joinable()) return;
  stopping_ = true;
  {
    std::lock_guard lock(pauseMutex_);
    pauseRequested_ = false;
  }
  pauseChanged_.notify_all();
  kick();
  thread_.join();
}

void VcpuRunner::pause() {
  if (!thread_.joinable()) return;
  std::unique_lock lock(pauseMutex_);
  pauseRequested_ = true;
  kick();
  pauseChanged_.wait(lock, [&] { return parked_ || ended_; });
}

void VcpuRunner::resume() {
  {
    std::lock_guard lock(pauseMutex_);
    pauseRequested_ = false;
  }
  pauseChanged_.notify_all();
}

void VcpuRunner::parkWhilePaused() {
  std::unique_lock lock(pauseMutex_);
  if (!pauseRequested_) return;
  parked_ = true;
  pauseChanged_.notify_all();
  pauseChanged_.wait(lock, [&] { return !pauseRequested_; });
  parked_ = false;
  vcpu_.runState()->immediate_exit = 0;
}

void VcpuRunner::loop(std::function<void()> beforeFirstEntry) {
  try {
    if (beforeFirstEntry) beforeFirstEntry();
    while (!stopping_) {
      if (!vcpu_.run()) {
        // Kicked: by stop() or pause(). immediate_exit stays set until resume clears it.
        parkWhilePaused();
        continue;
      }
      if (!handleExit()) break;
    }
  } catch (const std::exception& e) {
    exitSignal_.request(ExitReason::kInternalError, fmt::format("vcpu{}: {}", vcpu_.id(), e.what()));
  }
  std::lock_guard lock(pauseMutex_);
  ended_ = true;
  pauseChanged_.notify_all();
}

bool VcpuRunner::handleExit() {
  kvm_run& run = *vcpu_.runState();
  switch (run.exit_reason) {
    case KVM_EXIT_IO:
      handlePortIo(run);
      return true;
    case KVM_EXIT_MMIO:
      handleMmio(run);
      return true;
    case KVM_EXIT_HLT:
      return true;  // only without an in-kernel LAPIC; nothing to do
    case KVM_EXIT_INTR:
      return true;
    case KVM_EXIT_SHUTDOWN:
      exitSignal_.request(ExitReason::kTripleFault, fmt::format("vcpu{}: triple fault ({})",
                                                                vcpu_.id(), describeCpuState(vcpu_)));
      return false;
    case KVM_EXIT_SYSTEM_EVENT:
      if (run.system_event.type == KVM_SYSTEM_EVENT_RESET) {
        exitSignal_.request(ExitReason::kReset);
      } else {
        exitSignal_.request(ExitReason::kPowerOff);
      }
      return false;
    case KVM_EXIT_FAIL_ENTRY:
      exitSignal_.request(ExitReason::kInternalError,
                          fmt::format("vcpu{}: KVM entry failed, hardware reason {:#x} ({})",
                                      vcpu_.id(), run.fail_entry.hardware_entry_failure_reason,
                                      describeCpuState(vcpu_)));
      return false;
    case KVM_EXIT_INTERNAL_ERROR:
      exitSignal_.request(ExitReason::kInternalError,
                          fmt::format("vcpu{}: KVM internal error, suberror {} ({})", vcpu_.id(),
                                      run.internal.suberror, describeCpuState(vcpu_)));
      return false;
    default:
      exitSignal_.request(ExitReason::kInternalError,
                          fmt::format("vcpu{}: unexpected KVM exit {}", vcpu_.id(), run.exit_reason));
      return false;
  }
}

void VcpuRunner::handlePortIo(kvm_run& run) {
  auto* data = reinterpret_cast<uint8_t*>(&run) + run.io.data_offset;
  for (uint32_t i = 0; i < run.io.count; ++i, data += run.io.size) {
    std::span<uint8_t> bytes(data, run.io.size);
    if (run.io.direction == KVM_EXIT_IO_OUT) {
      if (!pio_.write(run.io.port, bytes)) {
        log_.trace("unclaimed port write {:#x} size {}", run.io.port, run.io.size);
      }
    } else if (!pio_.read(run.io.port, bytes)) {
      std::memset(bytes.data(), 0xff, bytes.size());  // floating bus
    }
  }
}

void VcpuRunner::handleMmio(kvm_run& run) {
  uint32_t length = std::min<uint32_t>(run.mmio.len, sizeof(run.mmio.data));
  std::span<uint8_t> bytes(run.mmio.data, length);
  if (run.mmio.is_write) {
    if (!mmio_.write(run.mmio.phys_addr, bytes)) {
      log_.debug("unclaimed MMIO write {:#x} size {}", run.mmio.phys_addr, length);
    }
  } else if (!mmio_.read(run.mmio.phys_addr, bytes)) {
    std::memset(bytes.data(), 0xff, bytes.size());
  }
}

}  // namespace clonevm::vmm
