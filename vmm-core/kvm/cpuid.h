#pragma once
// The CPUID a guest sees: what KVM supports, filtered to a stable model and given a topology.
//
// The model (documented in docs/VMM.md):
// - vendor, family, model and stepping are the host's, so one template's snapshots move only
//   between hosts of one CPU family;
// - one socket, one core per vCPU, one thread per core; APIC id = vCPU index;
// - the hypervisor bit is set and KVM's paravirtual leaves (kvmclock, PV EOI, ...) are kept;
// - features that differ between otherwise equal hosts, or that a VMM should not expose,
//   are hidden: TSX (HLE, RTM), MPX, Intel PT, WAITPKG, SGX, MONITOR/MWAIT, PCONFIG,
//   architectural LBR and the resource-director (RDT) leaves.

#include "vmm-core/kvm/kvm_uapi.h"

#include <cstdint>
#include <span>
#include <vector>

namespace clonevm::vmm {

std::vector<kvm_cpuid_entry2> buildGuestCpuid(std::span<const kvm_cpuid_entry2> supported,
                                              uint32_t vcpuId, uint32_t vcpuCount);

}  // namespace clonevm::vmm
