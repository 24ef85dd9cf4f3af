#pragma once
// One thread per vCPU: KVM_RUN, then dispatch the exit to the port or MMIO bus.

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <functional>
#include <thread>

#include <spdlog/logger.h>

#include "vmm-core/devices/bus.h"
#include "vmm-core/kvm/kvm.h"
#include "vmm-core/vm/exit_signal.h"

namespace clonevm::vmm {

// Installs the no-op handler of the signal that kicks a vCPU thread out of KVM_RUN.
// Process-wide by nature (signal dispositions are); call once from setup.
void installVcpuKickHandler();

class VcpuRunner {
 public:
  VcpuRunner(KvmVcpu& vcpu, const Bus& pio, const Bus& mmio, ExitSignal& exitSignal,
             spdlog::logger& log);
  VcpuRunner(const VcpuRunner&) = delete;
  VcpuRunner& operator=(const VcpuRunner&) = delete;
  ~VcpuRunner();

  // `beforeFirstEntry` runs on the vCPU thread just before its first KVM_RUN.
  void start(std::function<void()> beforeFirstEntry = {});
  // Kicks the thread out of KVM_RUN and joins it.
  void stop();
  // Kicks the thread out of KVM_RUN and parks it until resume(); returns once it is parked
  // (or has ended). The vCPU's state is then stable for reading.
  void pause();
  void resume();

 private:
  void loop(std::function<void()> beforeFirstEntry);
  // Returns false when the vCPU must stop.
  bool handleExit();
  void handlePortIo(kvm_run& run);
  void handleMmio(kvm_run& run);

  KvmVcpu& vcpu_;
  const Bus& pio_;
  const Bus& mmio_;
  ExitSignal& exitSignal_;
  spdlog::logger& log_;
  // Leaves KVM_RUN: immediate_exit for the next entry, a signal for the current one.
  void kick();
  // Called on the vCPU thread between runs: parks while paused.
  void parkWhilePaused();

  std::atomic<bool> stopping_{false};
  std::mutex pauseMutex_;
  std::condition_variable pauseChanged_;
  bool pauseRequested_ = false;
  bool parked_ = false;
  bool ended_ = false;
  std::thread thread_;
};

}  // namespace clonevm::vmm
