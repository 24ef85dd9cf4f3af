#pragma once
// The guest physical address map of a Clone VM (x86-64). One place, so that the e820 map,
// ACPI tables, device placement and memory regions always agree.

#include <cstdint>

namespace clonevm::vmm::layout {

inline constexpr uint64_t kKiB = 1024;
inline constexpr uint64_t kMiB = 1024 * kKiB;
inline constexpr uint64_t kGiB = 1024 * kMiB;

// Low memory used by the boot path (all below the 640 KiB EBDA line).
// GDT: null, null, code 0x10, data 0x18 (the selectors the Linux boot protocol names) and a
// 16-byte TSS descriptor at 0x20, so 48 bytes; the empty IDT follows it.
inline constexpr uint64_t kGdtAddr = 0x500;
inline constexpr uint64_t kGdtSize = 0x30;
inline constexpr uint64_t kIdtAddr = 0x530;
inline constexpr uint64_t kBootParamsAddr = 0x7000;   // "zero page"
inline constexpr uint64_t kPml4Addr = 0x9000;
inline constexpr uint64_t kPdptAddr = 0xa000;
inline constexpr uint64_t kPdAddr = 0xb000;           // 4 pages: identity map of 0..4 GiB
inline constexpr uint64_t kBootStackTop = 0x8ff0;
inline constexpr uint64_t kCmdlineAddr = 0x20000;
inline constexpr uint64_t kCmdlineMax = 0x10000;      // 64 KiB
inline constexpr uint64_t kEbdaStart = 0x9fc00;       // end of usable conventional memory
inline constexpr uint64_t kBiosStart = 0xe0000;       // ACPI RSDP is found by scanning here
inline constexpr uint64_t kAcpiTablesAddr = 0xe0000;  // RSDP first, then the other tables
inline constexpr uint64_t kAcpiTablesMax = 0x20000;   // up to 0xfffff
inline constexpr uint64_t kHighMemStart = 1 * kMiB;   // kernel protected-mode code goes here

// The 32-bit PCI hole: RAM stops at 3 GiB and resumes at 4 GiB.
inline constexpr uint64_t kLowRamEnd = 3 * kGiB;
inline constexpr uint64_t kPciMmio32Start = 3 * kGiB;           // 0xc0000000
inline constexpr uint64_t kPciMmio32Size = 512 * kMiB;          // to 0xe0000000
inline constexpr uint64_t kEcamStart = 0xe0000000;              // PCIe ECAM, buses 0..255
inline constexpr uint64_t kEcamSize = 256 * kMiB;
// A fork server's spare reads its working set into KVM's page tables from a helper memory slot
// here, which no device and no RAM uses (vmm-core/vm/nested_page_prefault.h).
inline constexpr uint64_t kPrefaultSlotStart = 0xf0000000;
inline constexpr uint64_t kPrefaultSlotMaxSize = 64 * kMiB;
inline constexpr uint64_t kIoapicAddr = 0xfec00000;
inline constexpr uint64_t kIoapicSize = 0x1000;
inline constexpr uint64_t kLapicAddr = 0xfee00000;
inline constexpr uint64_t kLapicSize = 0x100000;
inline constexpr uint64_t kHighRamStart = 4 * kGiB;
static_assert(kPrefaultSlotStart >= kEcamStart + kEcamSize &&
              kPrefaultSlotStart + kPrefaultSlotMaxSize <= kIoapicAddr);
// 64-bit PCI window: after high RAM, aligned; sized generously for BARs.
inline constexpr uint64_t kPciMmio64Size = 64 * kGiB;

// Legacy I/O ports emulated by the core.
inline constexpr uint16_t kCom1Port = 0x3f8;
inline constexpr uint8_t kCom1Irq = 4;
inline constexpr uint16_t kI8042DataPort = 0x60;
inline constexpr uint16_t kI8042CommandPort = 0x64;
inline constexpr uint8_t kI8042KeyboardIrq = 1;
inline constexpr uint8_t kI8042AuxIrq = 12;
inline constexpr uint16_t kPostCodePort = 0x80;       // POST codes, Linux's io_delay
inline constexpr uint16_t kCmosPort = 0x70;           // index 0x70, data 0x71
inline constexpr uint8_t kRtcIrq = 8;
inline constexpr uint16_t kPciConfigAddressPort = 0xcf8;  // legacy type-1 config (0xcf8..0xcff)
inline constexpr uint16_t kResetPort = 0xcf9;         // FADT RESET_REG
inline constexpr uint8_t kResetValue = 0x06;
// ACPI fixed hardware (PM1a event/control blocks, PM timer).
inline constexpr uint16_t kPm1aEventPort = 0x600;     // 4 bytes: status, enable
inline constexpr uint16_t kPm1aControlPort = 0x604;   // 2 bytes
inline constexpr uint16_t kPmTimerPort = 0x608;       // 4 bytes, 3.579545 MHz
inline constexpr uint8_t kSciIrq = 9;
inline constexpr uint8_t kS5SleepType = 5;            // \_S5 value written to SLP_TYP

inline constexpr uint32_t kIoapicGsiCount = 24;

}  // namespace clonevm::vmm::layout
