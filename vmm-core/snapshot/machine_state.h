#pragma once
// Everything a running VM holds outside its RAM (DESIGN §6): per vCPU, per VM (in-kernel
// irqchip, PIT, KVM clock) and the core's emulated devices. capture*/restore* talk to KVM;
// encode/decode turn the whole into the state file (state_codec.h, docs/FORK.md).

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <spdlog/logger.h>

#include "vmm-core/devices/acpi_pm.h"
#include "vmm-core/devices/cmos.h"
#include "vmm-core/devices/i8042.h"
#include "vmm-core/devices/serial.h"
#include "vmm-core/kvm/kvm.h"
#include "vmm-core/virtio/vhost_user_backend.h"
#include "vmm-core/virtio/vhost_vsock_backend.h"
#include "vmm-core/virtio/virtio_pci_device.h"

namespace clonevm::vmm::snapshot {

struct VcpuState {
  uint32_t id = 0;
  std::vector<kvm_cpuid_entry2> cpuid;
  kvm_regs regs{};
  kvm_sregs sregs{};
  kvm_fpu fpu{};
  std::vector<uint32_t> xsave;  // KVM_GET_XSAVE2 area
  kvm_xcrs xcrs{};
  std::vector<kvm_msr_entry> msrs;
  kvm_lapic_state lapic{};
  kvm_vcpu_events events{};
  kvm_mp_state mpState{};
  kvm_debugregs debugRegs{};
};

struct KvmVmState {
  kvm_irqchip picMaster{};
  kvm_irqchip picSlave{};
  kvm_irqchip ioapic{};
  kvm_pit_state2 pit{};
  kvm_clock_data clock{};
};

struct DeviceStates {
  Serial::State serial{};
  Cmos::State cmos{};
  AcpiPm::State acpiPm{};
  I8042::State i8042{};
};

// One virtio-pci device of the core, in PCI slot order. A restore builds the same devices
// (same types, same BARs) and loads these into them.
struct VirtioDeviceState {
  uint32_t deviceType = 0;  // virtio device type (vsock: 19)
  uint64_t barAddress = 0;  // BAR 0, where the VMM placed it and the guest kept it
  VirtioPciState transport;
  std::optional<VhostVsockState> vsock;  // the kernel rings' positions, for the vsock device
  std::optional<VhostUserDeviceState> vhostUser;  // for a vhost-user-blk device
};

struct MachineState {
  KvmVmState vm;
  std::vector<VcpuState> vcpus;
  DeviceStates devices;
  std::vector<VirtioDeviceState> virtio;  // absent in templates of VMs without virtio devices
};

// The MSRs of `candidates` (KVM_GET_MSR_INDEX_LIST: saved and emulated MSRs) that
// KVM_GET_MSRS reads on `vcpu`; the others are dropped.
std::vector<uint32_t> readableMsrs(const KvmVcpu& vcpu, std::vector<uint32_t> candidates);

// The vCPU must be stopped (parked outside KVM_RUN).
VcpuState captureVcpu(const KvmVcpu& vcpu, std::vector<kvm_cpuid_entry2> cpuid,
                      const std::vector<uint32_t>& msrIndices, size_t xsaveBytes);
// Restores into a freshly created vCPU whose CPUID is already state.cpuid. MSRs KVM
// refuses are skipped with a warning (they are listed).
void restoreVcpu(KvmVcpu& vcpu, const VcpuState& state, spdlog::logger& log);

KvmVmState captureVm(const KvmVm& vm);
void restoreVm(KvmVm& vm, const KvmVmState& state);

std::vector<uint8_t> encodeMachineState(const MachineState& state);
// Throws clonevm::Error naming `what` on any malformed or missing part.
MachineState decodeMachineState(std::span<const uint8_t> data, const std::string& what);

}  // namespace clonevm::vmm::snapshot
