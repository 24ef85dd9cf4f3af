#include "vmm-core/kvm/cpuid.h"

#include <bit>

namespace clonevm::vmm {
namespace {

constexpr uint32_t bit(unsigned n) { return 1u << n; }

// Leaf 1
constexpr uint32_t kLeaf1EcxMonitor = bit(3);
constexpr uint32_t kLeaf1EcxHypervisor = bit(31);
constexpr uint32_t kLeaf1EdxHtt = bit(28);
// Leaf 7, subleaf 0
constexpr uint32_t kLeaf7EbxSgx = bit(2);
constexpr uint32_t kLeaf7EbxHle = bit(4);
constexpr uint32_t kLeaf7EbxRtm = bit(11);
constexpr uint32_t kLeaf7EbxRdtMonitoring = bit(12);
constexpr uint32_t kLeaf7EbxMpx = bit(14);
constexpr uint32_t kLeaf7EbxRdtAllocation = bit(15);
constexpr uint32_t kLeaf7EbxIntelPt = bit(25);
constexpr uint32_t kLeaf7EcxWaitpkg = bit(5);
constexpr uint32_t kLeaf7EcxSgxLc = bit(30);
constexpr uint32_t kLeaf7EdxPconfig = bit(18);
constexpr uint32_t kLeaf7EdxArchLbr = bit(19);
constexpr uint32_t kLeaf7EdxRtmAlwaysAbort = bit(11);
// AMD extended leaf 0x80000001
constexpr uint32_t kExtLeaf1EcxMwaitx = bit(29);

// Leaves dropped whole: SGX (0x12), Intel PT (0x14), RDT (0xf, 0x10), arch LBR (0x1c).
bool isHiddenLeaf(uint32_t function) {
  return function == 0x0f || function == 0x10 || function == 0x12 || function == 0x14 ||
         function == 0x1c;
}

uint32_t topologyShift(uint32_t count) {
  return count <= 1 ? 0 : static_cast<uint32_t>(std::bit_width(count - 1));
}

void applyTopologyLevel(kvm_cpuid_entry2& entry, uint32_t vcpuId, uint32_t vcpuCount) {
  // Level 0 is SMT (1 thread per core), level 1 is core (all vCPUs), the rest are invalid.
  switch (entry.index) {
    case 0:
      entry.eax = 0;
      entry.ebx = 1;
      entry.ecx = (1u << 8) | entry.index;
      break;
    case 1:
      entry.eax = topologyShift(vcpuCount);
      entry.ebx = vcpuCount;
      entry.ecx = (2u << 8) | entry.index;
      break;
    default:
      entry.eax = 0;
      entry.ebx = 0;
      entry.ecx = entry.index;
      break;
  }
  entry.edx = vcpuId;
}

}  // namespace

std::vector<kvm_cpuid_entry2> buildGuestCpuid(std::span<const kvm_cpuid_entry2> supported,
                                              uint32_t vcpuId, uint32_t vcpuCount) {
  std::vector<kvm_cpuid_entry2> out;
  out.reserve(supported.size());
  for (kvm_cpuid_entry2 entry : supported) {
    if (isHiddenLeaf(entry.function)) continue;
    switch (entry.function) {
      case 0x1:
        entry.ebx = (vcpuId << 24) | ((vcpuCount & 0xff) << 16) | (8u << 8) | (entry.ebx & 0xff);
        entry.ecx = (entry.ecx & ~kLeaf1EcxMonitor) | kLeaf1EcxHypervisor;
        entry.edx = vcpuCount > 1 ? (entry.edx | kLeaf1EdxHtt) : (entry.edx & ~kLeaf1EdxHtt);
        break;
      case 0x4: {
        // Cache topology: L1/L2 private to a core, L3 (and above) shared by all vCPUs.
        uint32_t cacheLevel = (entry.eax >> 5) & 0x7;
        uint32_t sharing = cacheLevel >= 3 ? vcpuCount - 1 : 0;
        entry.eax = (entry.eax & 0x3fff) | ((sharing & 0xfff) << 14) |
                    (((vcpuCount - 1) & 0x3f) << 26);
        break;
      }
      case 0x5:  // MONITOR/MWAIT parameters: hidden with the feature.
        entry.eax = entry.ebx = entry.ecx = entry.edx = 0;
        break;
      case 0x7:
        if (entry.index == 0) {
          entry.ebx &= ~(kLeaf7EbxSgx | kLeaf7EbxHle | kLeaf7EbxRtm | kLeaf7EbxRdtMonitoring |
                         kLeaf7EbxMpx | kLeaf7EbxRdtAllocation | kLeaf7EbxIntelPt);
          entry.ecx &= ~(kLeaf7EcxWaitpkg | kLeaf7EcxSgxLc);
          entry.edx &= ~(kLeaf7EdxPconfig | kLeaf7EdxArchLbr | kLeaf7EdxRtmAlwaysAbort);
        }
        break;
      case 0xb:
      case 0x1f:
        applyTopologyLevel(entry, vcpuId, vcpuCount);
        break;
      case 0x80000001:
        entry.ecx &= ~kExtLeaf1EcxMwaitx;
        break;
      case 0x80000008:
        // AMD: NC = cores - 1, ApicIdCoreIdSize = bits for the core id.
        entry.ecx = (entry.ecx & ~0xf0ffu) | ((vcpuCount - 1) & 0xff) |
                    (topologyShift(vcpuCount) << 12);
        break;
      case 0x8000001e:
        // AMD: extended APIC id, core id, one thread per core, node 0.
        entry.eax = vcpuId;
        entry.ebx = vcpuId & 0xff;
        entry.ecx = 0;
        break;
      default:
        break;
    }
    out.push_back(entry);
  }
  return out;
}

}  // namespace clonevm::vmm
