#pragma once
// MSR values every vCPU starts with, as Linux's 64-bit entry expects them.

#include "vmm-core/kvm/kvm_uapi.h"

#include <cstdint>
#include <vector>

namespace clonevm::vmm {

inline constexpr uint32_t kMsrIa32Tsc = 0x10;
inline constexpr uint32_t kMsrIa32SysenterCs = 0x174;
inline constexpr uint32_t kMsrIa32SysenterEsp = 0x175;
inline constexpr uint32_t kMsrIa32SysenterEip = 0x176;
inline constexpr uint32_t kMsrIa32MiscEnable = 0x1a0;
inline constexpr uint32_t kMsrMtrrDefType = 0x2ff;
inline constexpr uint32_t kMsrStar = 0xc0000081;
inline constexpr uint32_t kMsrLstar = 0xc0000082;
inline constexpr uint32_t kMsrCstar = 0xc0000083;
inline constexpr uint32_t kMsrSyscallMask = 0xc0000084;
inline constexpr uint32_t kMsrKernelGsBase = 0xc0000102;

// Syscall MSRs cleared, fast strings on, MTRRs enabled with write-back as the default type.
std::vector<kvm_msr_entry> bootMsrs();

}  // namespace clonevm::vmm
