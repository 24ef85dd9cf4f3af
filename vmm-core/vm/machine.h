#pragma once
// A whole VM: guest memory, the KVM VM with its in-kernel irqchip, the devices the core
// emulates, the loaded kernel and the vCPU threads. Built in the constructor, run by run().

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/logger.h>

#include "vmm-core/boot/linux_loader.h"
#include "vmm-core/devices/bus.h"
#include "vmm-core/devices/pci_device.h"
#include "vmm-core/kvm/kvm.h"
#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/memory/lazy_fill.h"
#include "vmm-core/virtio/vhost_user_backend.h"
#include "vmm-core/virtio/vhost_vsock_backend.h"
#include "vmm-core/vm/exit_signal.h"
#include "vmm-core/vm/nested_page_prefault.h"

namespace clonevm::vmm {

namespace snapshot {
struct VerifiedTemplate;
struct VirtioDeviceState;
}

struct MachineConfig {
  std::string kernelPath;
  std::string initrdPath;  // empty: none
  std::string cmdline = "console=ttyS0 panic=-1";
  uint64_t memoryBytes = 512ull << 20;
  uint32_t vcpuCount = 1;
  int consoleInputFd = 0;   // the UART's input (not owned)
  int consoleOutputFd = 1;  // the UART's output (not owned)
  // vhost-user devices (--vhost-user-blk, --vhost-user-fs), in slot order after the host
  // bridge: the first is 00:01.0.
  std::vector<VhostUserDeviceConfig> vhostUserDevices;
  // virtio-vsock over kernel vhost-vsock (--vsock-cid, --no-vsock), after the vhost-user
  // devices.
  VsockConfig vsock;
  // Set: build the VM from this checked template (clone-vmm --restore) instead of booting
  // a kernel; memoryBytes, vcpuCount and cmdline must be the manifest's. Not owned.
  const snapshot::VerifiedTemplate* restoreFrom = nullptr;
  // With restoreFrom: guest RAM is a MAP_PRIVATE copy-on-write mapping of the template's
  // memory file instead of a memfd filled through userfaultfd (docs/FORK.md, "Copy-on-write
  // forks"). Pages the fork only reads stay shared with every other fork. No vhost-user
  // device can map such memory.
  bool copyOnWriteMemory = false;
  // With restoreFrom: the fork's vsock CID comes later (a fork server's spare, restored before
  // its request): the restore sends no transport reset; assignForkVsockCid() does, once.
  bool vsockCidLater = false;
};

struct SnapshotOptions {
  // An empty directory, open (borrowed): the template's files are created in it, so a jailed
  // core needs no writable path. outputDir is its name in messages and logs.
  int outputDirFd = -1;
  std::string outputDir;
  bool leavePaused = false;
};

struct SnapshotResult {
  double pausedMillis = 0;  // how long the vCPUs stood still for it
  uint64_t memoryDataBytes = 0;
  uint64_t stateBytes = 0;
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

class ConsoleInput;
class KvmDeviceEvents;
class LegacyDevices;
class VcpuRunner;
class VirtioPciDevice;

class Machine {
 public:
  using Clock = std::chrono::steady_clock;

  Machine(const MachineConfig& config, KvmSystem& kvm, spdlog::logger& log,
          Clock::time_point processStart);
  ~Machine();

  // Runs the vCPUs until the guest powers off, resets or fails: start(), wait, finish().
  ExitReason run();

  // Starts the vCPU threads and the console; does nothing once they have started.
  void start();
  // Called once by start(), after the console and vCPU runners are set up and before any vCPU
  // runs guest code: where the process locks itself down (seccomp).
  void setLockdown(std::function<void()> lockdown) { lockdown_ = std::move(lockdown); }
  // Parks every vCPU (returns once all are parked) / lets them run again.
  void pause();
  void resume();
  bool paused() const { return paused_; }
  // Ends the VM from outside (API shutdown); run()/finish() then report `reason`.
  void requestExit(ExitReason reason, std::string detail);
  // Presses the ACPI power button: a guest that handles it powers off by itself.
  void pressPowerButton();
  // Writes a template of this VM (docs/FORK.md): pauses the vCPUs, writes memory, state and
  // manifest.json, then resumes them unless options.leavePaused. vhost-user-blk disks
  // (clone-block, with image=) have their queues stopped first; they start again when the
  // vCPUs do, so a VM left paused keeps its disks quiet while the caller copies them
  // (`clone snapshot`). Refuses virtio-fs and disks without image=. Called from the API
  // thread.
  SnapshotResult snapshot(const SnapshotOptions& options);
  // True for a VM restored from a template.
  bool restored() const { return config_.restoreFrom != nullptr; }
  // How much of a restored VM's memory has been filled so far (zero for a booted VM). For
  // copy-on-write memory only prefetchedPages is set: the pages mapped before the vCPUs ran.
  LazyMemoryFill::Stats memoryFillStats() const;
  bool copyOnWriteMemory() const { return memory_.copyOnWrite(); }
  // Stops vCPUs and console after an exit was requested; returns the reason.
  ExitReason finish();
  ExitSignal& exitSignal() { return exitSignal_; }
  const MachineConfig& config() const { return config_; }
  std::string exitDetail() const { return exitSignal_.detail(); }
  const BootTimings& timings() const { return timings_; }
  // Milliseconds since the first vCPU entry (0 before it).
  double uptimeMillis() const;
  // The vhost-user devices, in MachineConfig order (diagnostics, tests).
  const std::vector<std::shared_ptr<VhostUserBackend>>& vhostUserBackends() const {
    return vhostUserBackends_;
  }
  // The vsock device (null with --no-vsock): its CID, and the fork's hooks
  // (setGuestCid, sendTransportReset, save/restoreState).
  VhostVsockBackend* vsock() const { return vsock_.get(); }
  // With vsockCidLater: moves the vsock device to `cid` (0: keeps the CID it has) and sends
  // the transport reset that makes the guest re-read it, unless the guest already knows this
  // CID from an earlier call. Throws when the template has no vsock device but a CID is asked
  // for, or the CID is taken. May be called while the vCPUs run.
  void assignForkVsockCid(uint64_t cid);
  // A fork of a template without a working set records one: what its guest touched from
  // this call until endWorkingSetWindow(), or for at most 10 s (once; start() makes it unless
  // startAhead() started the VM).
  void recordWorkingSet();
  // Ends the record's window now (before recordWorkingSet() too: the window is then empty
  // of waiting). For `clone fork`, once the fork has answered what later forks will be asked.
  // `endedBy` completes the log line "working-set window ended ..." (the first caller's).
  void endWorkingSetWindow(const char* endedBy = "when asked");
  // The working set this fork recorded, for a caller that saves it where the fork cannot
  // write (a jailed fork's template is read-only to it). True while its window runs.
  bool recordingWorkingSet() const;
  // The set once recorded; none while recording, or when the template had one, the fork was
  // not restored, or the record failed.
  std::optional<GuestMemory::ResidentPages> recordedWorkingSet() const;
  // A fork server's spare starts its VM before its request: as start(), but the working set
  // is recorded only once recordWorkingSet() is called at the request, so that it holds the
  // fork's first second rather than the spare's idle wait.
  void startAhead();
  // A fork server's spare, before run(): reads the template's working set into KVM's nested
  // page tables through a helper vCPU (nested_page_prefault.h), asking `stop` every 64 pages.
  // Returns the pages read (0 with no working set).
  uint64_t prefaultWorkingSet(const std::function<bool()>& stop);

 private:

  double millisSinceStart() const;
  // The console and the vCPU threads (with the lockdown before any guest code runs).
  void startVcpus();
  void createVcpus();
  void attachDevices();
  void attachVhostUserDevices();
  void attachVsock();
  // Snapshot and restore of the virtio-pci devices (machine_snapshot.cc).
  // `vhostUser`: the suspended vhost-user devices' states, in slot order.
  std::vector<snapshot::VirtioDeviceState> saveVirtioDevices(
      const std::vector<VhostUserDeviceState>& vhostUser);
  // The vsock device is attached last (attachDevices), after the vhost-user ones.
  bool isVsockSlot(size_t index) const { return vsock_ && index + 1 == virtioDevices_.size(); }
  void restoreVirtioDevices(const std::vector<snapshot::VirtioDeviceState>& states,
                            const std::string& templateDir);
  // Places a virtio-pci device's BAR 0 in the 64-bit window, after the previous one.
  uint64_t allocateBar(uint64_t size, const std::string& what);
  void loadKernel();
  void restoreFromTemplate();
  // Restore's memory step: the lazy fill of the fork's memfd, or for copy-on-write memory
  // the template's working set mapped in.
  void prepareRestoredMemory(const snapshot::VerifiedTemplate& source);

  MachineConfig config_;
  KvmSystem& kvm_;
  spdlog::logger& log_;
  Clock::time_point processStart_;
  BootTimings timings_;

  GuestMemory memory_;
  uint64_t copyOnWritePrefetchedPages_ = 0;
  KvmVm vm_;
  // Before the buses and devices, which hold the virtio transports that use it: members are
  // destroyed in reverse order.
  std::unique_ptr<KvmDeviceEvents> deviceEvents_;
  Bus pio_{"port I/O"};
  Bus mmio_{"MMIO"};
  ExitSignal exitSignal_;
  std::function<void()> lockdown_;
  LinuxBootInfo bootInfo_{};
  std::unique_ptr<LegacyDevices> devices_;
  std::vector<std::shared_ptr<VhostUserBackend>> vhostUserBackends_;
  std::shared_ptr<VhostVsockBackend> vsock_;
  uint64_t nextBar_ = 0;
  std::vector<std::shared_ptr<VirtioPciDevice>> virtioDevices_;
  struct VirtioPlacement {
    Bdf bdf;
    uint64_t bar;
  };
  std::vector<VirtioPlacement> virtioPlacements_;  // parallel to virtioDevices_
  std::vector<std::unique_ptr<KvmVcpu>> vcpus_;
  std::vector<std::vector<kvm_cpuid_entry2>> vcpuCpuids_;  // as set on each vCPU
  GuestMemory::ResidentPages restoredWorkingSet_;  // memory offsets, kept for prefaultWorkingSet()
  std::unique_ptr<NestedPagePrefault> prefault_;  // its helper vCPU holds the filled tables
  // Before the vCPUs' runners (destroyed after them): faults wait on its thread.
  std::unique_ptr<LazyMemoryFill> lazyFill_;
  std::thread workingSetRecorder_;
  mutable std::mutex recordedWorkingSetMutex_;
  bool workingSetRecording_ = false;  // the recorder's window runs
  const char* workingSetWindowEndedBy_ = nullptr;  // set once the window is ended
  std::condition_variable workingSetWindowEnd_;
  std::optional<GuestMemory::ResidentPages> recordedWorkingSet_;  // once it ended
  std::mutex snapshotMutex_;
  bool recordWorkingSetPending_ = false;
  bool filledUpFront_ = false;  // every data page filled at restore, holes left to the kernel
  bool guestKnowsForkCid_ = false;  // assignForkVsockCid() has reset the transport
  std::vector<std::unique_ptr<VcpuRunner>> runners_;
  std::unique_ptr<ConsoleInput> console_;
  std::mutex pauseMutex_;
  std::atomic<bool> paused_{false};
  // A snapshot stopped the vhost-user disks' queues; resume() starts them (pauseMutex_).
  bool disksSuspended_ = false;
  std::atomic<double> firstEntryMillis_{0};  // read by the API thread
};

}  // namespace clonevm::vmm
