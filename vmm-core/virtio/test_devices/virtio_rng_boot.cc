// clone-virtio-rng-boot: boots a Linux guest with one in-process virtio-rng behind the
// virtio-pci transport, under real KVM. A TEST AID (run it in the lab): it proves the
// transport against Linux's virtio_pci driver and against KVM's ioeventfd, irqfd and MSI
// routing, before the vhost-user frontend exists. It assembles the VM from the same public
// pieces Machine uses, so machine.cc stays untouched.
//
//   clone-virtio-rng-boot KERNEL INITRD [CMDLINE]
//
// The guest's serial console goes to stdout. Exit status: 0 when the guest powered off,
// 1 otherwise. CLONE_LOG=debug shows the transport's decisions; CLONE_VCPUS sets the vCPU
// count (default 2, so the guest can move the queue's MSI between CPUs).

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "vmm-core/arch/layout.h"
#include "vmm-core/boot/acpi/acpi_tables.h"
#include "vmm-core/boot/cpu_setup.h"
#include "vmm-core/boot/linux_loader.h"
#include "vmm-core/devices/pci_root.h"
#include "vmm-core/kvm/cpuid.h"
#include "vmm-core/kvm/kvm.h"
#include "vmm-core/kvm/kvm_device_events.h"
#include "vmm-core/kvm/msrs.h"
#include "vmm-core/memory/guest_memory.h"
#include "vmm-core/virtio/test_devices/virtio_rng.h"
#include "vmm-core/virtio/virtio_pci_device.h"
#include "vmm-core/vm/exit_signal.h"
#include "vmm-core/vm/legacy_devices.h"
#include "vmm-core/vm/vcpu_runner.h"

namespace clonevm::vmm {
namespace {

constexpr uint64_t kMemory = 512 * layout::kMiB;

// As Machine does: LINT0 takes the PIC (ExtINT), LINT1 NMIs.
void setupLapicLints(KvmVcpu& vcpu) {
  kvm_lapic_state lapic = vcpu.getLapic();
  auto set = [&](uint32_t offset, uint32_t delivery) {
    uint32_t value;
    std::memcpy(&value, &lapic.regs[offset], sizeof(value));
    value = (value & ~0x700u) | delivery;
    std::memcpy(&lapic.regs[offset], &value, sizeof(value));
  };
  set(0x350, 0x7 << 8);
  set(0x360, 0x4 << 8);
  vcpu.setLapic(lapic);
}

int run(const char* kernel, const char* initrd, const char* cmdline) {
  LogOptions logOptions;
  if (const char* level = std::getenv("CLONE_LOG")) logOptions.level = parseLogLevel(level);
  auto log = makeLogger("rng-boot", logOptions);

  KvmSystem kvm;
  GuestMemory memory = GuestMemory::create(kMemory);
  KvmVm vm(kvm);
  vm.createIrqchipAndPit();
  uint32_t slot = 0;
  for (const auto& region : memory.regions()) {
    vm.setUserMemoryRegion(slot++, region.guestAddress, region.size, region.host);
  }
  installVcpuKickHandler();

  // The 64-bit PCI window starts at the first GiB boundary above RAM and 4 GiB; the
  // device's BAR goes at its start (aligned: the window is 1 GiB aligned).
  uint64_t window = (std::max(memory.endAddress(), layout::kHighRamStart) + layout::kGiB - 1) /
                    layout::kGiB * layout::kGiB;
  LinuxBootConfig boot;
  boot.kernelPath = kernel;
  boot.initrdPath = initrd;
  boot.cmdline = cmdline;
  boot.acpiRsdpAddress = layout::kAcpiTablesAddr;
  LinuxBootInfo bootInfo = loadLinux(memory, boot);
  uint32_t vcpuCount = 2;
  if (const char* count = std::getenv("CLONE_VCPUS")) vcpuCount = std::stoul(count);
  require(vcpuCount >= 1 && vcpuCount <= 8, "CLONE_VCPUS={} (1..8)", vcpuCount);
  writeAcpiTables(memory, AcpiConfig{.vcpuCount = vcpuCount, .pciMmio64Start = window});
  writeLongModeTables(memory);

  auto supported = kvm.supportedCpuid();
  std::vector<std::unique_ptr<KvmVcpu>> vcpus;
  for (uint32_t id = 0; id < vcpuCount; ++id) {
    auto vcpu = std::make_unique<KvmVcpu>(vm, id);
    vcpu->setCpuid(buildGuestCpuid(supported, id, vcpuCount));
    vcpu->setMsrs(bootMsrs());
    kvm_fpu fpu{};
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    vcpu->setFpu(fpu);
    setupLapicLints(*vcpu);
    if (id == 0) {  // the others wait for the BSP's INIT/SIPI in the in-kernel LAPIC
      kvm_sregs sregs = vcpu->getSregs();
      setupLongModeSregs(sregs);
      vcpu->setSregs(sregs);
      vcpu->setRegs(linuxEntryRegs(bootInfo.entryPoint, bootInfo.bootParamsAddress));
    }
    vcpus.push_back(std::move(vcpu));
  }

  Bus pio("port I/O");
  Bus mmio("MMIO");
  ExitSignal exitSignal;
  LegacyDevices devices(LegacyDevices::Config{memory, 1, vm, exitSignal, *log}, pio, mmio);

  // The part under test.
  KvmDeviceEvents events(vm);
  auto rng = std::make_shared<VirtioRng>(*log);
  auto device = std::make_shared<VirtioPciDevice>(rng, memory, events, events, *log, window);
  Bdf bdf = devices.pciRoot().addDevice(device);
  mmio.insert(window, device->layout().size, device);
  log->info("virtio-rng at {} with BAR 0 at {:#x}+{:#x}, any-width doorbells: {}",
            bdf.toString(), window, device->layout().size, events.anyLengthIoeventfds());

  std::vector<std::unique_ptr<VcpuRunner>> runners;
  for (auto& vcpu : vcpus) {
    runners.push_back(std::make_unique<VcpuRunner>(*vcpu, pio, mmio, exitSignal, *log));
    runners.back()->start();
  }
  ExitReason reason = exitSignal.wait();
  for (auto& runner : runners) runner->stop();
  devices.flushConsole();
  std::fflush(stdout);
  log->info("guest ended: {} {}; virtio-rng served {} bytes, {} doorbell exits, {} MSI routes "
            "left",
            describe(reason), exitSignal.detail(), rng->bytesServed(), device->doorbellExits(),
            events.routing().table().size() - 40);
  // The data path must not have exited to the core: every kick went through the ioeventfd.
  if (device->doorbellExits() != 0) {
    log->error("{} doorbell writes exited to the core", device->doorbellExits());
    return 1;
  }
  return reason == ExitReason::kPowerOff ? 0 : 1;
}

}  // namespace
}  // namespace clonevm::vmm

int main(int argc, char** argv) {
  if (argc < 3 || argc > 4) {
    std::fprintf(stderr, "usage: %s KERNEL INITRD [CMDLINE]\n", argv[0]);
    return 2;
  }
  try {
    return clonevm::vmm::run(argv[1], argv[2],
                             argc == 4 ? argv[3] : "console=ttyS0 panic=-1");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "clone-virtio-rng-boot: %s\n", e.what());
    return 1;
  }
}
