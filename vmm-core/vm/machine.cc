#include "vmm-core/vm/machine.h"

#include <unistd.h>

#include "common/error.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/boot/acpi/acpi_tables.h"
#include "vmm-core/boot/cpu_setup.h"
#include "vmm-core/boot/linux_loader.h"
#include "vmm-core/devices/pci_root.h"
#include "vmm-core/kvm/cpuid.h"
#include "vmm-core/kvm/kvm_device_events.h"
#include "vmm-core/kvm/msrs.h"
#include "vmm-core/memory/lazy_fill.h"
#include "vmm-core/snapshot/template_files.h"
#include "vmm-core/virtio/virtio_pci_device.h"
#include "vmm-core/vm/console.h"
#include "vmm-core/vm/legacy_devices.h"
#include "vmm-core/vm/vcpu_runner.h"

namespace clonevm::vmm {
namespace {

constexpr uint32_t kLapicLvtLint0 = 0x350;
constexpr uint32_t kLapicLvtLint1 = 0x360;
constexpr uint32_t kLapicDeliveryExtInt = 0x7 << 8;
constexpr uint32_t kLapicDeliveryNmi = 0x4 << 8;

void setLapicRegister(kvm_lapic_state& lapic, uint32_t offset, uint32_t value) {
  std::memcpy(&lapic.regs[offset], &value, sizeof(value));
}

uint32_t lapicRegister(const kvm_lapic_state& lapic, uint32_t offset) {
  uint32_t value;
  std::memcpy(&value, &lapic.regs[offset], sizeof(value));
  return value;
}

// LINT0 takes the legacy PIC's interrupts (ExtINT) and LINT1 NMIs, as firmware leaves them.
void setupLapicLints(KvmVcpu& vcpu) {
  kvm_lapic_state lapic = vcpu.getLapic();
  setLapicRegister(lapic, kLapicLvtLint0,
                   (lapicRegister(lapic, kLapicLvtLint0) & ~0x700u) | kLapicDeliveryExtInt);
  setLapicRegister(lapic, kLapicLvtLint1,
                   (lapicRegister(lapic, kLapicLvtLint1) & ~0x700u) | kLapicDeliveryNmi);
  vcpu.setLapic(lapic);
}

kvm_fpu initialFpu() {
  kvm_fpu fpu{};
  fpu.fcw = 0x37f;     // x87 default control word
  fpu.mxcsr = 0x1f80;  // SSE default: all exceptions masked
  return fpu;
}

GuestMemory makeGuestMemory(const MachineConfig& config) {
  if (config.copyOnWriteMemory) {
    require(config.restoreFrom != nullptr, "copy-on-write memory needs a template to map");
    require(config.vhostUserDevices.empty(),
            "--fork-memory cow: {} vhost-user devices (the template's disks) could not map guest "
            "memory; only a template without disks can be forked copy-on-write",
            config.vhostUserDevices.size());
    return GuestMemory::mapCopyOnWrite(config.restoreFrom->dir + "/" + snapshot::kMemoryFile,
                                       config.memoryBytes,
                                       config.restoreFrom->memoryExtentPairs());
  }
  // A fork's memfd is filled in 4 KiB pages through userfaultfd: no huge pages.
  return GuestMemory::create(config.memoryBytes, "clone-guest-ram",
                             /*hugePages=*/config.restoreFrom == nullptr);
}

uint64_t pciMmio64Start(const GuestMemory& memory) {
  constexpr uint64_t kAlign = 1 * layout::kGiB;
  uint64_t end = std::max(memory.endAddress(), layout::kHighRamStart);
  return (end + kAlign - 1) / kAlign * kAlign;
}

}  // namespace

Machine::Machine(const MachineConfig& config, KvmSystem& kvm, spdlog::logger& log,
                 Clock::time_point processStart)
    : config_(config),
      kvm_(kvm),
      log_(log),
      processStart_(processStart),
      memory_(makeGuestMemory(config)),
      vm_(kvm) {
  timings_.memoryReady = millisSinceStart();
  if (!GuestMemory::hostGivesShmemHugePages()) {
    log_.warn("transparent huge pages are off for shmem: guest memory faults in 4 KiB pages and "
              "boots slower (echo advise > /sys/kernel/mm/transparent_hugepage/shmem_enabled)");
  }
  vm_.createIrqchipAndPit();
  uint32_t slot = 0;
  for (const auto& region : memory_.regions()) {
    vm_.setUserMemoryRegion(slot++, region.guestAddress, region.size, region.host);
  }
  timings_.irqchipReady = millisSinceStart();
  installVcpuKickHandler();
  if (config_.restoreFrom != nullptr) {
    restoreFromTemplate();
    return;
  }
  loadKernel();
  createVcpus();
  timings_.vcpusReady = millisSinceStart();
  attachDevices();
}

Machine::~Machine() {
  endWorkingSetWindow("as the fork ended");
  if (workingSetRecorder_.joinable()) workingSetRecorder_.join();
  // The vCPU threads may wait on a fault only the fill thread resolves: stop them first.
  for (auto& runner : runners_) runner->stop();
  // So is vhost-vsock's kernel worker, which cannot be killed: stop it while the fill
  // thread still answers, before lazyFill_ goes.
  if (vsock_) {
    try {
      vsock_->stop();
    } catch (const std::exception& e) {
      log_.warn("stopping vsock at exit: {}", e.what());
    }
  }
}

double Machine::millisSinceStart() const {
  return std::chrono::duration<double, std::milli>(Clock::now() - processStart_).count();
}

double Machine::uptimeMillis() const {
  double entry = firstEntryMillis_.load();
  return entry > 0 ? millisSinceStart() - entry : 0;
}

void Machine::loadKernel() {
  AcpiConfig acpi;
  acpi.vcpuCount = config_.vcpuCount;
  acpi.pciMmio64Start = pciMmio64Start(memory_);
  LinuxBootConfig boot;
  boot.kernelPath = config_.kernelPath;
  if (!config_.initrdPath.empty()) boot.initrdPath = config_.initrdPath;
  boot.cmdline = config_.cmdline;
  boot.acpiRsdpAddress = layout::kAcpiTablesAddr;
  bootInfo_ = loadLinux(memory_, boot);
  timings_.kernelLoaded = millisSinceStart();
  uint64_t rsdp = writeAcpiTables(memory_, acpi);
  require(rsdp == boot.acpiRsdpAddress, "ACPI RSDP written at {:#x}, expected {:#x}", rsdp,
          boot.acpiRsdpAddress);
  writeLongModeTables(memory_);
  timings_.acpiWritten = millisSinceStart();
  log_.debug("kernel entry {:#x}, initrd {:#x}+{:#x}", bootInfo_.entryPoint,
             bootInfo_.initrdAddress, bootInfo_.initrdSize);
}

void Machine::createVcpus() {
  auto supported = kvm_.supportedCpuid();
  auto msrs = bootMsrs();
  for (uint32_t id = 0; id < config_.vcpuCount; ++id) {
    auto vcpu = std::make_unique<KvmVcpu>(vm_, id);
    vcpuCpuids_.push_back(buildGuestCpuid(supported, id, config_.vcpuCount));
    vcpu->setCpuid(vcpuCpuids_.back());
    vcpu->setMsrs(msrs);
    vcpu->setFpu(initialFpu());
    setupLapicLints(*vcpu);
    if (id == 0) {
      kvm_sregs sregs = vcpu->getSregs();
      setupLongModeSregs(sregs);
      vcpu->setSregs(sregs);
      vcpu->setRegs(linuxEntryRegs(bootInfo_.entryPoint, bootInfo_.bootParamsAddress));
    }
    vcpus_.push_back(std::move(vcpu));
  }
}

void Machine::attachDevices() {
  devices_ = std::make_unique<LegacyDevices>(
      LegacyDevices::Config{memory_, config_.consoleOutputFd, vm_, exitSignal_, log_}, pio_, mmio_);
  attachVhostUserDevices();
  attachVsock();
}

void Machine::attachVhostUserDevices() {
  if (config_.vhostUserDevices.empty()) return;
  if (!deviceEvents_) deviceEvents_ = std::make_unique<KvmDeviceEvents>(vm_);
  for (const auto& deviceConfig : config_.vhostUserDevices) {
    // Connects and negotiates before the transport is built: the transport fixes its feature
    // offer and queue count at construction.
    // A fork's back-ends get postcopy when they offer it: the lazy fill resolves their faults.
    auto backend = VhostUserBackend::connect(deviceConfig, memory_, log_, lazyFill_.get());
    uint64_t size = VirtioPciDevice::barSizeFor(*backend);
    uint64_t bar = allocateBar(size, fmt::format("{} {}", vhostUserKindName(deviceConfig.kind),
                                                 deviceConfig.socketPath));
    auto device = std::make_shared<VirtioPciDevice>(backend, memory_, *deviceEvents_,
                                                    *deviceEvents_, log_, bar);
    Bdf bdf = devices_->pciRoot().addDevice(device);
    mmio_.insert(bar, device->layout().size, device);
    backend->startWatching(bdf.toString());
    log_.info("{} {} at {} (BAR 0 {:#x}+{:#x}, {} queues)", vhostUserKindName(deviceConfig.kind),
              deviceConfig.socketPath, bdf.toString(), bar, size, backend->numQueues());
    vhostUserBackends_.push_back(std::move(backend));
    virtioDevices_.push_back(std::move(device));
    virtioPlacements_.push_back({bdf, bar});
  }
}

uint64_t Machine::allocateBar(uint64_t size, const std::string& what) {
  // BAR 0 of each device goes into the 64-bit window (AcpiConfig::pciMmio64Start, in the
  // host bridge's _CRS, so Linux keeps it), one after the other, each aligned to its size.
  uint64_t windowStart = pciMmio64Start(memory_);
  if (nextBar_ == 0) nextBar_ = windowStart;
  uint64_t bar = (nextBar_ + size - 1) / size * size;
  require(bar + size <= windowStart + layout::kPciMmio64Size,
          "{}: no room left in the 64-bit PCI window", what);
  nextBar_ = bar + size;
  return bar;
}

void Machine::attachVsock() {
  if (!config_.vsock.enabled) return;
  if (!deviceEvents_) deviceEvents_ = std::make_unique<KvmDeviceEvents>(vm_);
  vsock_ = VhostVsockBackend::create(config_.vsock, memory_, log_);
  uint64_t size = VirtioPciDevice::barSizeFor(*vsock_);
  uint64_t bar = allocateBar(size, "vsock");
  auto device = std::make_shared<VirtioPciDevice>(vsock_, memory_, *deviceEvents_,
                                                  *deviceEvents_, log_, bar);
  Bdf bdf = devices_->pciRoot().addDevice(device);
  mmio_.insert(bar, device->layout().size, device);
  log_.info("vsock (vhost-vsock) at {}, guest CID {}", bdf.toString(), vsock_->guestCid());
  virtioDevices_.push_back(std::move(device));
  virtioPlacements_.push_back({bdf, bar});
}

void Machine::start() {
  if (!runners_.empty()) return;  // a fork server's spare started them before its request
  startVcpus();
  recordWorkingSet();
}

void Machine::startAhead() { startVcpus(); }

void Machine::startVcpus() {
  console_ = std::make_unique<ConsoleInput>(
      config_.consoleInputFd, [this](std::span<const uint8_t> bytes) { devices_->consoleInput(bytes); });
  for (auto& vcpu : vcpus_) {
    runners_.push_back(std::make_unique<VcpuRunner>(*vcpu, pio_, mmio_, exitSignal_, log_));
  }
  if (lockdown_) lockdown_();
  for (size_t i = 0; i < runners_.size(); ++i) {
    std::function<void()> hook;
    if (i == 0) {
      hook = [this] {
        timings_.firstVcpuEntry = millisSinceStart();
        firstEntryMillis_ = timings_.firstVcpuEntry;
      };
    }
    runners_[i]->start(std::move(hook));
  }
}

void Machine::pause() {
  std::lock_guard lock(pauseMutex_);
  for (auto& runner : runners_) runner->pause();
  paused_ = true;
}

void Machine::resume() {
  std::lock_guard lock(pauseMutex_);
  if (disksSuspended_) {
    // Stopped by a snapshot: the disks run again before the vCPUs do.
    for (auto& backend : vhostUserBackends_) {
      try {
        backend->resumeAfterSuspend();
      } catch (const std::exception& e) {
        log_.error("restarting the disk's queues after the snapshot: {}", e.what());
      }
    }
    disksSuspended_ = false;
  }
  for (auto& runner : runners_) runner->resume();
  paused_ = false;
}

void Machine::requestExit(ExitReason reason, std::string detail) {
  exitSignal_.request(reason, std::move(detail));
}

void Machine::pressPowerButton() { devices_->pressPowerButton(); }

ExitReason Machine::finish() {
  ExitReason reason = exitSignal_.wait();
  for (auto& runner : runners_) runner->stop();
  runners_.clear();
  if (console_) console_->stop();
  devices_->flushConsole();
  return reason;
}

ExitReason Machine::run() {
  start();
  exitSignal_.wait();
  return finish();
}

}  // namespace clonevm::vmm
