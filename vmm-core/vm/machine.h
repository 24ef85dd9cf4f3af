#pragma once
// A whole VM: guest memory, the KVM VM with its in-kernel irqchip, the devices the core
// emulates, the loaded kernel and the vCPU threads. Built in the constructor, run by run().

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <spdlog/logger.h>

#include "vmm-core/boot/linux_loader.h"
#include "vmm-core/devices/bus.h"
#include "vmm-core/kvm/kvm.h"
#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/vm/exit_signal.h"

namespace clonevm::vmm {

struct MachineConfig {
  std::string kernelPath;
  std::string initrdPath;  // empty: none
  std::string cmdline = "console=ttyS0 panic=-1";
  uint64_t memoryBytes = 512ull << 20;
  uint32_t vcpuCount = 1;
  int consoleInputFd = 0;   // the UART's input (not owned)
  int consoleOutputFd = 1;  // the UART's output (not owned)
};

// Milliseconds since the VMM started, at each step of setting up the VM.
struct BootTimings {
  double memoryReady = 0;
  double irqchipReady = 0;
  double kernelLoaded = 0;
  double acpiWritten = 0;
  double vcpusReady = 0;
  double firstVcpuEntry = 0;
};

class LegacyDevices;

class Machine {
 public:
  using Clock = std::chrono::steady_clock;

  Machine(const MachineConfig& config, KvmSystem& kvm, spdlog::logger& log,
          Clock::time_point processStart);
  ~Machine();

  // Runs the vCPUs until the guest powers off, resets or fails.
  ExitReason run();
  std::string exitDetail() const { return exitSignal_.detail(); }
  const BootTimings& timings() const { return timings_; }

 private:

  double millisSinceStart() const;
  void createVcpus();
  void attachDevices();
  void loadKernel();

  MachineConfig config_;
  KvmSystem& kvm_;
  spdlog::logger& log_;
  Clock::time_point processStart_;
  BootTimings timings_;

  GuestMemory memory_;
  KvmVm vm_;
  Bus pio_{"port I/O"};
  Bus mmio_{"MMIO"};
  ExitSignal exitSignal_;
  LinuxBootInfo bootInfo_{};
  std::unique_ptr<LegacyDevices> devices_;
  std::vector<std::unique_ptr<KvmVcpu>> vcpus_;
};

}  // namespace clonevm::vmm
