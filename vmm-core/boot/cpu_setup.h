#pragma once
// The vCPU state Linux's 64-bit boot protocol expects at its entry point: long mode with paging,
// an identity map covering the kernel, zero page and command line, and a GDT holding flat
// segments at the selectors boot.rst names (__BOOT_CS = 0x10, __BOOT_DS = 0x18).
//
// Everything here is data: the KVM layer reads the vCPU's kvm_sregs, passes it through
// setupLongModeSregs() and applies it with KVM_SET_SREGS, then KVM_SET_REGS with
// linuxEntryRegs(). Only the boot vCPU gets this state; the others wait for INIT/SIPI.

// kvm_uapi.h (the KVM layer's fixed-up <linux/kvm.h>) is preferred so every translation unit
// sees the same KVM struct layouts; fall back while it is not in the tree yet.
#if __has_include("vmm-core/kvm/kvm_uapi.h")
#include "vmm-core/kvm/kvm_uapi.h"
#else
#include <linux/kvm.h>
#endif

#include <array>
#include <cstdint>

#include "vmm-core/memory/guest_memory.h"

namespace clonevm::vmm {

inline constexpr uint16_t kBootCodeSelector = 0x10;
inline constexpr uint16_t kBootDataSelector = 0x18;
inline constexpr uint16_t kBootTssSelector = 0x20;  // a 16-byte system descriptor

// Control register and EFER bits used by the boot state.
inline constexpr uint64_t kCr0ProtectionEnable = 1ull << 0;
inline constexpr uint64_t kCr0ExtensionType = 1ull << 4;
inline constexpr uint64_t kCr0NumericError = 1ull << 5;
inline constexpr uint64_t kCr0Paging = 1ull << 31;
inline constexpr uint64_t kCr4Pae = 1ull << 5;
inline constexpr uint64_t kEferLongModeEnable = 1ull << 8;
inline constexpr uint64_t kEferLongModeActive = 1ull << 10;

// Page table entry bits.
inline constexpr uint64_t kPtePresent = 1ull << 0;
inline constexpr uint64_t kPteWritable = 1ull << 1;
inline constexpr uint64_t kPteHugePage = 1ull << 7;  // PS: a 2 MiB page in a PD entry

// The segments the boot vCPU runs with; the GDT holds exactly these.
kvm_segment bootCodeSegment();
kvm_segment bootDataSegment();
kvm_segment bootTssSegment();

// The GDT image written at layout::kGdtAddr: null, null, code, data, TSS (two slots).
std::array<uint64_t, 6> bootGdt();
// Encodes a code/data segment, or the low half of a system segment, as a descriptor.
uint64_t encodeSegmentDescriptor(const kvm_segment& segment);

// Writes the GDT, an empty IDT and identity page tables for 0..4 GiB (2 MiB pages).
void writeLongModeTables(const GuestMemory& memory);

// Puts `sregs` (as read from the vCPU) into 64-bit long mode matching writeLongModeTables().
// CR0/CR3/CR4/EFER, the segment registers, GDT and IDT are set; the APIC base, LDT, CR2, CR8
// and the interrupt bitmap keep the values KVM gave.
void setupLongModeSregs(kvm_sregs& sregs);

// General registers at the 64-bit entry: RIP = entry, RSI = zero page, RFLAGS = 2 (IF clear).
kvm_regs linuxEntryRegs(uint64_t entryPoint, uint64_t bootParamsAddress);

}  // namespace clonevm::vmm
